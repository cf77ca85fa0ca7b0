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



def test_steps_overlap_by_default_and_the_flag_turns_it_off():
    assert _config().overlap_steps is True
    assert _config("--no-overlap-steps").overlap_steps is False
