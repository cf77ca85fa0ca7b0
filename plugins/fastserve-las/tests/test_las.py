"""The LAS policy, as a specification: on its own, and driving the real scheduler core
on a virtual clock with fake tokens (no model, no processes, milliseconds)."""

from __future__ import annotations

import pytest
from fastserve_las import LeastAttainedServicePolicy

from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.memory.swap import RecomputePolicy
from engine.request import Job
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler

STEP_S = 0.01  # virtual seconds per iteration


def job(jid: str, arrival: float = 0.0, max_tokens: int = 8) -> Job:
    return Job(jid, [5, 6, 7, 8], SamplingParams(max_tokens=max_tokens, temperature=0.0), arrival)


def ids(jobs) -> list[str]:
    return [j.job_id for j in jobs]


def test_least_served_job_comes_first_ties_by_arrival():
    p = LeastAttainedServicePolicy()
    a, b, c = job("a", 0.0), job("b", 1.0), job("c", 2.0)
    for j in (a, b, c):
        p.admit(j, j.arrival_time)
    assert ids(p.order(2.0)) == ["a", "b", "c"]
    p.charge(a, 0.05, 2.05)
    assert ids(p.order(2.05)) == ["b", "c", "a"]
    p.remove(b)
    assert ids(p.order(2.05)) == ["c", "a"]


def test_quantum_bands_keep_arrival_order_within_a_band():
    p = LeastAttainedServicePolicy(quantum_s=0.1)
    a, b = job("a", 0.0), job("b", 1.0)
    p.admit(a, 0.0)
    p.admit(b, 1.0)
    p.charge(a, 0.05, 1.0)  # still in band 0: a keeps its place
    assert ids(p.order(1.0)) == ["a", "b"]
    p.charge(a, 0.05, 1.1)  # band 1
    assert ids(p.order(1.1)) == ["b", "a"]


@pytest.mark.parametrize("bad", [-1.0, float("inf"), "0.1", True])
def test_bad_quantum_is_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        LeastAttainedServicePolicy(quantum_s=bad)


def test_a_new_job_overtakes_one_that_has_run():
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), LeastAttainedServicePolicy(),
                      RecomputePolicy(), BlockManager(64, 0, 4))
    now, ran = 0.0, []
    sched.add(job("old", 0.0), now)
    for step in range(8):
        if step == 3:
            sched.add(job("new", now), now)
        plan = sched.schedule(now)
        ran += ids(s.job for s in plan.seqs)
        now += STEP_S
        sched.update(plan, {s.job.job_id: 9 for s in plan.seqs if s.sample}, STEP_S, now)
        sched.check_integrity()
    # new runs until it has as much service as old; then they alternate (ties: arrival).
    assert ran == ["old"] * 3 + ["new"] * 3 + ["old", "new"]
