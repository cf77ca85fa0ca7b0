"""Every failure check covers every worker rank: under tensor parallelism a rank other
than the driver that dies (SIGKILL) or hangs (SIGSTOP: alive and silent, caught by the
step deadline) fails every in-flight stream with an error; the supervisor replaces the
whole worker group (no rank of the old one is left), and the engine serves again.
(Pipeline ranks: tests/integration/test_distributed.py kills either stage.)
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from engine.api import Engine, EngineDeadError
from engine.config import ParallelConfig
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow,
              pytest.mark.timeout(300)]

STEP_TIMEOUT_S = 3.0  # the deadline that catches a hung rank
PROMPTS = [[(5 * i + n) % 400 + 3 for i in range(n)] for n in (3, 9, 17)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _until(condition, limit: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.1)


async def _fail_rank_and_heal(engine: Engine, rank: int, sig: signal.Signals, restarts: int) -> None:
    old = dict(engine._workers.executor.pids)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    started = asyncio.Event()

    async def stream(prompt: list[int]) -> str:
        async for out in engine.generate(prompt, params):
            if out.token_ids:
                started.set()
        return "finished"

    tasks = [asyncio.create_task(stream(p)) for p in PROMPTS]
    await asyncio.wait_for(started.wait(), 60)
    os.kill(old[rank], sig)
    detect = STEP_TIMEOUT_S if sig == signal.SIGSTOP else 0.0
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                     5 + detect + 10)
    assert all(isinstance(r, EngineDeadError) for r in results), results
    await _until(lambda: engine.is_serving and engine.num_restarts == restarts, 60,
                 "the engine did not heal within 60 s")
    new = engine._workers.executor.pids
    assert sorted(new) == sorted(old)
    assert not set(new.values()) & set(old.values()), "the whole group must be replaced"
    await _until(lambda: not any(_alive(p) for p in old.values()), 15,
                 "a rank of the failed group was left running")
    ids, _, reason = await collect(engine, PROMPTS[1], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(ids) == 4 and reason == "length"
    assert_pools_whole(await wait_all_blocks_free(engine))


async def test_a_non_driver_tensor_parallel_rank_killed_or_hung_fails_streams_then_heals(
    model_path,
):
    cfg = tiny_engine_config(model_path).replace(parallel=ParallelConfig(
        tensor_parallel_size=2, torch_threads=1, step_timeout_s=STEP_TIMEOUT_S,
        startup_timeout_s=120.0, restart_backoff_s=0.2))
    engine = await Engine.create(cfg)
    everyone: set[int] = set()
    try:
        assert engine._workers.executor.driver == 0  # so rank 1 is not the one that replies
        everyone |= set(engine._workers.executor.pids.values())
        await _fail_rank_and_heal(engine, 1, signal.SIGKILL, restarts=1)
        everyone |= set(engine._workers.executor.pids.values())
        await _fail_rank_and_heal(engine, 1, signal.SIGSTOP, restarts=2)
        everyone |= set(engine._workers.executor.pids.values())
    finally:
        await engine.shutdown()
    assert not [p for p in everyone if _alive(p)]
