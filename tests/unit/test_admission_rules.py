"""Admission rules for jobs whose KV is not on the GPU (``AdmissionRules``): who may evict
whom to get in, the room kept free for the running jobs' growth, and the proactive swap
policy sparing jobs that just ran. Small hand-built pools; every decision is asserted."""

from __future__ import annotations

import pytest

from engine.memory.block_manager import BlockManager, Residency
from engine.memory.proactive import ProactivePolicy
from engine.memory.swap import ReactivePolicy
from engine.policies.base import AdmissionRules
from engine.policies.fcfs import FCFSPolicy
from engine.policies.mlfq import MLFQPolicy
from engine.policies.oracle import OracleSRPTPolicy
from engine.policies.skip_join import SkipJoinMLFQPolicy
from engine.request import JobState

from .fakes import VirtualClock, make_job, make_scheduler, run_step, run_until_idle
from .policy_fakes import ids

# Queue 0 lasts one 10 ms step, so a job that ran once sits below a new arrival.
QUICK = {"base_quantum_s": 0.01, "starvation_limit_s": None}
NO_RESERVE = {"admission_reserve_frac": 0.0}
STRICT = {"evict_to_admit": True, "admission_reserve_frac": 0.0}


def _two_running_jobs_fill_the_pool(policy_options: dict):
    """8 GPU blocks of 4 tokens: ``a`` and ``b`` (12-token prompts, 4 output tokens: 4
    blocks each at most) prefill and decode once, filling the pool; then ``new`` (a 4-token
    prompt, 1 block) arrives: it is the most urgent job (queue 0, the others were demoted)
    and no block is free."""
    s = make_scheduler(MLFQPolicy(**QUICK, **policy_options), ReactivePolicy(), gpu_blocks=8,
                       host_blocks=16, block_size=4)
    clock = VirtualClock()
    a, b = make_job("a", 12, 4), make_job("b", 12, 4)
    s.add(a, 0.0)
    s.add(b, 0.0)
    run_step(s, clock)  # both prefill: 3 blocks each
    run_step(s, clock)  # both feed token 13: 4 blocks each, the pool is full
    assert s.blocks.num_free_gpu_blocks == 0
    new = make_job("new", 4, 2, arrival=clock.now)
    s.add(new, clock.now)
    return s, clock, a, b, new


def test_a_new_job_waits_for_free_room_instead_of_evicting_a_running_job():
    s, clock, a, b, new = _two_running_jobs_fill_the_pool(NO_RESERVE)
    assert ids(s.policy.order(clock.now))[0] == "new"
    plan = run_step(s, clock)
    assert ids(x.job for x in plan.seqs) == ["a", "b"]  # both keep running...
    assert not plan.swap_out and a.stats.preemptions == b.stats.preemptions == 0  # ...untouched
    assert new.state is JobState.WAITING and new.num_computed_tokens == 0
    run_until_idle(s, clock)
    assert s.num_preemptions == 0 and len(new.output_ids) == 2
    assert new.stats.first_scheduled_time >= min(a.stats.finish_time, b.stats.finish_time)


def test_strict_priority_evicts_a_running_job_for_the_new_one():
    s, clock, _, b, new = _two_running_jobs_fill_the_pool(STRICT)
    plan = run_step(s, clock)
    assert new.job_id in ids(x.job for x in plan.seqs) and plan.swap_out
    assert b.state is JobState.SWAPPED and b.stats.preemptions == 1  # the lowest in the order


def _swapped_job_becomes_the_most_urgent(policy_options: dict):
    """4 GPU blocks of 4 tokens. ``hi`` (7-token prompt) and ``lo`` (4) run two steps and
    fill the pool; on the third ``hi`` needs a block and evicts ``lo``, the lower of the
    two, to the host. ``hi`` has now had more service (queue 2) than ``lo`` (queue 1), so
    ``lo`` heads the order while ``hi`` holds 3 of the 4 blocks."""
    s = make_scheduler(MLFQPolicy(**QUICK, **policy_options), ReactivePolicy(), gpu_blocks=4,
                       host_blocks=8, block_size=4)
    clock = VirtualClock()
    hi, lo = make_job("hi", 7, 6), make_job("lo", 4, 3)
    s.add(hi, 0.0)
    s.add(lo, 0.0)
    for _ in range(3):
        run_step(s, clock)
    assert lo.state is JobState.SWAPPED and ids(s.policy.order(clock.now)) == ["lo", "hi"]
    assert s.blocks.num_free_gpu_blocks == 1  # lo needs 2 to come back
    return s, clock, hi, lo


def test_a_swapped_out_job_comes_back_only_into_free_room():
    s, clock, hi, lo = _swapped_job_becomes_the_most_urgent(NO_RESERVE)
    plan = run_step(s, clock)
    assert ids(x.job for x in plan.seqs) == ["hi"] and not plan.swap_out and not plan.swap_in
    run_until_idle(s, clock)
    assert hi.stats.preemptions == 0 and lo.stats.swap_ins == 1
    assert len(lo.output_ids) == 3 and len(hi.output_ids) == 6


def test_strict_priority_swaps_the_running_job_out_to_bring_the_urgent_one_back():
    s, clock, hi, lo = _swapped_job_becomes_the_most_urgent(STRICT)
    plan = run_step(s, clock)
    assert ids(x.job for x in plan.seqs) == [lo.job_id] and plan.swap_out and plan.swap_in
    assert hi.state is JobState.SWAPPED and hi.stats.preemptions == 1


def test_a_new_job_leaves_the_reserve_free_while_others_are_resident():
    """20 blocks, reserve 10 % = 2 blocks. ``r`` holds 12 (8 free); ``p`` (5 blocks) leaves
    3 free and starts; ``q`` (5 more) would leave none and waits, though it is ahead of
    ``tiny`` (1 block), which leaves exactly the reserve and starts."""
    s = make_scheduler(MLFQPolicy(**QUICK, admission_reserve_frac=0.1), ReactivePolicy(),
                       gpu_blocks=20, host_blocks=0, block_size=4)
    clock = VirtualClock()
    s.add(make_job("r", 47, 40), 0.0)
    run_step(s, clock)  # r: 47 tokens, 12 blocks
    for jid, prompt in (("p", 20), ("q", 20), ("tiny", 4)):
        s.add(make_job(jid, prompt, 4, arrival=clock.now), clock.now)
    plan = run_step(s, clock)
    assert ids(x.job for x in plan.seqs) == ["p", "tiny", "r"]
    assert s.blocks.residency("q") is Residency.NONE
    assert s.blocks.num_free_gpu_blocks == 20 - 12 - 5 - 1 == 2  # exactly the reserve


def test_the_reserve_is_waived_when_nothing_else_is_resident():
    s = make_scheduler(MLFQPolicy(**QUICK, admission_reserve_frac=0.5), ReactivePolicy(),
                       gpu_blocks=8, host_blocks=0, block_size=4)
    big = make_job("big", 31, 1)  # 32 tokens with its output: the whole pool
    s.add(big, 0.0)
    run_until_idle(s, VirtualClock())
    assert len(big.output_ids) == 1


def test_in_order_admission_lets_no_smaller_job_slip_past_a_more_urgent_one():
    def first_step_without(in_order: bool) -> list[str]:
        s = make_scheduler(SkipJoinMLFQPolicy(prefill_s_per_token=1e-4, **QUICK, **NO_RESERVE,
                                              admission_in_order=in_order),
                           ReactivePolicy(), gpu_blocks=8, host_blocks=0, block_size=4)
        clock = VirtualClock()
        s.add(make_job("r", 23, 30), 0.0)
        run_step(s, clock)  # r holds 6 blocks (23 tokens, room for its next one), 2 free
        # Same queue (short prompts): FIFO, so ``wide`` (3 blocks) is ahead of ``thin`` (1).
        s.add(make_job("wide", 12, 2, arrival=clock.now), clock.now)
        s.add(make_job("thin", 3, 2, arrival=clock.now), clock.now)
        return ids(x.job for x in run_step(s, clock).seqs)

    assert first_step_without(in_order=False) == ["thin", "r"]
    assert first_step_without(in_order=True) == ["r"]


def test_rules_are_waived_when_nothing_at_all_could_run():
    """``r`` fills the pool and needs a 5th block, which no job below it can give, and
    ``new``, above it, may not evict it. Rather than an empty batch forever, the iteration
    is planned again without the rules: ``new`` evicts ``r``."""
    s = make_scheduler(MLFQPolicy(**QUICK, **NO_RESERVE), ReactivePolicy(), gpu_blocks=4,
                       host_blocks=8, block_size=4)
    clock = VirtualClock()
    r = make_job("r", 15, 4)
    s.add(r, 0.0)
    run_step(s, clock)  # r prefills 15 tokens...
    run_step(s, clock)  # ...and feeds its 16th: the pool is full
    new = make_job("new", 2, 2, arrival=clock.now)
    s.add(new, clock.now)
    plan = run_step(s, clock)
    assert ids(x.job for x in plan.seqs) == ["new"] and plan.swap_out
    assert r.state is JobState.SWAPPED


def test_fcfs_and_the_oracle_keep_strict_priority_unless_told_otherwise():
    assert FCFSPolicy().admission.strict and OracleSRPTPolicy().admission.strict
    told = OracleSRPTPolicy(evict_to_admit=False, admission_reserve_frac=0.05)
    assert told.admission == AdmissionRules(False, 0.05, False)
    default = SkipJoinMLFQPolicy()
    assert default.admission == AdmissionRules(evict_to_admit=False, reserve_frac=0.05)
    assert default.describe()["admission_reserve_frac"] == 0.05
    assert FCFSPolicy(evict_to_admit=False).describe()["evict_to_admit"] is False


@pytest.mark.parametrize("bad", [
    {"reserve_frac": 0.1},  # with evict_to_admit True: would evict to keep the reserve free
    {"evict_to_admit": False, "reserve_frac": 1.0},
    {"evict_to_admit": False, "reserve_frac": -0.1},
])
def test_admission_rules_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        AdmissionRules(**bad)


@pytest.mark.parametrize("bad", [{"evict_to_admit": 1}, {"in_order": "yes"},
                                 {"evict_to_admit": False, "reserve_frac": "0.1"}])
def test_admission_rules_refuse_mistyped_values(bad):
    with pytest.raises(TypeError):
        AdmissionRules(**bad)


def _resident(bm: BlockManager, jobs) -> None:
    for j in jobs:
        bm.allocate(j.job_id, 8)  # 2 blocks of 4 tokens each


def test_proactive_spares_a_job_that_ran_in_the_previous_batch():
    """``b`` ran last iteration but is left out of this one (e.g. by the token budget):
    offloading it would bring it straight back, so the idle ``c`` is offloaded instead."""
    bm = BlockManager(num_gpu_blocks=6, num_host_blocks=10, block_size=4)
    a, b, c = (make_job(x, 8, 4) for x in "abc")
    _resident(bm, [a, b, c])  # the pool is full
    policy = ProactivePolicy(headroom_blocks=2, lookahead=0)
    policy.plan(bm, [a, b, c], [a, b])  # the previous iteration ran a and b
    assert ids(policy.plan(bm, [a, b, c], [a]).swap_out) == ["c"]
    plain = ProactivePolicy(headroom_blocks=4, lookahead=0, spare_last_batch=False)
    plain.plan(bm, [a, b, c], [a, b])
    assert ids(plain.plan(bm, [a, b, c], [a]).swap_out) == ["c", "b"]


def test_proactive_refuses_a_mistyped_spare_last_batch():
    with pytest.raises(TypeError):
        ProactivePolicy(spare_last_batch=1)
