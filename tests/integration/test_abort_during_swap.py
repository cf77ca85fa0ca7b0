"""Aborts that land while a job's KV is being copied, on the real engine and worker.

Two batches in flight on one worker: the scheduler plans step N+1 (which moves a job's KV
between the device and host pools) and sends it before it applies step N's result, so an
abort sent as the plan leaves is applied while that copy is queued or running on the
worker. The aborted job's stream ends with ``abort``, aborting it again (and after its end)
does nothing, both pools come back whole, and every other job -- whose KV may be written
into the freed blocks by the very next step -- still gets exactly the tokens it gets alone.
(The unit test tests/unit/test_abort_during_swap.py checks every interleaving on the core.)
"""

from __future__ import annotations

import asyncio

import pytest

from engine.api import Engine
from engine.config import ParallelConfig, SchedulerConfig
from engine.memory.block_manager import Residency
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]

PROMPTS = [[(11 * i + 7 * n) % 480 + 3 for i in range(n)] for n in (5, 9, 14, 7, 12, 6, 10, 8)]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
VICTIMS = 3  # jobs aborted while their KV moves (only odd-numbered prompts are candidates)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


async def test_jobs_aborted_while_their_kv_is_copied_free_it_and_others_keep_their_tokens(
    model_path,
):
    cfg = tiny_engine_config(model_path, gpu_blocks=14, host_blocks=64).replace(
        scheduler=SchedulerConfig(
            policy="mlfq", swap_policy="proactive", max_num_seqs=3, max_num_batched_tokens=64,
            policy_options=(("base_quantum_s", 0.02), ("quantum_ratio", 2.0)),
            fixed_step_time_s=0.01),  # demotions by iterations: the same on any machine
        parallel=ParallelConfig(torch_threads=1, max_batches_in_flight=2))
    engine = await Engine.create(cfg)
    try:
        alone = [await collect(engine, p, GREEDY) for p in PROMPTS]  # one at a time: no swaps
        actor = engine._workers.scheduler
        core = actor.core
        assert core.pipeline_depth == 2
        ids = {}  # request id -> prompt index
        aborted: dict[str, str] = {}  # request id -> direction its KV was moving
        schedule = core.schedule

        def schedule_and_abort_what_moves(now: float):
            plan = schedule(now)
            if len(aborted) < VICTIMS:
                host_out = {h for _, h in plan.swap_out + plan.offload}
                gpu_in = {g for _, g in plan.swap_in + plan.prefetch}
                for jid in core.jobs:
                    if jid in aborted or ids.get(jid, 0) % 2 == 0:
                        continue
                    if core.blocks.residency(jid) is Residency.HOST and \
                            host_out & set(core.blocks._host_tables[jid]):
                        direction = "to host"
                    elif core.blocks.residency(jid) is Residency.GPU and \
                            gpu_in & set(core.blocks.gpu_table(jid)):
                        direction = "to device"
                    else:
                        continue
                    aborted[jid] = direction
                    # Applied once this plan is sent, before its result: mid-copy.
                    actor.tell("abort", jid)
                    actor.tell("abort", jid)  # twice: a no-op the second time
                    break
            return plan

        core.schedule = schedule_and_abort_what_moves
        try:
            rids = [f"req-{i}" for i in range(len(PROMPTS))]
            ids.update({rid: i for i, rid in enumerate(rids)})
            got = await asyncio.wait_for(asyncio.gather(*(
                collect(engine, p, GREEDY, request_id=rid) for p, rid in zip(PROMPTS, rids))), 120)
        finally:
            core.schedule = schedule
        assert aborted, "no job was aborted while its KV moved"
        assert "to host" in aborted.values()
        for rid, (tokens, _, reason) in zip(rids, got):
            if rid in aborted:
                assert reason == "abort", (rid, aborted[rid])
                await engine.abort(rid)  # after its end: ignored
            else:
                want = alone[ids[rid]][0]
                assert (tokens, reason) == (want, "length"), rid
        stats = await wait_all_blocks_free(engine)
        assert_pools_whole(stats)
        assert stats["memory"]["integrity_errors"] == []
        await engine.check_integrity()
        tokens, _, reason = await collect(engine, PROMPTS[0], GREEDY)
        assert (tokens, reason) == (alone[0][0], "length")
    finally:
        await engine.shutdown()
