"""The operator's logs on a real server (tiny model, real worker): one access line per
request with its true token counts, a periodic stats line with the engine's own totals,
INFO for the ready line, no ERROR on a normal shutdown, and JSON lines on request."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import pytest

from engine.api import Engine
from engine.config import ParallelConfig, ServerConfig
from engine.logs import JsonFormatter
from engine.server.http import serve
from engine.server.oplog import format_stats, stats_fields
from tests.integration.engine_utils import tiny_engine_config, wait_all_blocks_free
from tests.tiny_models import make_tiny_model_dir

STATS_INTERVAL_S = 0.2
PROMPTS = ["one two three", "Hello, world!", "def main():"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


def messages(caplog, logger: str, level: int = logging.INFO) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno == level]


async def test_access_lines_stats_lines_and_levels_on_a_real_server(model_path, caplog):
    caplog.set_level(logging.DEBUG, logger="fastserve")
    config = tiny_engine_config(model_path).replace(
        parallel=ParallelConfig(torch_threads=1),
        server=ServerConfig(port=0, zmq_address="off", log_stats_interval_s=STATS_INTERVAL_S))
    engine = await Engine.create(config, progress_bars=False)
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(config, engine=engine, stop=stop,
                                       on_ready=lambda url, _zmq: ready.set_result(url)))
    try:
        base = await asyncio.wait_for(ready, 60)
        usages = []
        async with aiohttp.ClientSession() as http:
            async def complete(prompt: str) -> dict:
                body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": True}
                async with http.post(f"{base}/v1/completions", json=body) as r:
                    assert r.status == 200
                    return (await r.json())["usage"]

            usages = await asyncio.gather(*(complete(p) for p in PROMPTS))
            async with http.post(f"{base}/v1/completions", json={"max_tokens": 0}) as r:
                assert r.status == 400
            async with http.get(f"{base}/health") as r:
                assert r.status == 200
        await wait_all_blocks_free(engine)
        # One more interval so the stats line after the last token is out.
        await asyncio.sleep(3 * STATS_INTERVAL_S)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await engine.shutdown()

    access = [r.fields for r in messages(caplog, "fastserve.access")]
    ok = [a for a in access if a["status"] == 200]
    assert sorted((a["prompt_tokens"], a["output_tokens"]) for a in ok) == sorted(
        (u["prompt_tokens"], u["completion_tokens"]) for u in usages)
    for a in ok:
        assert a["method"] == "POST" and a["route"] == "/v1/completions"
        assert 0 < a["ttft_s"] <= a["duration_s"]
    (refused,) = [a for a in access if a["status"] != 200]
    assert (refused["status"], refused["output_tokens"], refused["ttft_s"]) == (400, 0, None)
    probes = [r.fields for r in messages(caplog, "fastserve.access", logging.DEBUG)]
    assert [p["route"] for p in probes] == ["/health"]

    stats = [r.fields for r in messages(caplog, "fastserve.stats")]
    assert stats, "no stats line while busy"
    last = stats[-1]
    assert last["generation_tokens_total"] == sum(u["completion_tokens"] for u in usages)
    assert last["prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
    assert (last["running"], last["waiting"], last["swapped"], last["preemptions"]) == (0, 0, 0, 0)
    assert any(s["generation_tok_s"] > 0 for s in stats)
    assert max(s["running"] + s["waiting"] for s in stats) <= len(PROMPTS)

    ready_lines = [r for r in caplog.records if r.getMessage().startswith("serving ")]
    assert [r.levelno for r in ready_lines] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "ERROR on shutdown"


def test_stats_fields_are_rates_over_the_interval_and_counts_by_state_and_level():
    prev = {"num_prompt_tokens_total": 100, "num_generation_tokens_total": 40,
            "num_preemptions": 1, "jobs": []}
    cur = {"num_prompt_tokens_total": 300, "num_generation_tokens_total": 90,
           "num_preemptions": 3, "num_gpu_blocks": 10, "num_free_gpu_blocks": 4,
           "num_host_blocks": 20, "num_free_host_blocks": 15,
           "jobs": [{"state": "running", "queue_level": 0}, {"state": "running", "queue_level": 2},
                    {"state": "waiting", "queue_level": 0}, {"state": "swapped", "queue_level": 3}]}
    f = stats_fields(prev, cur, dt=2.0)
    assert (f["prompt_tok_s"], f["generation_tok_s"]) == (100.0, 25.0)
    assert (f["running"], f["waiting"], f["swapped"]) == (2, 1, 1)
    assert f["queue_levels"] == {"0": 2, "2": 1, "3": 1}
    assert (f["device_kv_usage"], f["host_kv_usage"]) == (0.6, 0.25)
    assert (f["preemptions"], f["new_preemptions"]) == (3, 2)
    line = format_stats(f)
    assert "generation 25.0 tok/s" in line and "L0:2 L2:1 L3:1" in line and "device 60.0%" in line


def test_json_log_lines_carry_the_structured_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("fastserve.test_json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("hello %s", "there", extra={"fields": {"status": 200, "route": "/v1/x"}})
    finally:
        log.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "hello there" and line["level"] == "WARNING"
    assert (line["status"], line["route"], line["logger"]) == (200, "/v1/x", "fastserve.test_json")
