"""Drive the scheduler core with fake step results on a virtual clock (no processes)."""

from __future__ import annotations

from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.memory.swap import SwapPolicy
from engine.policies.base import SchedulingPolicy
from engine.request import Job
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, StepPlan

EOS = 0


def make_job(jid: str, prompt_len: int, max_tokens: int, arrival: float = 0.0, **params) -> Job:
    return Job(
        job_id=jid,
        prompt_ids=[1 + (i % 50) for i in range(prompt_len)],
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
        arrival_time=arrival,
        eos_token_ids=frozenset({EOS}),
    )


def make_scheduler(policy: SchedulingPolicy, swap: SwapPolicy, gpu_blocks: int = 64, host_blocks: int = 64,
                   block_size: int = 4, pipeline_depth: int = 1, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), policy, swap, BlockManager(gpu_blocks, host_blocks, block_size),
                     pipeline_depth=pipeline_depth)


def fake_tokens(plan: StepPlan) -> dict[str, int]:
    """A deterministic 'model': the next token is a function of the job's length (never EOS)."""
    return {s.job.job_id: 1 + (s.job.num_tokens % 97) for s in plan.seqs if s.sample}


class VirtualClock:
    def __init__(self, step_s: float = 0.01) -> None:
        self.now = 0.0
        self.step_s = step_s

    def tick(self) -> float:
        self.now += self.step_s
        return self.now


def run_step(sched: Scheduler, clock: VirtualClock) -> StepPlan:
    plan = sched.schedule(clock.now)
    sched.update(plan, fake_tokens(plan), clock.step_s, clock.tick())
    return plan


def run_until_idle(sched: Scheduler, clock: VirtualClock, max_steps: int = 10_000) -> list[StepPlan]:
    plans = []
    for _ in range(max_steps):
        if not sched.jobs:
            return plans
        plans.append(run_step(sched, clock))
        sched.check_integrity()
    raise AssertionError("scheduler did not drain")
