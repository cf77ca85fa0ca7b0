"""Penalties, logit_bias and min_tokens stay exact when jobs are preempted: swapped to host
and back, or dropped and recomputed. With KV demand well past the GPU pool, every job's
tokens equal the ones it produces alone on a roomy engine, and those equal greedy decoding
over transformers' logits with the processors applied by an independent reference
(``tests/logit_reference.py``). A recomputed job re-feeds its tokens without counting
them again; a job left out of steps keeps its counts."""

from __future__ import annotations

import asyncio
import random

import pytest
import pytest_asyncio

from engine.api import Engine
from engine.config import SchedulerConfig
from engine.sampling import SamplingParams
from tests import logit_reference as reference
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

GPU_BLOCKS = 32  # 128 tokens of KV, block size 4
JOBS = 8
PROMPT, OUTPUT = 24, 16  # 8 x 40 tokens = 2.5x the pool
STEP_S = 0.002  # charged per iteration whatever it measured: quanta count iterations
TINY_QUANTUM = (("base_quantum_s", STEP_S), ("quantum_ratio", 2.0))
# Negative penalties (favouring repetition) change a random model's greedy output surely;
# positive ones only once it repeats itself.
VARIANTS = [
    {"repetition_penalty": 1.8, "frequency_penalty": -1.5},
    {"frequency_penalty": 1.2, "presence_penalty": -2.0},
    {"presence_penalty": 2.0, "logit_bias": {"7": 8.0, "100": -100}},
    {"repetition_penalty": 0.5, "frequency_penalty": 0.4},
    {"frequency_penalty": 2.0, "min_tokens": 10},  # + a stop id, chosen per job below
]


def params_for(i: int, stop_id: int | None) -> SamplingParams:
    v = dict(VARIANTS[i % len(VARIANTS)])
    if "min_tokens" in v and stop_id is not None:
        v["stop_token_ids"] = (stop_id,)
    return SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True, **v)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def workload(model_path):
    """(prompt, params, reference tokens) per job. A min_tokens job stops on the token plain
    greedy decoding would give first, so the mask has something to hold back."""
    rng = random.Random(7)
    hf = reference.load_hf(model_path)
    jobs = []
    for i in range(JOBS):
        prompt = [rng.randrange(3, 500) for _ in range(PROMPT)]
        plain = reference.greedy(hf, prompt, SamplingParams(max_tokens=OUTPUT, temperature=0.0,
                                                            ignore_eos=True))
        params = params_for(i, plain[0])
        jobs.append((prompt, params, reference.greedy(hf, prompt, params), plain))
    return jobs


async def test_the_processors_change_the_reference(workload):
    """Not vacuous: the penalised references differ from plain greedy decoding, and the
    min_tokens jobs generate past their stop id's first chance."""
    assert all(ref != plain for _, _, ref, plain in workload)
    for _, params, ref, plain in workload:
        if params.min_tokens:
            assert plain[0] not in ref[: params.min_tokens]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alone(model_path, workload):
    engine = await Engine.create(tiny_engine_config(model_path))
    try:
        return [(await collect(engine, p, params))[0] for p, params, _, _ in workload]
    finally:
        await engine.shutdown()


async def test_each_job_alone_equals_the_reference(workload, alone):
    for (_, _, ref, _), got in zip(workload, alone):
        assert got == ref


@pytest.mark.parametrize("swap", ["reactive", "recompute"])
async def test_preempted_jobs_keep_exact_counts(model_path, workload, alone, swap):
    cfg = tiny_engine_config(model_path, gpu_blocks=GPU_BLOCKS, host_blocks=256)
    cfg = cfg.replace(scheduler=SchedulerConfig(
        policy="mlfq", swap_policy=swap, policy_options=TINY_QUANTUM, max_num_seqs=2,
        max_num_batched_tokens=64, fixed_step_time_s=STEP_S))
    engine = await Engine.create(cfg)
    try:
        async def one(prompt, params):
            ids, stats = [], {}
            async for out in engine.generate(prompt, params):
                ids.extend(out.token_ids)
                if out.finished:
                    stats = out.stats
            return ids, stats

        got = await asyncio.wait_for(
            asyncio.gather(*(one(p, params) for p, params, _, _ in workload)), 200)
        assert [ids for ids, _ in got] == alone
        stats = [s for _, s in got]
        if swap == "recompute":
            assert sum(s["recomputes"] for s in stats) > 0
        else:
            assert sum(s["swap_outs"] for s in stats) > 0
        assert sum(s["preemptions"] for s in stats) > 0
        assert_pools_whole(await wait_all_blocks_free(engine))
    finally:
        await engine.shutdown()
