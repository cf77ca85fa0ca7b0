"""The scheduler actor's ``busy_s``: wall time spent stepping (what a benchmark divides by
the step count to get the step time as served), and never the time it sat idle."""

from __future__ import annotations

import asyncio

import pytest

from engine.actors.scheduler import SchedulerActor, TokenEvent
from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.memory.swap import ReactivePolicy
from engine.policies.fcfs import FCFSPolicy
from engine.request import Job
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler

STEP_S = 0.02


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TimedWorkers:
    """A worker stand-in whose every step moves the shared clock on by ``STEP_S``."""

    world_size = 1
    startup_timeout_s = 1.0

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.died = asyncio.Event()

    async def submit(self, kind: str, **msg: object) -> asyncio.Future:
        assert kind == "step"
        self.clock.t += STEP_S
        ids = [seq[0] for seq in msg["seqs"] if seq[5]]  # the rows that sample
        fut = asyncio.get_running_loop().create_future()
        fut.set_result({"ids": ids, "tokens": [7] * len(ids), "elapsed": STEP_S})
        return fut


def job(jid: str, max_tokens: int) -> Job:
    return Job(job_id=jid, prompt_ids=[1, 2, 3], arrival_time=0.0,
               params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
               eos_token_ids=frozenset({0}))


async def _serve(actor: SchedulerActor, finished: set[str], jobs: list[Job]) -> None:
    for j in jobs:
        actor.tell("add", j)
    for _ in range(2000):
        if all(j.job_id in finished for j in jobs):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("jobs did not finish")


async def test_busy_time_counts_steps_and_not_the_idle_gap_between_requests():
    clock = Clock()
    finished: set[str] = set()

    def emit(events: list[TokenEvent]) -> None:
        finished.update(e.job_id for e in events if e.finish_reason is not None)

    core = Scheduler(SchedulerConfig(max_num_seqs=2), FCFSPolicy(), ReactivePolicy(),
                     BlockManager(16, 16, 4))
    actor = SchedulerActor(core, TimedWorkers(clock), emit=emit,  # type: ignore[arg-type]
                           fail=lambda ids, e: None, clock=clock)
    actor.start()
    try:
        await _serve(actor, finished, [job("a", 3), job("b", 3)])
        steps = actor.num_steps
        assert steps >= 3 and actor.busy_s == pytest.approx(STEP_S * steps)
        clock.t += 5.0  # idle: no job for five seconds
        await _serve(actor, finished, [job("c", 2)])
        assert actor.num_steps > steps
        assert actor.busy_s == pytest.approx(STEP_S * actor.num_steps)  # the gap is not in it
        assert actor.snapshot()["busy_s"] == actor.busy_s
    finally:
        await actor.stop()
