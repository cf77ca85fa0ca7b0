"""A restart of the default engine reuses the profile measured by the first start."""

from __future__ import annotations

import logging

import pytest

from engine.api import Engine
from engine.config import ParallelConfig, SchedulerConfig
from engine.policies.profile import PrefillProfile
from tests.integration.engine_utils import tiny_engine_config
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


async def test_second_start_reads_the_cached_profile_instead_of_measuring(
        model_path, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastserve")
    config = tiny_engine_config(model_path).replace(
        scheduler=SchedulerConfig(profile_cache_dir=str(tmp_path)),
        parallel=ParallelConfig(torch_threads=1))
    first = await Engine.create(config, progress_bars=False)
    try:
        measured = first._workers.scheduler.core.policy.profile
        assert first.profile_source.startswith("measured at start-up, cached in " + str(tmp_path))
    finally:
        await first.shutdown()
    caplog.clear()
    second = await Engine.create(config, progress_bars=False)
    try:
        policy = second._workers.scheduler.core.policy
        assert second.profile_source.startswith("cached " + str(tmp_path))
        assert isinstance(policy.profile, PrefillProfile) and policy.profile == measured
        assert not [r for r in caplog.records if "profiling" in r.getMessage()]
        d = second.describe()
        assert (d["policy"]["name"], d["swap_policy"]["name"]) == ("skip-join-mlfq", "proactive")
        assert d["policy"]["base_quantum_s"] == pytest.approx(
            2 * measured.decode_step_time(8))
    finally:
        await second.shutdown()
