"""``fastserve bench`` against the real server (worker process, tiny random Llama): a small
run writes a valid result and plots; the ZeroMQ backend counts the same tokens as HTTP;
``serve --record-trace`` writes a trace that ``bench`` replays.

The server runs in a background thread with its own event loop (``engine.server.serve``
on free ports); the bench commands run as the CLI would, in the test's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import pytest

from engine.bench.cli import main as bench_main
from engine.config import ServerConfig
from engine.server.http import serve
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import tiny_engine_config

pytestmark = pytest.mark.timeout(240)

WORKLOAD = ["--workload", "uniform", "--input-len", "8", "--output-len", "6",
            "--num-prompts", "6", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    trace = tmp / "trace.jsonl"
    cfg = tiny_engine_config(make_tiny_model_dir("llama", tmp / "model"))
    cfg = dataclasses.replace(cfg, server=ServerConfig(
        host="127.0.0.1", port=0, zmq_address="tcp://127.0.0.1:*", record_trace=str(trace)))
    ready = threading.Event()
    urls: dict = {}
    state: dict = {}

    def on_ready(url: str, zmq: str | None) -> None:
        urls.update(http=url, zmq=zmq)
        ready.set()

    def run() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        state["stop"] = stop = asyncio.Event()
        try:
            loop.run_until_complete(serve(cfg, stop=stop, on_ready=on_ready))
        except BaseException as e:  # noqa: BLE001 - reported by the fixture below
            state["error"] = e
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(120), "server did not start"
    assert "error" not in state, state.get("error")
    yield {**urls, "trace": trace, "tmp": tmp}
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(60)
    assert not thread.is_alive()


def _bench(server, out, *extra: str) -> dict:
    assert bench_main(["--base-url", server["http"], *extra, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_over_http_writes_a_valid_result_and_plots(server):
    out = server["tmp"] / "http.json"
    res = _bench(server, out, *WORKLOAD, "--request-rate", "20,50", "--slo", "e2el:600000")
    assert [r["request_rate"] for r in res["results"]] == [20.0, 50.0]
    for r in res["results"]:
        assert (r["completed"], r["failed"], r["rejected"]) == (6, 0, 0)
        rows = r["requests"]
        assert [row["output_tokens"] for row in rows] == [row["output_len"] for row in rows]
        assert r["total_output_tokens"] == sum(row["output_len"] for row in rows)
        assert r["mean_ttft_ms"] > 0 and r["mean_e2el_ms"] >= r["mean_ttft_ms"]
        assert r["mean_jct_s"] == pytest.approx(r["mean_e2el_ms"] / 1e3)
        assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert res["server_scheduler"]["object"] == "scheduler.stats"
    report = server["tmp"] / "report"
    assert bench_main(["report", str(out), "--output-dir", str(report)]) == 0
    png = (report / "jct_vs_rate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| http |" in (report / "summary.md").read_text()


def test_zmq_backend_counts_the_same_tokens_as_http(server):
    http = _bench(server, server["tmp"] / "h.json", *WORKLOAD, "--request-rate", "30")
    zmq = _bench(server, server["tmp"] / "z.json", *WORKLOAD, "--request-rate", "30",
                 "--backend", "zmq", "--zmq-address", server["zmq"])
    count = [[row["output_tokens"] for row in r["requests"]] for r in (http, zmq) for r in r["results"]]
    assert count[0] == count[1]
    assert http["total_output_tokens"] == zmq["total_output_tokens"]
    assert http["total_input_tokens"] == zmq["total_input_tokens"]
    assert all(row["queue_s"] is not None for row in zmq["results"][0]["requests"])


def test_recorded_trace_replays(server):
    rows = [json.loads(line) for line in server["trace"].read_text().splitlines()]
    assert len(rows) >= 6
    assert all(r["output_len"] >= 1 and r["prompt_len"] >= 1 and "prompt" not in r for r in rows)
    res = _bench(server, server["tmp"] / "replay.json", "--workload", f"trace:{server['trace']}",
                 "--num-prompts", "6", "--no-progress")
    assert res["completed"] == 6
    replayed = [row["output_tokens"] for row in res["results"][0]["requests"]]
    assert replayed == [r["output_len"] for r in sorted(rows, key=lambda r: r["arrival_s"])[:6]]


def test_max_concurrency_one_serves_requests_one_after_another(server):
    res = _bench(server, server["tmp"] / "serial.json", *WORKLOAD, "--request-rate", "inf",
                 "--max-concurrency", "1")
    rows = res["results"][0]["requests"]
    assert res["completed"] == 6 and res["request_rate"] is None
    # all arrive at 0 and wait their turn at the gate: each finishes after the one before
    ends = [row["e2el_s"] for row in rows]
    assert ends == sorted(ends) and len(set(ends)) == 6
