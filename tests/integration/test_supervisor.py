"""The engine's supervisor: a failed worker group is replaced, crashes in a row back off,
and a model that no longer loads ends the engine instead of a restart loop."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from engine.api import Engine
from engine.config import ParallelConfig
from engine.models.loader import ModelLoadError
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import collect, tiny_engine_config

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


def _config(path: str, backoff: float = 0.2):
    return tiny_engine_config(path).replace(parallel=ParallelConfig(
        torch_threads=1, restart_backoff_s=backoff, restart_backoff_max_s=10 * backoff))


async def _wait_serving(engine: Engine, restarts: int, limit: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not (engine.is_serving and engine.num_restarts == restarts):
        assert loop.time() < deadline, "the engine did not come back"
        await asyncio.sleep(0.1)


async def test_crashes_in_a_row_back_off_and_each_restart_serves(model_dir, caplog):
    caplog.set_level(logging.WARNING, logger="fastserve.engine")
    engine = await Engine.create(_config(model_dir))
    try:
        for restarts in (1, 2):
            os.kill(engine.worker_info["pid"], signal.SIGKILL)
            await _wait_serving(engine, restarts)
            ids, _, reason = await collect(engine, [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
            assert len(ids) == 3 and reason == "length"
        delays = [float(m.group(1)) for r in caplog.records
                  if (m := re.search(r"restarting the worker group in ([\d.]+) s", r.getMessage()))]
        assert delays == [0.2, 0.4]  # the second crash came soon after the first: doubled
        assert (await engine.stats())["num_restarts"] == 2
    finally:
        await engine.shutdown()


async def test_model_that_no_longer_loads_ends_the_engine(model_dir, tmp_path):
    path = str(tmp_path / "model")
    shutil.copytree(model_dir, path)
    engine = await Engine.create(_config(path))
    try:
        for name in os.listdir(path):
            if name.endswith(".safetensors"):
                Path(path, name).write_bytes(b"not a checkpoint")
        os.kill(engine.worker_info["pid"], signal.SIGKILL)
        await asyncio.wait_for(engine.wait_fatal(), 60)
        assert isinstance(engine.fatal_error, ModelLoadError)
        assert not engine.is_serving and engine.num_restarts == 0
    finally:
        await engine.shutdown()
