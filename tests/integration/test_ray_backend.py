"""The Ray backend: the same worker ranks, started as Ray actors on a placement group of a
private local Ray instance, give the single-process engine's greedy tokens; a rank killed
under it fails every stream fast and the supervisor brings a fresh group up; and shutting
the engine down leaves no Ray process behind.

The reference is transformers' greedy generate on the same weights, which the
single-process engine matches token for token (test_engine_greedy.py).
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.api import Engine, EngineDeadError
from engine.config import ParallelConfig
from engine.parallel.ray_reaper import processes_naming
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import collect, tiny_engine_config
from .test_distributed import PROMPTS, hf_greedy

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.pop("RAY_ADDRESS", None)  # a private local instance, never a cluster around us

NEW_TOKENS = 8
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def _children() -> dict[int, int]:
    """pid -> parent pid of every process on this host."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    parents = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _all_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")), num_hidden_layers=2)
    return path, hf_greedy(path, PROMPTS[:4], NEW_TOKENS)


def ray_parallel(tp: int, pp: int) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, torch_threads=1,
                          distributed_executor_backend="ray", step_timeout_s=60.0,
                          startup_timeout_s=120.0, restart_backoff_s=0.1)


async def test_ray_ranks_give_the_single_process_tokens_and_leave_nothing_behind(model):
    import ray

    path, reference = model
    before = _descendants(os.getpid())
    engine = await Engine.create(tiny_engine_config(path).replace(parallel=ray_parallel(2, 1)))
    try:
        assert ray.is_initialized()
        ranks = engine.worker_info["ranks"]
        assert sorted(ranks) == [0, 1] and len({r["pid"] for r in ranks.values()}) == 2
        started = _descendants(os.getpid()) - before  # Ray's processes and the rank actors
        assert {r["pid"] for r in ranks.values()} <= started
        got = await asyncio.wait_for(asyncio.gather(*(collect(engine, p, GREEDY) for p in PROMPTS[:4])), 120)
        assert [ids for ids, _, _ in got] == reference
    finally:
        await engine.shutdown()
    assert not ray.is_initialized()  # it started Ray, so it stopped it
    assert await _all_gone(started) == set()


async def test_a_killed_ray_rank_fails_every_stream_fast_and_a_fresh_group_serves(model):
    path, reference = model
    before = _descendants(os.getpid())
    engine = await Engine.create(tiny_engine_config(path).replace(parallel=ray_parallel(1, 2)))
    seen: set[int] = set()
    try:
        seen |= _descendants(os.getpid()) - before
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        started = asyncio.Event()

        async def stream(prompt):
            async for out in engine.generate(prompt, params):
                if out.token_ids:
                    started.set()
            return "finished"

        tasks = [asyncio.create_task(stream(p)) for p in PROMPTS[:2]]
        await asyncio.wait_for(started.wait(), 60)
        os.kill(engine._workers.executor.pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert time.monotonic() - t0 < 10
        assert all(isinstance(r, EngineDeadError) for r in results), results
        # The supervisor stops the broken group (its actors, its Ray session) and starts anew.
        deadline = time.monotonic() + 120
        while engine.num_restarts == 0 or not engine.is_serving:
            assert time.monotonic() < deadline, "no fresh worker group"
            await asyncio.sleep(0.2)
        seen |= _descendants(os.getpid()) - before
        got = await asyncio.wait_for(collect(engine, PROMPTS[0], GREEDY), 60)
        assert got[0] == reference[0]
    finally:
        await engine.shutdown()
    assert await _all_gone(seen) == set()



def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _serve_with_ray(path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--model", path, "--dtype", "float32",
           "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
           "--torch-threads", "1", "--port", "0", "--zmq-address", "off", "--log-level", "INFO"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


async def test_a_sigkilled_engine_leaves_no_ray_process_and_no_ray_directory(model):
    # Nothing of the engine runs: Ray's GCS, raylet and the rank actors die with it, and the
    # reaper started beside the private instance kills the helper agents that would not.
    path, _ = model
    tmp = os.environ.get("TMPDIR", "/tmp")
    dirs_before = set(glob.glob(os.path.join(tmp, "fsray-*")))
    proc = _serve_with_ray(path)
    lines: list[str] = []
    try:
        ready = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if re.search(r"serving \S+ on http://", line):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert await asyncio.to_thread(ready.wait, 180), "".join(lines[-30:])
        new_dirs = set(glob.glob(os.path.join(tmp, "fsray-*"))) - dirs_before
        assert len(new_dirs) == 1, new_dirs
        ray_dir = new_dirs.pop()
        ray_procs = set(processes_naming(ray_dir))
        assert len(ray_procs) >= 3  # Ray's own processes, the rank actors and the reaper
        # Among them the ones that retitle themselves ("ray::..."): found by their tag.
        assert any(_title(p).startswith("ray::") for p in ray_procs), [_title(p) for p in ray_procs]
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)
        assert await _all_gone(ray_procs, timeout=40.0) == set(), "a Ray process outlived it"
        assert processes_naming(ray_dir) == []
        assert not os.path.exists(ray_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
