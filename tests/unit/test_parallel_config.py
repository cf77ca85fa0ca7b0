"""The distributed knobs: backend choice on the command line and in ParallelConfig, and the
combinations refused before anything starts."""

from __future__ import annotations

import argparse

import pytest

from engine.cli import add_engine_args, add_server_args, engine_config_from_args
from engine.config import ParallelConfig


def _config(*argv: str):
    p = argparse.ArgumentParser()
    add_server_args(p)
    add_engine_args(p)
    return engine_config_from_args(p.parse_args(list(argv))).parallel


def test_mp_is_the_default_backend_and_ray_is_chosen_by_flag():
    assert _config().distributed_executor_backend == "mp"
    cfg = _config("--distributed-executor-backend", "ray", "--ray-address", "10.0.0.1:6379", "-tp", "2")
    assert (cfg.distributed_executor_backend, cfg.ray_address, cfg.world_size) == ("ray", "10.0.0.1:6379", 2)


def test_an_unknown_backend_or_remote_ranks_under_ray_are_refused():
    with pytest.raises(ValueError, match="mp' or 'ray"):
        ParallelConfig(distributed_executor_backend="slurm")
    with pytest.raises(ValueError, match="Ray places every rank"):
        ParallelConfig(pipeline_parallel_size=2, remote_ranks=(1,), distributed_executor_backend="ray")



def test_steps_overlap_when_the_engine_has_a_core_of_its_own():
    from engine.api import overlap_steps
    from engine.parallel.cpu import physical_cores

    assert _config().overlap_steps == "auto"
    assert _config("--overlap-steps", "off").overlap_steps == "off"
    with pytest.raises(ValueError, match="overlap_steps"):
        ParallelConfig(overlap_steps="yes")
    cores = physical_cores()
    assert overlap_steps("auto", {"device": "cuda:0", "torch_threads": cores})[0]
    assert not overlap_steps("auto", {"device": "cpu", "torch_threads": cores})[0]
    assert overlap_steps("auto", {"device": "cpu", "torch_threads": cores - 1})[0] == (cores > 1)
    assert overlap_steps("on", {"device": "cpu", "torch_threads": cores})[0]
    assert not overlap_steps("off", {"device": "cuda:0", "torch_threads": 1})[0]


def test_small_steps_are_on_where_one_cpu_rank_fills_the_cores_and_overlap_only_those(monkeypatch):
    import torch

    from engine.api import overlap_steps
    from engine.parallel import cpu
    from engine.parallel.worker import SMALL_STEP_ROWS, small_step_rows

    assert _config().small_step_rows is None
    assert _config("--small-step-rows", "0").small_step_rows == 0
    assert _config("--small-step-rows", "6").small_step_rows == 6
    with pytest.raises(ValueError, match="small_step_rows"):
        ParallelConfig(small_step_rows=-1)
    monkeypatch.setattr(cpu, "physical_cores", lambda: 4)
    cpu_dev, cuda_dev = torch.device("cpu"), torch.device("cuda", 0)
    assert small_step_rows(None, cpu_dev, 1, 4) == SMALL_STEP_ROWS  # threads fill the cores
    assert small_step_rows(None, cpu_dev, 1, 3) == 0  # a core is free already: plain overlap
    assert small_step_rows(None, cpu_dev, 2, 4) == 0  # several ranks: each has its share
    assert small_step_rows(None, cpu_dev, 1, 1) == 0  # one thread: nothing to give up
    assert small_step_rows(None, cuda_dev, 1, 4) == 0
    assert small_step_rows(6, cpu_dev, 2, 2) == 6 and small_step_rows(0, cpu_dev, 1, 4) == 0
    assert small_step_rows(6, cuda_dev, 1, 4) == 0 and small_step_rows(6, cpu_dev, 1, 1) == 0

    full = {"device": "cpu", "torch_threads": 4}
    small = {**full, "small_step_rows": 4}
    # "auto" overlaps small steps only; "on" every step; a free core or a GPU: every step.
    assert overlap_steps("auto", full) == (False, None)
    assert overlap_steps("auto", small) == (True, 4)
    assert overlap_steps("on", small) == (True, None)
    assert not overlap_steps("off", small)[0]
    spare = {"device": "cpu", "torch_threads": 3, "small_step_rows": 0}
    assert overlap_steps("auto", spare) == (True, None)
    gpu = {"device": "cuda:0", "torch_threads": 4}
    assert overlap_steps("auto", gpu) == (True, None)


def test_a_worker_runs_steps_marked_one_thread_on_one_and_the_rest_on_all():
    import torch

    from engine.parallel.worker import Worker

    before = torch.get_num_threads()
    w = Worker()
    w.full_threads, w.small_step_rows = 2, 4
    try:
        w._set_threads({"seqs": [], "one_thread": True})  # an overlapped small step
        assert torch.get_num_threads() == 1
        w._set_threads({"seqs": []})  # anything else
        assert torch.get_num_threads() == 2
        w._set_threads({"seqs": [], "one_thread": True})
        assert torch.get_num_threads() == 1 and w.small_steps == 2
    finally:
        torch.set_num_threads(before)
