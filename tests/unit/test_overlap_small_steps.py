"""The scheduler actor overlaps only small steps when told to (``overlap_max_rows``): on a CPU
whose cores all run the worker's threads, only a step of few rows (run on one thread) leaves
the engine a core, so a continuation of a bigger batch would take a core from its own step."""

from __future__ import annotations

from engine.actors.scheduler import SchedulerActor, TokenEvent
from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.memory.swap import ReactivePolicy
from engine.policies.fcfs import FCFSPolicy
from engine.scheduler import Scheduler

from .test_actor_busy_time import Clock, TimedWorkers, _serve, job


async def overlapped_steps(jobs: int, max_rows: int | None) -> tuple[int, int]:
    clock = Clock()
    finished: set[str] = set()

    def emit(events: list[TokenEvent]) -> None:
        finished.update(e.job_id for e in events if e.finish_reason is not None)

    core = Scheduler(SchedulerConfig(max_num_seqs=4), FCFSPolicy(), ReactivePolicy(),
                     BlockManager(64, 0, 4))
    actor = SchedulerActor(core, TimedWorkers(clock), emit=emit,  # type: ignore[arg-type]
                           fail=lambda ids, e: None, clock=clock, overlap=True,
                           overlap_max_rows=max_rows)
    actor.start()
    try:
        await _serve(actor, finished, [job(f"j{i}", 12) for i in range(jobs)])
        return actor.num_overlapped_steps, actor.num_steps
    finally:
        await actor.stop()


async def test_only_steps_with_at_most_max_rows_sampling_jobs_are_overlapped():
    one_alone, _ = await overlapped_steps(1, max_rows=2)
    assert one_alone > 0  # one job decoding: a small step, overlapped
    three, steps = await overlapped_steps(3, max_rows=2)
    assert three == 0 and steps > 0  # three jobs decode together all along: never
    unlimited, _ = await overlapped_steps(3, max_rows=None)
    assert unlimited > 0  # no limit: the same batch is overlapped
