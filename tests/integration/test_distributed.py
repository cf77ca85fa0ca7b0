"""Tensor- and pipeline-parallel workers (gloo on CPU) give the single-process engine's
greedy tokens, keep every rank's KV share in step through swaps, and fail fast when a rank
dies.

Each layout starts T x P real worker processes (one torch thread each) that rendezvous over
127.0.0.1; the reference is a one-worker engine on the same weights and prompts.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import pytest_asyncio

from engine.api import Engine, EngineDeadError
from engine.config import ParallelConfig, SchedulerConfig
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

LAYOUTS = [(2, 1), (1, 2), (2, 2)]
PROMPT_LENS = (1, 6, 19, 33)
NEW_TOKENS = 10
TINY_QUANTUM = (("base_quantum_s", 0.002), ("quantum_ratio", 2.0))  # demotions on a tiny model


def parallel(tp: int, pp: int) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, torch_threads=1,
                          step_timeout_s=60.0, startup_timeout_s=120.0)


def prompts(seed: int, lens=PROMPT_LENS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lens]


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "opt"])
def arch_path(request, tmp_path_factory):
    # 4 layers so that every stage of a 2-stage pipeline holds two.
    return request.param, make_tiny_model_dir(request.param, str(tmp_path_factory.mktemp(request.param)),
                                              num_hidden_layers=4)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(arch_path):
    """The single-process engine's greedy tokens for every prompt, run concurrently."""
    _, path = arch_path
    engine = await Engine.create(tiny_engine_config(path))
    try:
        got = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts(0)))
        return [ids for ids, _, _ in got]
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
async def test_greedy_tokens_equal_the_single_process_engine(arch_path, reference, tp, pp):
    _, path = arch_path
    engine = await Engine.create(tiny_engine_config(path).replace(parallel=parallel(tp, pp)))
    try:
        ranks = engine.worker_info["ranks"]
        assert sorted(ranks) == list(range(tp * pp))
        assert len({r["pid"] for r in ranks.values()}) == tp * pp
        got = await asyncio.wait_for(asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts(0))), 120)
        assert [ids for ids, _, _ in got] == reference
        assert all(reason == "length" for _, _, reason in got)
        assert_pools_whole(await wait_all_blocks_free(engine))
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------ swaps under (2, 2)

SWAP_PROMPTS = prompts(7, (20,) * 8)  # 8 jobs x 30 tokens = 240 tokens of KV for a 64-token pool


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama-swap")), num_hidden_layers=4)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def swap_reference(llama_path):
    engine = await Engine.create(tiny_engine_config(llama_path))
    try:
        return [(await collect(engine, p, GREEDY))[0] for p in SWAP_PROMPTS]
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("swap", ["reactive", "proactive", "recompute"])
async def test_swap_cycles_under_tp2_pp2_move_every_ranks_share(llama_path, swap_reference, swap):
    cfg = tiny_engine_config(llama_path, gpu_blocks=16, host_blocks=128).replace(
        parallel=parallel(2, 2),
        scheduler=SchedulerConfig(policy="mlfq", swap_policy=swap, policy_options=TINY_QUANTUM,
                                  max_num_seqs=2, max_num_batched_tokens=64),
    )
    engine = await Engine.create(cfg)
    try:
        got = await asyncio.wait_for(asyncio.gather(*(collect(engine, p, GREEDY) for p in SWAP_PROMPTS)), 180)
        assert [ids for ids, _, _ in got] == swap_reference
        assert_pools_whole(await wait_all_blocks_free(engine))
        stats = await engine.stats()
        assert stats["memory"]["integrity_errors"] == []
        assert stats["num_preemptions"] > 0
        health = await engine._executor.call_all("health")
        moved = {rank: h["moved_blocks"] for rank, h in health.items()}
        assert len(set(moved.values())) == 1, f"ranks moved different blocks: {moved}"
        mem = stats["memory"]
        assert moved[0] == mem["swap_out_blocks"] + mem["swap_in_blocks"]
        if swap == "recompute":
            assert moved[0] == 0
        else:
            assert moved[0] > 0
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------ failure


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("victim", ["non-driver", "driver"])
async def test_killing_a_rank_mid_stream_fails_every_stream_fast_and_reaps_all(llama_path, victim):
    engine = await Engine.create(tiny_engine_config(llama_path).replace(parallel=parallel(1, 2)))
    pids = dict(engine._executor.pids)
    try:
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        started = asyncio.Event()

        async def stream(prompt):
            async for out in engine.generate(prompt, params):
                if out.token_ids:
                    started.set()
            return "finished"

        tasks = [asyncio.create_task(stream(p)) for p in prompts(3, (4, 9, 15))]
        await asyncio.wait_for(started.wait(), 60)
        rank = engine._executor.driver if victim == "driver" else 0
        os.kill(pids[rank], signal.SIGKILL)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert time.monotonic() - t0 < 10
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert not engine.is_serving
    finally:
        await engine.shutdown()
    assert all(_gone(pid) for pid in pids.values()), pids
