"""Preemption is invisible in the output: under every scheduling and swap policy, with KV
demand five times the GPU pool, every job completes with exactly the tokens it produces
when it runs alone and uninterrupted, and the pools are whole afterwards."""

from __future__ import annotations

import asyncio
import random

import pytest
import pytest_asyncio

from engine.api import Engine
from engine.config import SchedulerConfig
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 4
GPU_BLOCKS = 32  # 128 tokens of KV
JOBS = 16
PROMPT, OUTPUT = 24, 16  # 40 tokens each: 16 x 40 = 640 tokens = 5x the pool
TINY_QUANTUM = {"base_quantum_s": 0.002, "quantum_ratio": 2.0}  # forces demotions on a tiny model
# The pool holds about three whole jobs, the batch cap is two: idle jobs keep KV on the GPU,
# which is what proactive offloading moves out ahead of need.
MAX_SEQS = 2

CONFIGS = [
    ("fcfs", "reactive", ()),
    ("mlfq", "reactive", TINY_QUANTUM),
    ("priority", "reactive", (("mlfq", True), *TINY_QUANTUM.items())),
    ("skip-join-mlfq", "proactive", TINY_QUANTUM),
    ("skip-join-mlfq", "reactive", TINY_QUANTUM),
    ("skip-join-mlfq", "recompute", TINY_QUANTUM),
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(5)
    return [([rng.randrange(3, 500) for _ in range(PROMPT)], i % 4) for i in range(JOBS)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(model_path, workload):
    """Each job alone on a roomy engine: no contention, no preemption."""
    engine = await Engine.create(tiny_engine_config(model_path))
    try:
        return [
            (await collect(engine, p, SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)))[0]
            for p, _ in workload
        ]
    finally:
        await engine.shutdown()


async def collect_with_stats(engine: Engine, prompt, params: SamplingParams) -> tuple[list[int], dict]:
    ids: list[int] = []
    stats: dict = {}
    async for out in engine.generate(prompt, params):
        ids.extend(out.token_ids)
        if out.finished:
            stats = out.stats
    return ids, stats


def _options(opts) -> tuple:
    return tuple(opts.items()) if isinstance(opts, dict) else tuple(opts)


@pytest.mark.parametrize("policy,swap,opts", CONFIGS, ids=[f"{p}+{s}" for p, s, _ in CONFIGS])
async def test_all_jobs_complete_with_uninterrupted_tokens_under_5x_kv_demand(
    model_path, workload, reference, policy, swap, opts
):
    cfg = tiny_engine_config(model_path, gpu_blocks=GPU_BLOCKS, host_blocks=256)
    cfg = cfg.replace(scheduler=SchedulerConfig(
        policy=policy, swap_policy=swap, policy_options=_options(opts), max_num_seqs=MAX_SEQS, max_num_batched_tokens=64))
    engine = await Engine.create(cfg)
    try:
        async def one(prompt, prio):
            params = SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True, priority=prio)
            finals = []
            ids = []
            async for out in engine.generate(prompt, params):
                ids.extend(out.token_ids)
                if out.finished:
                    finals.append(out)
            return ids, finals[-1]

        results = await asyncio.wait_for(asyncio.gather(*(one(p, prio) for p, prio in workload)), 120)
        for (ids, final), want in zip(results, reference):
            assert ids == want
            assert final.finish_reason == "length"
        stats = [final.stats for _, final in results]
        if policy == "fcfs":  # runs jobs to completion in arrival order: nothing to preempt
            assert sum(s["preemptions"] for s in stats) == 0
        elif swap == "recompute":
            assert sum(s["recomputes"] for s in stats) > 0 and sum(s["swap_outs"] for s in stats) == 0
        else:
            assert sum(s["swap_outs"] for s in stats) > 0
            assert all(s["swap_ins"] == s["swap_outs"] for s in stats)  # every job came back
        if policy != "fcfs":
            assert sum(s["demotions"] for s in stats) > 0
            assert sum(s["preemptions"] for s in stats) > 0 or swap == "proactive"
        assert_pools_whole(await wait_all_blocks_free(engine))
        mem = (await engine.stats())["memory"]
        assert mem["integrity_errors"] == []
        if swap == "proactive":
            assert mem["proactive_out_blocks"] + mem["proactive_in_blocks"] > 0
    finally:
        await engine.shutdown()


async def test_host_pool_full_falls_back_to_recompute(model_path, workload, reference):
    cfg = tiny_engine_config(model_path, gpu_blocks=GPU_BLOCKS, host_blocks=12)
    cfg = cfg.replace(scheduler=SchedulerConfig(policy="mlfq", swap_policy="reactive",
                                                policy_options=_options(TINY_QUANTUM), max_num_seqs=8))
    engine = await Engine.create(cfg)
    try:
        params = SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)
        got = await asyncio.wait_for(asyncio.gather(*(collect_with_stats(engine, p, params) for p, _ in workload)), 120)
        assert [ids for ids, _ in got] == reference
        stats = [s for _, s in got]
        assert sum(s["swap_outs"] for s in stats) > 0  # the host pool was used...
        assert sum(s["recomputes"] for s in stats) > 0  # ...and ran out
        assert_pools_whole(await wait_all_blocks_free(engine))
    finally:
        await engine.shutdown()


async def test_seeded_sampling_is_identical_across_swap_cycles(model_path, workload):
    """A sampled (not greedy) job draws from its own generator exactly once per token, so
    being swapped out and in any number of times cannot change what it samples."""
    params = [SamplingParams(max_tokens=OUTPUT, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)
              for i in range(JOBS)]
    roomy = await Engine.create(tiny_engine_config(model_path))
    try:
        alone = [(await collect(roomy, p, sp))[0] for (p, _), sp in zip(workload, params)]
    finally:
        await roomy.shutdown()
    cfg = tiny_engine_config(model_path, gpu_blocks=GPU_BLOCKS, host_blocks=256)
    cfg = cfg.replace(scheduler=SchedulerConfig(policy="mlfq", swap_policy="reactive",
                                                policy_options=_options(TINY_QUANTUM), max_num_seqs=8))
    engine = await Engine.create(cfg)
    try:
        got = await asyncio.wait_for(
            asyncio.gather(*(collect(engine, p, sp) for (p, _), sp in zip(workload, params))), 120)
        assert [ids for ids, _, _ in got] == alone
        assert (await engine.stats())["memory"]["swap_out_blocks"] > 0
    finally:
        await engine.shutdown()
