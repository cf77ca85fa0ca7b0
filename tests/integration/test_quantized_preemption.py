"""Preemption stays invisible on the quantized path: with int4 weights (int8 head), jobs
preempted and swapped to host, or dropped and recomputed, produce exactly the greedy tokens
they produce alone on the same quantized engine."""

from __future__ import annotations

import asyncio
import random

import pytest
import pytest_asyncio

from engine.api import Engine
from engine.config import ModelConfig, SchedulerConfig
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = pytest.mark.asyncio(loop_scope="module")

JOBS, PROMPT, OUTPUT = 16, 24, 16  # 16 x 40 tokens = 5x the 128-token pool
GPU_BLOCKS, BLOCK = 32, 4
TINY_QUANTUM = (("base_quantum_s", 0.002), ("quantum_ratio", 2.0))


def quantized_config(path: str, **kw):
    cfg = tiny_engine_config(path, **kw)
    return cfg.replace(model=ModelConfig(path=path, dtype="float32", quantization="int4"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama-int4")))


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(7)
    return [[rng.randrange(3, 500) for _ in range(PROMPT)] for _ in range(JOBS)]


PARAMS = SamplingParams(max_tokens=OUTPUT, temperature=0.0, ignore_eos=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alone(model_path, workload):
    engine = await Engine.create(quantized_config(model_path))
    try:
        return [(await collect(engine, p, PARAMS))[0] for p in workload]
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("swap", ["reactive", "recompute"])
async def test_preempted_quantized_jobs_produce_their_uninterrupted_tokens(
    model_path, workload, alone, swap
):
    cfg = quantized_config(model_path, gpu_blocks=GPU_BLOCKS, host_blocks=256)
    cfg = cfg.replace(
        scheduler=SchedulerConfig(
            policy="skip-join-mlfq",
            swap_policy=swap,
            policy_options=TINY_QUANTUM,
            # Eight 40-token jobs at once need 2.5x the pool: growing jobs must be preempted
            # whatever the timing (two at a time would fit and leave it to the quantum).
            max_num_seqs=8,
            max_num_batched_tokens=64,
        )
    )
    engine = await Engine.create(cfg)
    try:
        assert engine.model_info is not None
        finals = []

        async def one(prompt):
            ids, stats = [], {}
            async for out in engine.generate(prompt, PARAMS):
                ids.extend(out.token_ids)
                if out.finished:
                    stats = out.stats
            finals.append(stats)
            return ids

        got = await asyncio.wait_for(asyncio.gather(*(one(p) for p in workload)), 120)
        assert got == alone
        if swap == "recompute":
            assert sum(s["recomputes"] for s in finals) > 0
        else:
            assert sum(s["swap_outs"] for s in finals) > 0
        assert_pools_whole(await wait_all_blocks_free(engine))
    finally:
        await engine.shutdown()
