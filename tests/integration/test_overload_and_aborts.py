"""The real tiny engine behind HTTP and ZeroMQ under overload and under streams abandoned
at random points.

* Overload, under FCFS and under the default (preemptive) policy: ten times what the
  engine may hold gets 503 with Retry-After for the rest; the engine never holds more than
  max_num_seqs + max_waiting jobs, in whatever state; the resident memory of the server
  and of its worker stays bounded; every admitted request finishes with all its tokens.
* Aborts: 1,000 streams aborted at random points -- before their first token, mid-stream,
  after their last -- by client disconnects (HTTP, SDK) and by explicit aborts over the
  ZeroMQ SDK (twice, and once more after the end), while KV moves between the device and
  host pools. Afterwards both block pools are whole, and open file descriptors and threads
  of the server and of every worker rank, and the server's asyncio tasks, are back at
  their baseline. The same check at tensor-parallel size 2 covers rank 1 too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
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

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
    pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc"),
]

MODEL = "tiny"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


@contextlib.asynccontextmanager
async def serving(sched: SchedulerConfig, model_path: str, tp: int = 1,
                  **cache) -> AsyncIterator[tuple]:
    cfg = tiny_engine_config(model_path, **cache).replace(
        scheduler=sched,
        parallel=ParallelConfig(tensor_parallel_size=tp, torch_threads=1, step_timeout_s=60.0))
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


def session(limit: int = 100) -> aiohttp.ClientSession:
    # No keep-alive: a finished request leaves no pooled connection (and fd) behind.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=limit),
        timeout=aiohttp.ClientTimeout(total=120))


# -- what the processes hold, read from /proc ------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def fds_and_threads(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def thread_names(pids) -> dict[int, list[str]]:
    """Each process's OS thread names, for a failure message that says which thread grew."""
    out = {}
    for pid in pids:
        names = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except FileNotFoundError:  # the thread ended while we looked
                pass
        out[pid] = sorted(names)
    return out


async def gauges(s: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The server's own leak watch on /metrics (what benchmarks/soak.py plots)."""
    async with s.get(base + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        for name in ("process_threads", "event_loop_tasks"):
            if line.startswith(f"fastserve:{name}{{"):
                out[name] = float(line.rsplit(" ", 1)[1])
    assert set(out) == {"process_threads", "event_loop_tasks"}, text[:500]
    return out


async def resources(engine: Engine, s: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """Open fds and OS threads of the server and of every worker rank; the server's Python
    threads and asyncio tasks as /metrics reports them."""
    fds, threads = fds_and_threads(os.getpid())
    out: dict[str, float] = {"server fds": fds, "server threads": threads}
    out.update({f"server {k}": v for k, v in (await gauges(s, base)).items()})
    for rank, pid in sorted(engine._workers.executor.pids.items()):
        fds, threads = fds_and_threads(pid)
        out[f"rank {rank} fds"], out[f"rank {rank} threads"] = fds, threads
    return out


async def settle(engine: Engine, s: aiohttp.ClientSession, base: str, baseline: dict,
                 timeout: float = 30.0) -> dict:
    """Sockets close and handler tasks end a little after a client hangs up: poll (bounded)
    until every count is back at or below its baseline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        now = await resources(engine, s, base)
        if all(now[k] <= baseline[k] for k in baseline) or loop.time() > deadline:
            return now
        await asyncio.sleep(0.1)


# -- overload -------------------------------------------------------------------------------
MAX_SEQS, MAX_WAITING = 2, 4
FLOOD = 10 * (MAX_SEQS + MAX_WAITING)  # ten times what the engine may hold at once
RSS_SLACK = 64 * 1024**2  # allocator noise; a queue that grew with the offered load would not fit

OVERLOAD_POLICIES = {
    # FCFS: a job waits until it runs to completion.
    "fcfs": {"policy": "fcfs", "swap_policy": "reactive"},
    # The default, skip-join MLFQ with proactive swapping: it preempts instead of letting
    # jobs wait; preempted jobs count against the cap too. No start-up profiling (its own
    # estimate orders a tiny model's jobs), and each iteration charged as 20 ms: a
    # sub-millisecond tiny-model step would never use up a 50 ms quantum.
    "default": {"measure_profile": False, "profile_cache_dir": "", "fixed_step_time_s": 0.02},
}


@pytest.mark.parametrize("policy", list(OVERLOAD_POLICIES))
async def test_overload_gets_503_with_retry_after_memory_stays_bounded_and_admitted_finish(
    model_path, policy
):
    sched = SchedulerConfig(max_num_seqs=MAX_SEQS, max_waiting=MAX_WAITING,
                            max_waiting_tokens=64, **OVERLOAD_POLICIES[policy])
    # A small device pool: the preemptive policy swaps jobs out, and they still count.
    async with serving(sched, model_path, gpu_blocks=12) as (engine, base, _), session() as s:
        pids = [os.getpid(), *engine._workers.executor.pids.values()]

        async def one(i: int) -> tuple[int, dict, dict]:
            body = {"model": MODEL, "prompt": f"request {i} " + "word " * (i % 7),
                    "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
            async with s.post(base + "/v1/completions", json=body) as r:
                return r.status, dict(r.headers), await r.json()

        async def flood() -> tuple[list, int, dict[int, int]]:
            peak, peak_rss = 0, {pid: 0 for pid in pids}
            done = asyncio.Event()

            async def watch() -> None:
                nonlocal peak, swapped
                while not done.is_set():
                    jobs = (await engine.stats())["jobs"]
                    peak = max(peak, len(jobs))
                    swapped = max(swapped, sum(j["state"] == "swapped" for j in jobs))
                    for pid in pids:
                        peak_rss[pid] = max(peak_rss[pid], rss_bytes(pid))
                    await asyncio.sleep(0.005)

            watcher = asyncio.ensure_future(watch())
            results = await asyncio.gather(*(one(i) for i in range(FLOOD)))
            done.set()
            await watcher
            return results, peak, peak_rss

        swapped = 0  # most jobs seen swapped out to host at once
        await flood()  # warm-up: allocator pools, connection machinery, first swaps
        assert_pools_whole(await wait_all_blocks_free(engine))
        baseline_rss = {pid: rss_bytes(pid) for pid in pids}
        for _ in range(2):  # a second flood must not need more memory than the first
            results, peak, peak_rss = await flood()
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
            # Jobs held are bounded by the caps, whatever their state, not by the load.
            assert peak <= MAX_SEQS + MAX_WAITING
            for pid in pids:
                grew = peak_rss[pid] - baseline_rss[pid]
                assert grew <= RSS_SLACK, (f"pid {pid} grew {grew >> 20} MiB under overload",
                                           pid == os.getpid())
            assert_pools_whole(await wait_all_blocks_free(engine))
        if policy == "default":
            assert swapped > 0  # the cap held while jobs sat preempted on the host


# -- aborts and disconnects -----------------------------------------------------------------
TINY_QUANTUM = (("base_quantum_s", 0.002), ("quantum_ratio", 2.0))
PROMPT = "the quick brown fox jumps"


async def abort_at_random_points(engine: Engine, base: str, zaddr: str, streams: int,
                                 wave: int, seed: int) -> None:
    """``streams`` requests, ``wave`` at a time, each abandoned or aborted at a random
    point; then assert pools, fds, threads and tasks of every process are at baseline."""
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    async with session(limit=wave) as s, AsyncClient(zaddr, timeout=60) as zc:

        def note(what: str) -> None:
            outcomes[what] = outcomes.get(what, 0) + 1

        async def http_stream(k: int) -> None:  # read k chunks (0: none), then hang up
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                    "ignore_eos": True, "stream": True}
            async with s.post(base + "/v1/completions", json=body) as r:
                assert r.status == 200
                seen = 0
                async for line in r.content:
                    if seen >= k:
                        break
                    if line.startswith(b"data: "):
                        seen += 1
            note("http hang-up")

        async def http_blocking(k: int) -> None:  # a non-streaming request abandoned
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                    "ignore_eos": True}
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(0.005 * k):
                    async with s.post(base + "/v1/completions", json=body) as r:
                        await r.read()
            note("http abandoned")

        async def zmq_leave(k: int) -> None:  # leave the loop after k outputs: the SDK aborts
            n = 0
            async with contextlib.aclosing(
                zc.generate(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
            ) as it:
                async for _ in it:
                    if (n := n + 1) > k:
                        break
            note("sdk leave")

        async def zmq_abort(k: int) -> None:
            """Explicit aborts over the SDK, twice: k=0 before the first token, else after
            k outputs (past the last: after the end); and once more after the end."""
            rid = f"abort-{rng.random()}"
            it = zc.generate(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, request_id=rid)
            last = None
            if k == 0:
                first = asyncio.ensure_future(it.__anext__())  # sends the request
                await asyncio.sleep(0)
                await zc.abort(rid)
                await zc.abort(rid)
                last = await first
            n = 0
            while last is None or not last.finished:
                last = await it.__anext__()
                if (n := n + 1) == k:
                    await zc.abort(rid)
                    await zc.abort(rid)
            await it.aclose()
            await zc.abort(rid)  # after the last token: a no-op
            note(f"sdk abort -> {last.finish_reason}")

        actions: list[Callable] = [http_stream, http_blocking, zmq_leave, zmq_abort]

        async def run_wave(n: int) -> None:
            await asyncio.gather(*(rng.choice(actions)(rng.randint(0, MAX_TOKENS + 1))
                                   for _ in range(n)))

        # Warm-up: connection pools, executor threads, the first swaps. (Each worker's copy
        # thread is there from its start: it does not wait for the first proactive move.)
        for i in range(10):
            await run_wave(wave)
            if i >= 1 and (await engine.stats())["memory"]["swap_out_bytes"]:
                break
        assert_pools_whole(await wait_all_blocks_free(engine, timeout=30))
        await asyncio.sleep(0.5)
        baseline = await resources(engine, s, base)
        all_pids = [os.getpid(), *engine._workers.executor.pids.values()]
        names_before = thread_names(all_pids)
        swapped_before = (await engine.stats())["memory"]["swap_out_bytes"]
        outcomes.clear()

        for start in range(0, streams, wave):
            await run_wave(min(wave, streams - start))
        await engine.abort("never-existed")  # unknown ids are ignored
        assert sum(outcomes.values()) == streams
        # Explicit aborts landed mid-stream, and some came after the end.
        assert outcomes.get("sdk abort -> abort") and outcomes.get("sdk abort -> length"), outcomes

        # Both block pools are back where they were before any of it.
        assert_pools_whole(await wait_all_blocks_free(engine, timeout=30))
        after = await settle(engine, s, base, baseline)
        grew = {k: (baseline[k], after[k]) for k in baseline if after[k] > baseline[k]}
        assert not grew, (f"grew (baseline, after): {grew}; thread names before "
                          f"{names_before}, after {thread_names(all_pids)}")
        stats = await engine.stats()
        assert stats["memory"]["integrity_errors"] == []
        assert stats["memory"]["swap_out_bytes"] > swapped_before  # aborts met moving KV
        await engine.check_integrity()
        # And it still serves.
        async with s.post(base + "/v1/completions",
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200


def aborts_config() -> SchedulerConfig:
    # A preemptive policy on a small device pool: jobs are demoted, swapped out and back
    # while they are being abandoned (each iteration charged as 10 ms, so a tiny quantum
    # is used up the same way on a fast or a loaded machine).
    return SchedulerConfig(policy="skip-join-mlfq", swap_policy="proactive",
                           policy_options=TINY_QUANTUM, max_num_seqs=8,
                           max_num_batched_tokens=96, measure_profile=False,
                           profile_cache_dir="", fixed_step_time_s=0.01)


async def test_1000_streams_aborted_at_random_points_leave_pools_fds_threads_and_tasks_flat(
    model_path,
):
    async with serving(aborts_config(), model_path, gpu_blocks=12,
                       host_blocks=256) as (engine, base, zaddr):
        await abort_at_random_points(engine, base, zaddr, streams=1000, wave=50, seed=7)


@pytest.mark.slow
async def test_aborted_streams_leave_every_tensor_parallel_rank_flat(model_path):
    async with serving(aborts_config(), model_path, tp=2, gpu_blocks=12,
                       host_blocks=256) as (engine, base, zaddr):
        assert sorted(engine._workers.executor.pids) == [0, 1]
        await abort_at_random_points(engine, base, zaddr, streams=150, wave=25, seed=11)
