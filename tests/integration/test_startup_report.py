"""Start-up reports what it does: the worker's load and profile progress reaches the
engine, and ``describe()`` (the banner's content) states the configuration truthfully."""

from __future__ import annotations

import io
import logging

import pytest

from engine.api import Engine
from engine.banner import format_banner
from engine.config import ParallelConfig
from engine.models.loader import count_tensors
from engine.progress import StartupProgress
from tests.integration.engine_utils import tiny_engine_config
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


async def test_load_and_profile_progress_reach_the_engine_and_the_banner_tells_the_truth(
        model_path, caplog):
    caplog.set_level(logging.INFO, logger="fastserve")
    config = tiny_engine_config(model_path, gpu_blocks=100, host_blocks=50).replace(
        parallel=ParallelConfig(torch_threads=1))
    engine = await Engine.create(config, progress_bars=False)
    try:
        loaded = [r.getMessage() for r in caplog.records if "loading weights" in r.getMessage()]
        assert loaded == [f"loading weights: {count_tensors(model_path)} tensors in "
                          + loaded[0].rsplit(" in ", 1)[1]]
        def profiled() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.getMessage().startswith("profiling prefill and decode cost: ")]

        assert len(profiled()) == 1  # the default policy measured its profile at start-up
        await engine.profile()
        assert len(profiled()) == 2 and " points in " in profiled()[1]

        d = engine.describe()
        assert (d["device"], d["dtype"]) == ("cpu", "float32")
        assert d["kv"]["device_blocks"] == 100 and d["kv"]["host_blocks"] == 50
        assert d["kv"]["device_tokens"] == 100 * 4
        assert d["kv"]["device_bytes"] == 100 * d["kv"]["block_bytes"]
        assert d["max_concurrency"] == pytest.approx(400 / engine.max_model_len)
        assert d["num_params"] > 0 and d["policy"]["name"] == config.scheduler.policy
        text = format_banner(d, ["http://127.0.0.1:1/v1"])
        assert "100 blocks = 400 tokens" in text and "http://127.0.0.1:1/v1" in text
    finally:
        await engine.shutdown()


def test_progress_bars_draw_on_a_terminal_stream_and_end_with_the_stage():
    stream = io.StringIO()
    progress = StartupProgress(bars=True, stream=stream)
    for done in range(5):
        progress({"stage": "load", "done": done, "total": 4})
    assert "loading weights" in stream.getvalue() and "4/4" in stream.getvalue()
    assert progress._stage is None  # the stage closed itself at 100%
