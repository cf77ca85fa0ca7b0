"""The scheduler actor overlaps only small steps when told to (``overlap_max_rows``) and asks
the worker to run those on one thread: on a CPU whose cores all run the worker's threads, only
a step of few rows leaves the engine a core, so a continuation of a bigger batch would take a
core from its own step."""

from __future__ import annotations

from engine.actors.scheduler import SchedulerActor, TokenEvent
from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.memory.swap import ReactivePolicy
from engine.policies.fcfs import FCFSPolicy
from engine.scheduler import Scheduler

from .test_actor_busy_time import Clock, TimedWorkers, _serve, job


class MarkingWorkers(TimedWorkers):
    """Counts the steps the actor asks to run on one thread."""

    one_thread = 0

    async def submit(self, kind: str, **msg: object):
        self.one_thread += bool(msg.get("one_thread"))
        return await super().submit(kind, **msg)


async def overlapped_steps(jobs: int, max_rows: int | None) -> tuple[int, int, int]:
    """(steps overlapped, steps, steps sent to run on one thread)"""
    clock = Clock()
    finished: set[str] = set()

    def emit(events: list[TokenEvent]) -> None:
        finished.update(e.job_id for e in events if e.finish_reason is not None)

    core = Scheduler(SchedulerConfig(max_num_seqs=4), FCFSPolicy(), ReactivePolicy(),
                     BlockManager(64, 0, 4))
    workers = MarkingWorkers(clock)
    actor = SchedulerActor(core, workers, emit=emit,  # type: ignore[arg-type]
                           fail=lambda ids, e: None, clock=clock, overlap=True,
                           overlap_max_rows=max_rows)
    actor.start()
    try:
        await _serve(actor, finished, [job(f"j{i}", 12) for i in range(jobs)])
        return actor.num_overlapped_steps, actor.num_steps, workers.one_thread
    finally:
        await actor.stop()


async def test_only_steps_with_at_most_max_rows_sampling_jobs_are_overlapped_on_one_thread():
    one_alone, steps, one_thread = await overlapped_steps(1, max_rows=2)
    # One job decoding: small steps, overlapped, and each of those runs on one thread; the
    # first (the prompt, not a continuation) keeps every thread.
    assert 0 < one_alone < steps and one_thread == one_alone
    three, steps, one_thread = await overlapped_steps(3, max_rows=2)
    assert three == 0 and one_thread == 0 and steps > 0  # three jobs together all along: never
    unlimited, _, one_thread = await overlapped_steps(3, max_rows=None)
    # No limit (a free core, a GPU): the same batch is overlapped, on every thread.
    assert unlimited > 0 and one_thread == 0
