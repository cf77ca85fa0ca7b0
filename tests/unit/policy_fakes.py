"""Helpers for policy tests: fast-knob policy factories, arrival-driven runs, swap ledgers.

Everything runs on a virtual clock (``fakes.VirtualClock``); JCTs are virtual seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from engine.memory.proactive import ProactivePolicy
from engine.memory.swap import ReactivePolicy, RecomputePolicy, SwapPolicy
from engine.policies.base import SchedulingPolicy
from engine.policies.fcfs import FCFSPolicy
from engine.policies.mlfq import MLFQPolicy
from engine.policies.priority import PriorityPolicy
from engine.policies.profile import PrefillProfile
from engine.policies.skip_join import SkipJoinMLFQPolicy
from engine.request import Job
from engine.scheduler import Scheduler, StepPlan

from .fakes import VirtualClock, run_step

# With 10 ms virtual steps: queue 0 lasts 2 steps, queue 1 four, ...; starvation after 20.
FAST_MLFQ = {
    "base_quantum_s": 0.02, "quantum_ratio": 2.0, "num_queues": 4, "starvation_limit_s": 0.2,
}
# Prompt of 8 tokens -> 0.02 s (queue 0), 16 -> 0.04 s (queue 1), 32 -> 0.08 s (queue 2).
TEST_PROFILE = PrefillProfile(prefill=[(8, 0.02), (32, 0.08)], decode=[(1, 0.01), (8, 0.02)])

POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {
    "fcfs": FCFSPolicy,
    "mlfq": lambda: MLFQPolicy(**FAST_MLFQ),
    "skip-join-mlfq": lambda: SkipJoinMLFQPolicy(profile=TEST_PROFILE, **FAST_MLFQ),
    "priority": PriorityPolicy,
    "priority+mlfq": lambda: PriorityPolicy(mlfq=True, **FAST_MLFQ),
}
SWAPS: dict[str, Callable[[], SwapPolicy]] = {
    "recompute": RecomputePolicy,
    "reactive": ReactivePolicy,
    "proactive": lambda: ProactivePolicy(headroom_blocks=2, lookahead=1),
}


def ids(jobs: Iterable[Job]) -> list[str]:
    return [j.job_id for j in jobs]


def jct(job: Job) -> float:
    assert job.stats.finish_time is not None, f"{job.job_id} did not finish"
    return job.stats.finish_time - job.arrival_time


def run_arrivals(
    sched: Scheduler, clock: VirtualClock, jobs: list[Job], max_steps: int = 10_000
) -> None:
    """Add each job once the clock reaches its arrival time; step until all are done."""
    pending = sorted(jobs, key=lambda j: j.arrival_time)
    for _ in range(max_steps):
        while pending and pending[0].arrival_time <= clock.now + 1e-12:
            sched.add(pending.pop(0), clock.now)
        if not pending and not sched.jobs:
            return
        run_step(sched, clock)
        sched.check_integrity()
    raise AssertionError("jobs did not finish")


class SwapLedger:
    """Per-step swap moves by job, from ``job.stats`` (plans carry blocks, not job ids)."""

    def __init__(self, jobs: Iterable[Job]) -> None:
        self._before = {j.job_id: (j.stats.swap_outs, j.stats.swap_ins) for j in jobs}
        self._jobs = list(jobs)

    def moves(self) -> tuple[set[str], set[str]]:
        """(jobs swapped out, jobs swapped in) since the ledger was made."""
        out, inn = set(), set()
        for j in self._jobs:
            o, i = self._before[j.job_id]
            if j.stats.swap_outs > o:
                out.add(j.job_id)
            if j.stats.swap_ins > i:
                inn.add(j.job_id)
        return out, inn


def check_no_ping_pong(plan: StepPlan, ledger: SwapLedger) -> None:
    """A step never moves one job both ways, and uploads ahead of need (jobs outside the
    batch) only in a step that offloads nothing."""
    out, inn = ledger.moves()
    batch = {s.job.job_id for s in plan.seqs}
    both = out & inn
    assert not both, f"jobs swapped both ways in one step: {sorted(both)}"
    if out:
        assert inn <= batch, f"proactive upload in a step that swapped out: {sorted(inn - batch)}"


def check_preempted_jobs_sit_out(
    plan: StepPlan, before: dict[str, int], jobs: Iterable[Job]
) -> None:
    """A job preempted (swapped out or dropped) in a step is not in that step's batch;
    ``before`` maps job id to ``stats.preemptions`` before the step."""
    preempted = {j.job_id for j in jobs if j.stats.preemptions > before.get(j.job_id, 0)}
    ran = preempted & {s.job.job_id for s in plan.seqs}
    assert not ran, f"preempted and run in one step: {sorted(ran)}"
