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
    assert overlap_steps("auto", {"device": "cuda:0", "torch_threads": cores})
    assert not overlap_steps("auto", {"device": "cpu", "torch_threads": cores})
    assert overlap_steps("auto", {"device": "cpu", "torch_threads": cores - 1}) == (cores > 1)
    assert overlap_steps("on", {"device": "cpu", "torch_threads": cores})
    assert not overlap_steps("off", {"device": "cuda:0", "torch_threads": 1})
