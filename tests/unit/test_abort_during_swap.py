"""Aborts while a job's KV is being copied between the pools, on the scheduler core.

A block of an aborted job returns to the block manager at once, but nothing may overwrite
it (or read it for someone else) before the copy that moves it has completed. The engine
relies on the worker's order for this: every rank runs plans in the order they were made,
a plan's demand swaps run before its forward, and its proactive copies (overlapping the
forward) land before the next plan touches anything (``AsyncBlockCopier.wait`` at the
start of each step). So a block freed while plan N copies it is handed out, at the
earliest, in plan N+1 -- or, for a demand swap-out's source, to plan N's own forward,
which runs after that copy.

``CopyTimedWorker`` below does exactly what the real worker does with the blocks of each
plan, in that order, and remembers what every KV slot holds. Its copy "completion" is
explicit: proactive copies are read at submit and written when they land, and it checks
that nothing touched their blocks in between. Every forward checks that the history it
attends to is the job's own. Aborts land at every point of a plan's life (before it is
sent, while it runs, after its result while its copies are still in flight), twice, and
after the job's last token.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from engine.memory.proactive import ProactivePolicy
from engine.memory.swap import ReactivePolicy
from engine.policies.mlfq import MLFQPolicy
from engine.request import JobState
from engine.scheduler import ScheduledSeq, Scheduler, StepPlan

from .fakes import make_job, make_scheduler

BS = 4  # tokens per block


class CopyTimedWorker:
    """The worker's handling of KV blocks, slot by slot: ``(job, position)`` per slot."""

    def __init__(self, n_gpu: int, n_host: int) -> None:
        self.gpu: list[list] = [[None] * BS for _ in range(n_gpu)]
        self.host: list[list] = [[None] * BS for _ in range(n_host)]
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, int] = {}
        # Proactive copies in flight: (destination pool, block, content read at submit).
        self.in_flight: list[tuple[list, int, list]] = []
        self.touched_while_copying: set[tuple[int, int]] = set()  # (id(pool), block)
        self.copy_blocks: set[tuple[int, int]] = set()

    def run(self, plan: StepPlan) -> dict[str, int]:
        self._land()  # last plan's proactive copies complete first
        for jid in plan.free:
            self.tables.pop(jid, None)
        for g, h in plan.swap_out:  # demand swaps: out, then in, both before the forward
            self.host[h] = list(self.gpu[g])
        for h, g in plan.swap_in:
            self.gpu[g] = list(self.host[h])
        # Proactive copies start now and land at the next step: read the sources now.
        for g, h in plan.offload:
            self._start(self.gpu, g, self.host, h)
        for h, g in plan.prefetch:
            self._start(self.host, h, self.gpu, g)
        sampled = {}
        for seq in plan.seqs:
            jid = seq.job.job_id
            table = self.tables.setdefault(jid, [])
            if seq.reset_table:
                table[:] = seq.new_blocks
            else:
                table.extend(seq.new_blocks)
            for pos in range(seq.start):  # attention reads the job's whole history
                held = self.gpu[table[pos // BS]][pos % BS]
                assert held == (jid, pos), f"{jid} pos {pos}: KV holds {held}"
            for pos in range(seq.start, seq.start + seq.num_tokens):
                block = table[pos // BS]
                self._touch(self.gpu, block)
                self.gpu[block][pos % BS] = (jid, pos)
            if seq.sample:
                sampled[jid] = 1 + seq.job.num_tokens % 97
        return sampled

    def _start(self, src: list, s: int, dst: list, d: int) -> None:
        self.in_flight.append((dst, d, list(src[s])))
        self.copy_blocks |= {(id(src), s), (id(dst), d)}

    def _touch(self, pool: list, block: int) -> None:
        if (id(pool), block) in self.copy_blocks:
            self.touched_while_copying.add((id(pool), block))

    def _land(self) -> None:
        assert not self.touched_while_copying, "a block was reused while a copy still moved it"
        for dst, d, content in self.in_flight:
            dst[d] = content
        self.in_flight.clear()
        self.copy_blocks.clear()


def drive(s: Scheduler, worker: CopyTimedWorker, rng: random.Random, depth: int,
          abort_p: float, steps: int = 3000) -> dict[str, str]:
    """Run the core against the worker with plans in flight, aborting at random points.
    Returns how each job ended."""
    now = 0.0
    aborted_twice = 0
    in_flight: deque[StepPlan] = deque()
    ended: dict[str, str] = {}

    def maybe_abort() -> None:
        nonlocal aborted_twice
        moving = [j for j in s.jobs.values() if j.state is JobState.SWAPPED]
        pool = moving if moving and rng.random() < 0.7 else list(s.jobs.values())
        if pool and rng.random() < abort_p:
            job = rng.choice(pool)
            assert s.abort(job.job_id, now) is job
            assert s.abort(job.job_id, now) is None  # twice: nothing more happens
            aborted_twice += 1
            s.blocks.check_integrity()

    for _ in range(steps):
        if not s.jobs and not in_flight:
            break
        while s.can_schedule() and len(in_flight) < depth:
            plan = s.schedule(now)
            if plan.is_empty():
                break
            in_flight.append(plan)
            maybe_abort()  # planned, maybe sent, copies not started
        if not in_flight:
            continue
        plan = in_flight.popleft()
        sampled = worker.run(plan)
        maybe_abort()  # the step ran; its proactive copies are still in flight
        now += 0.01
        s.update(plan, sampled, 0.01, now)
        maybe_abort()  # result applied; copies land at the worker's next step
        for job in s.drain_finished():
            ended[job.job_id] = job.finish_reason.value
            assert s.abort(job.job_id, now) is None  # after its last token: a no-op
        s.blocks.check_integrity()
    worker.run(StepPlan(step_id=-1))  # the last copies land
    assert not s.jobs and not in_flight, "the scheduler did not drain"
    assert aborted_twice
    return ended


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("swap", ["proactive", "reactive"])
@pytest.mark.parametrize("seed", range(6))
def test_aborts_while_kv_moves_never_let_a_block_be_reused_before_its_copy_lands(
    depth, swap, seed
):
    rng = random.Random(seed)
    n_gpu, n_host = 12, 24
    policy = MLFQPolicy(base_quantum_s=0.02, quantum_ratio=2.0)
    swap_policy = ProactivePolicy(headroom_blocks=3) if swap == "proactive" else ReactivePolicy()
    s = make_scheduler(policy, swap_policy, gpu_blocks=n_gpu, host_blocks=n_host, block_size=BS,
                       pipeline_depth=depth, max_num_seqs=3, max_num_batched_tokens=16,
                       fixed_step_time_s=0.01)
    worker = CopyTimedWorker(n_gpu, n_host)
    jobs = [make_job(f"j{i}", rng.randint(2, 12), rng.randint(4, 14)) for i in range(30)]
    for job in jobs:
        s.add(job, 0.0)
    ended = drive(s, worker, rng, depth, abort_p=0.08)
    assert set(ended) == {j.job_id for j in jobs}
    assert "abort" in ended.values() and "length" in ended.values()
    for job in jobs:  # the survivors got every token
        if ended[job.job_id] == "length":
            assert len(job.output_ids) == job.params.max_tokens
    assert s.blocks.num_free_gpu_blocks == n_gpu and s.blocks.num_free_host_blocks == n_host
    s.check_integrity()


def test_the_worker_model_catches_a_block_reused_while_its_copy_is_in_flight():
    """The check above has teeth: hand an offloaded block to a forward of the same plan."""
    worker = CopyTimedWorker(4, 4)
    job = make_job("a", 4, 4)
    plan = StepPlan(step_id=0, offload=[(0, 0)])
    plan.seqs.append(ScheduledSeq(job, 0, 4, [0], True, True))  # writes block 0 under the copy
    worker.run(plan)
    with pytest.raises(AssertionError, match="reused while a copy"):
        worker.run(StepPlan(step_id=1))


def test_abort_of_a_job_whose_offload_is_in_flight_frees_both_pools_and_is_idempotent():
    """The simplest case, spelled out: a job offloaded by the plan now running is aborted;
    its blocks are free in both pools, and the worker's next plan (which the real worker
    starts only after the offload landed) may reuse them."""
    s = make_scheduler(MLFQPolicy(base_quantum_s=0.02), ProactivePolicy(headroom_blocks=2, lookahead=0),
                       gpu_blocks=6, host_blocks=8, block_size=BS, max_num_seqs=1,
                       fixed_step_time_s=0.01)
    worker = CopyTimedWorker(6, 8)
    a, b = make_job("a", 8, 12), make_job("b", 8, 12)  # 5 blocks each at the end: not both
    s.add(a, 0.0)
    s.add(b, 0.0)
    now, offloaded = 0.0, None
    for _ in range(200):
        plan = s.schedule(now)
        sampled = worker.run(plan)
        now += 0.01
        s.update(plan, sampled, 0.01, now)
        if plan.offload:
            offloaded = next(j for j in (a, b) if j.state is JobState.SWAPPED)
            break
    assert offloaded is not None, "no proactive offload happened"
    assert worker.in_flight  # its copy has not landed yet
    assert s.abort(offloaded.job_id, now) is offloaded
    assert s.abort(offloaded.job_id, now) is None
    assert s.blocks.residency(offloaded.job_id).value == "none"
    s.check_integrity()
    survivor = b if offloaded is a else a
    while s.jobs:
        plan = s.schedule(now)
        sampled = worker.run(plan)
        now += 0.01
        s.update(plan, sampled, 0.01, now)
    worker.run(StepPlan(step_id=-1))
    assert len(survivor.output_ids) == 12 and s.abort(survivor.job_id, now) is None
    assert s.blocks.num_free_gpu_blocks == 6 and s.blocks.num_free_host_blocks == 8
