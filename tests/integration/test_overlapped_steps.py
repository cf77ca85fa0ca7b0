"""Overlapped steps on the real engine (worker process, ZeroMQ, a tiny llama): planning step
N+1 while step N runs changes nothing a client sees. The same mixed workload -- EOS,
max_tokens, stop strings, logprobs, preemption by swap and by recompute -- gives identical
greedy tokens, text, finish reasons and logprobs with ``overlap_steps`` on and off, and the
pools are whole afterwards."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.api import Engine
from engine.config import ParallelConfig, SchedulerConfig
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, tiny_engine_config, wait_all_blocks_free

pytestmark = pytest.mark.asyncio(loop_scope="module")

STEP_S = 0.002
TINY_QUANTUM = (("base_quantum_s", STEP_S), ("quantum_ratio", 2.0))
JOBS = 10


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


def workload() -> list[tuple[list[int], dict]]:
    rng = random.Random(11)
    jobs = []
    for i in range(JOBS):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(4, 30))]
        params = {"max_tokens": rng.randrange(2, 24), "temperature": 0.0,
                  "ignore_eos": i % 3 == 0, "logprobs": 2 if i % 4 == 1 else None}
        jobs.append((prompt, params))
    return jobs


async def run(path: str, overlap: bool, swap: str, stops: dict[int, list[str]] | None = None,
              parallel: ParallelConfig | None = None) -> tuple[list, dict]:
    cfg = tiny_engine_config(path, gpu_blocks=20, host_blocks=256)
    cfg = cfg.replace(
        scheduler=SchedulerConfig(policy="mlfq", swap_policy=swap, policy_options=TINY_QUANTUM,
                                  max_num_seqs=3, max_num_batched_tokens=64,
                                  fixed_step_time_s=STEP_S),
        parallel=parallel or ParallelConfig(torch_threads=1, overlap_steps="on" if overlap else "off"))
    engine = await Engine.create(cfg)
    try:
        async def one(i: int, prompt: list[int], params: dict):
            p = SamplingParams(**params, stop=(stops or {}).get(i, []))
            ids, text, lps, reason = [], "", [], None
            async for out in engine.generate(prompt, p):
                ids += out.token_ids
                text += out.text
                lps += out.logprobs or []
                reason = out.finish_reason
            return ids, text, lps, reason

        results = await asyncio.wait_for(
            asyncio.gather(*(one(i, p, params) for i, (p, params) in enumerate(workload()))), 120)
        stats = await wait_all_blocks_free(engine)
        assert_pools_whole(stats)
        assert stats["memory"]["integrity_errors"] == []
        stats["worker"] = await engine._workers.executor.call("health")
        return results, stats
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("swap", ["reactive", "recompute"])
async def test_overlapped_steps_give_identical_outputs_under_preemption_and_stop_strings(model_path, swap):
    plain, _ = await run(model_path, overlap=False, swap=swap)
    # A stop string from the middle of some jobs' own text: they must end just before it.
    stops = {i: [text[len(text) // 2:len(text) // 2 + 2]] for i, (_, text, _, _) in enumerate(plain)
             if len(text) >= 8 and i % 2 == 0}
    assert stops
    runs = [await run(model_path, overlap=o, swap=swap, stops=stops) for o in (False, True)]
    (off, off_stats), (on, on_stats) = runs
    assert [(ids, text, reason) for ids, text, _, reason in on] == \
        [(ids, text, reason) for ids, text, _, reason in off]
    # Logprobs agree to float rounding: batch composition (the dropped rows of finished jobs)
    # changes the logits' last bits, as any change of batch does.
    for (_, _, lp_on, _), (_, _, lp_off, _) in zip(on, off, strict=True):
        assert len(lp_on) == len(lp_off)
        for a, b in zip(lp_on, lp_off, strict=True):
            assert a[0] == pytest.approx(b[0], abs=1e-4)
            assert [t for t, _ in a[1]] == [t for t, _ in b[1]]
    assert on_stats["num_overlapped_steps"] > 0 and off_stats["num_overlapped_steps"] == 0
    assert on_stats["num_preemptions"] > 0
    assert {r for *_, r in on} >= {"stop", "length"}
    for i in stops:
        assert off[i][3] == "stop" and len(off[i][1]) < len(plain[i][1])


async def test_small_steps_on_one_thread_overlapped_give_the_same_tokens(model_path):
    """Two torch threads, steps of at most 2 rows on one of them (and overlapped, where that
    leaves the engine a core): the same greedy tokens as every step on both threads."""
    plain, plain_stats = await run(model_path, False, "reactive",
                                   parallel=ParallelConfig(torch_threads=2, small_step_rows=0,
                                                           overlap_steps="off"))
    small, stats = await run(model_path, False, "reactive",
                             parallel=ParallelConfig(torch_threads=2, small_step_rows=2))
    assert [(ids, text, reason) for ids, text, _, reason in small] == \
        [(ids, text, reason) for ids, text, _, reason in plain]
    assert plain_stats["worker"]["small_steps"] == 0
    assert 0 < stats["worker"]["small_steps"] < stats["worker"]["num_steps"]
    assert stats["num_overlapped_steps"] > 0
