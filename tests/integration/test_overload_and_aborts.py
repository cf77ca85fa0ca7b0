"""The real tiny engine behind HTTP and ZeroMQ under overload and under streams abandoned
at random points.

* Overload: far more requests than the bounded waiting queue holds get 503 with
  Retry-After; the engine never holds more jobs than its caps allow (memory bounded), and
  every admitted request finishes with all its tokens.
* Aborts: hundreds of streams aborted or disconnected at random points, while KV moves
  between the GPU and host pools (a preemptive policy on a small pool), some aborted twice
  or after their last token: afterwards both block pools are whole and open file
  descriptors, threads and asyncio tasks are back at their baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from engine.api import Engine
from engine.client import AsyncClient
from engine.config import ParallelConfig, SchedulerConfig, ServerConfig
from engine.server import build_app, start_http
from engine.server.zmq_frontend import ZmqFrontend
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

MODEL = "tiny"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


@contextlib.asynccontextmanager
async def serving(sched: SchedulerConfig, model_path: str, **cache) -> AsyncIterator[tuple]:
    cfg = tiny_engine_config(model_path, **cache).replace(
        scheduler=sched, parallel=ParallelConfig(torch_threads=1))
    engine = await Engine.create(cfg)
    runner = front = None
    try:
        app = build_app(engine, ServerConfig(host="127.0.0.1", port=0), MODEL)
        runner, port = await start_http(app, "127.0.0.1", 0)
        front = ZmqFrontend(engine, "tcp://127.0.0.1:*", MODEL)
        await front.start()
        yield engine, f"http://127.0.0.1:{port}", front.address
    finally:
        if front is not None:
            await front.stop()
        if runner is not None:
            await runner.cleanup()
        await engine.shutdown()


def session() -> aiohttp.ClientSession:
    # No keep-alive: a finished request leaves no pooled connection (and fd) behind.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=120))


# -- overload -------------------------------------------------------------------------------
MAX_SEQS, MAX_WAITING = 2, 4
FLOOD = 10 * (MAX_SEQS + MAX_WAITING)  # ten times what the engine may hold at once


async def test_overload_gets_503_with_retry_after_and_every_admitted_request_finishes(
    model_path,
):
    # FCFS: a job waits until it runs to completion, so the engine holds at most
    # MAX_SEQS + MAX_WAITING jobs. A preemptive policy (the default) also holds the jobs it
    # preempted, as many as the KV pools fit resident or swapped; only the rest wait.
    sched = SchedulerConfig(policy="fcfs", swap_policy="reactive", max_num_seqs=MAX_SEQS,
                            max_waiting=MAX_WAITING, max_waiting_tokens=64)
    async with serving(sched, model_path) as (engine, base, _), session() as s:
        peak = 0
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len((await engine.stats())["jobs"]))
                await asyncio.sleep(0.005)

        async def one(i: int) -> tuple[int, dict, dict]:
            body = {"model": MODEL, "prompt": f"request {i} " + "word " * (i % 7),
                    "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
            async with s.post(base + "/v1/completions", json=body) as r:
                return r.status, dict(r.headers), await r.json()

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(one(i) for i in range(FLOOD)))
        done.set()
        await watcher

        admitted = [b for st, _, b in results if st == 200]
        refused = [(h, b) for st, h, b in results if st == 503]
        assert len(admitted) + len(refused) == FLOOD  # nothing else: no 500, no hang
        assert admitted and refused
        for body in admitted:
            assert body["usage"]["completion_tokens"] == MAX_TOKENS
            assert body["choices"][0]["finish_reason"] == "length"
        for headers, body in refused:
            assert headers["Retry-After"] == "1"
            assert body["error"]["code"] == "queue_full" and body["error"]["param"] is None
            assert "max_waiting" in body["error"]["message"]
        # Memory is bounded by the caps, not by the offered load.
        assert peak <= MAX_SEQS + MAX_WAITING
        assert_pools_whole(await wait_all_blocks_free(engine))


# -- aborts and disconnects -----------------------------------------------------------------
STREAMS = 240  # aborted at random points; bounded so the test takes well under a minute
WAVE = 24
TINY_QUANTUM = (("base_quantum_s", 0.002), ("quantum_ratio", 2.0))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def resources() -> tuple[int, int, int]:
    return open_fds(), threading.active_count(), len(asyncio.all_tasks())


async def settle(baseline: tuple[int, int, int], timeout: float = 20.0) -> tuple[int, int, int]:
    """Sockets close and handler tasks end a little after the client hangs up: poll."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        now = resources()
        if all(n <= b for n, b in zip(now, baseline)) or loop.time() > deadline:
            return now
        await asyncio.sleep(0.05)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds through /proc")
async def test_streams_aborted_at_random_points_leave_pools_fds_threads_and_tasks_flat(
    model_path,
):
    sched = SchedulerConfig(policy="skip-join-mlfq", swap_policy="proactive",
                            policy_options=TINY_QUANTUM, max_num_seqs=4,
                            max_num_batched_tokens=64)
    rng = random.Random(7)
    async with (
        serving(sched, model_path, gpu_blocks=24, host_blocks=256) as (engine, base, zaddr),
        session() as s,
        AsyncClient(zaddr, timeout=60) as zc,
    ):
        prompt = "the quick brown fox jumps over the lazy dog " * 2

        async def http_stream(k: int) -> None:  # read k chunks, then hang up
            body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                    "ignore_eos": True, "stream": True}
            async with s.post(base + "/v1/completions", json=body) as r:
                assert r.status == 200
                seen = 0
                async for line in r.content:
                    if line.startswith(b"data: ") and (seen := seen + 1) > k:
                        break

        async def http_blocking(k: int) -> None:  # a non-streaming request abandoned
            body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                    "ignore_eos": True}
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(0.01 * k):
                    async with s.post(base + "/v1/completions", json=body) as r:
                        await r.read()

        async def zmq_leave(k: int) -> None:  # leave the loop early: the SDK aborts
            n = 0
            async with contextlib.aclosing(
                zc.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
            ) as it:
                async for _ in it:
                    if (n := n + 1) > k:
                        break

        async def zmq_abort_twice(k: int) -> None:  # explicit aborts, twice, maybe after the end
            rid = f"abort-{rng.random()}"
            n = 0
            async for out in zc.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True,
                                         request_id=rid):
                if (n := n + 1) == k:
                    await zc.abort(rid)
                    await zc.abort(rid)
                if out.finished:
                    break
            await zc.abort(rid)  # after the last token: a no-op

        actions: list[Callable] = [http_stream, http_blocking, zmq_leave, zmq_abort_twice]

        async def wave(n: int) -> None:
            await asyncio.gather(*(rng.choice(actions)(rng.randint(0, MAX_TOKENS))
                                   for _ in range(n)))

        await wave(WAVE)  # warm-up: connection pools, executor threads, first swaps
        assert_pools_whole(await wait_all_blocks_free(engine, timeout=30))
        await asyncio.sleep(0.5)
        baseline = resources()
        swapped_before = (await engine.stats())["memory"]["swap_out_bytes"]

        for _ in range(STREAMS // WAVE):
            await wave(WAVE)
        await engine.abort("never-existed")  # unknown ids are ignored

        assert_pools_whole(await wait_all_blocks_free(engine, timeout=30))
        after = await settle(baseline)
        assert after[0] <= baseline[0], ("open fds grew", baseline, after)
        assert after[1] <= baseline[1], ("threads grew", baseline, after)
        assert after[2] <= baseline[2], ("asyncio tasks grew", baseline, after)
        stats = await engine.stats()
        assert stats["memory"]["integrity_errors"] == []
        assert stats["memory"]["swap_out_bytes"] > swapped_before  # aborts met moving KV
        await engine.check_integrity()
        # And it still serves.
        async with s.post(base + "/v1/completions",
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
