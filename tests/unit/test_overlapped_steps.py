"""Overlapped steps (``Scheduler.schedule_continuation``): step N+1 is planned while step N
runs, its decode rows feeding the token the worker samples in step N. Driven here against a
fake worker that keeps per-job tokens and KV length exactly as the real runner does, with a
deterministic 'model' (the next token is a function of the job's own tokens, EOS included),
so outputs must be identical with and without overlap, through EOS, max_tokens, stop strings
(finished from outside while a continuation is in flight), aborts and preemption."""

from __future__ import annotations

import random

import pytest

from engine.memory.proactive import ProactivePolicy
from engine.memory.swap import ReactivePolicy, RecomputePolicy
from engine.policies.fcfs import FCFSPolicy
from engine.policies.mlfq import MLFQPolicy
from engine.request import FinishReason, JobState
from engine.scheduler import Scheduler, StepPlan

from .fakes import EOS, make_job, make_scheduler

STOP_TOKEN = 7  # the fake frontend "matches a stop string" when a job samples this token


class FakeWorker:
    """The runner's bookkeeping: tokens per job (prompt, then what it sampled), the length of
    KV it holds, its block table. Plans run strictly in order, as on the real worker."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.tokens: dict[str, list[int]] = {}
        self.kv_len: dict[str, int] = {}
        self.table: dict[str, list[int]] = {}
        self.computed = 0  # rows fed, for the tests' bookkeeping

    def run(self, plan: StepPlan) -> dict[str, int]:
        for jid in plan.free:
            self.tokens.pop(jid, None)
            self.kv_len.pop(jid, None)
            self.table.pop(jid, None)
        for job in plan.new_jobs:
            self.tokens[job.job_id] = list(job.prompt_ids)
            self.kv_len[job.job_id] = 0
        sampled = {}
        for s in plan.seqs:
            jid = s.job.job_id
            table = self.table.setdefault(jid, [])
            if s.reset_table:
                table[:] = s.new_blocks
            else:
                table.extend(s.new_blocks)
            end = s.start + s.num_tokens
            assert end <= len(self.tokens[jid]), f"{jid}: feeds up to {end}, has {len(self.tokens[jid])}"
            assert s.start <= self.kv_len[jid], f"{jid}: KV hole before {s.start}"
            assert len(table) * self.block_size >= end, f"{jid}: table too short for {end}"
            self.kv_len[jid] = end
            self.computed += s.num_tokens
            if s.sample:
                tok = next_token(self.tokens[jid][:end])
                self.tokens[jid].append(tok)
                sampled[jid] = tok
        return sampled


def next_token(history: list[int]) -> int:
    """A deterministic 'model' of the job's own history: EOS now and then."""
    h = 0
    for t in history:
        h = (h * 31 + t) % 1_000_003
    return h % 23  # 0 is EOS, STOP_TOKEN a stop string


def drive(sched: Scheduler, arrivals: dict[int, list], overlap: bool, aborts: dict[int, str] | None = None,
          stop_strings: bool = True, max_iters: int = 5000) -> tuple[int, int]:
    """Run jobs to the end like the scheduler actor: with ``overlap``, send a continuation
    of the batch in flight before waiting for it. Arrivals, aborts and stop-string finishes
    happen between worker steps (by worker-step index). Returns (steps that ran a batch,
    continuations)."""
    worker = FakeWorker(sched.blocks.block_size)
    aborts = aborts or {}
    in_flight: list[StepPlan] = []
    now, steps, continuations = 0.0, 0, 0
    for it in range(max_iters):
        for job in arrivals.get(it, []):
            sched.add(job, now)
        if it in aborts:
            sched.abort(aborts[it], now)
        if it > max(arrivals) and not in_flight and not sched.has_work():
            return steps, continuations
        if not in_flight:
            if not sched.has_work():
                now += 0.01
                continue
            plan = sched.schedule(now)
            if plan.is_empty():
                sched.drain_finished()
                now += 0.01
                continue
            in_flight.append(plan)
        if overlap and len(in_flight) == 1:
            cont = sched.schedule_continuation(in_flight[0])
            if cont is not None:
                continuations += 1
                in_flight.append(cont)
        plan = in_flight.pop(0)
        sampled = worker.run(plan)
        steps += bool(plan.seqs)
        now += 0.01
        touched = sched.update(plan, sampled, 0.01, now)
        for job in touched:  # the frontend: a stop string ends the job from outside
            if stop_strings and not job.is_finished and job.output_ids[-1] == STOP_TOKEN:
                sched.finish(job.job_id, FinishReason.STOP, now)
        sched.drain_finished()
        if not in_flight:
            sched.check_integrity()
    raise AssertionError("did not drain")


def workload(seed: int, n: int, spread: int) -> dict[int, list]:
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    for i in range(n):
        job = make_job(f"j{i}", rng.randrange(1, 14), rng.randrange(1, 24),
                       ignore_eos=rng.random() < 0.3)
        arrivals.setdefault(rng.randrange(spread), []).append(job)
    return arrivals


def outcome(arrivals: dict[int, list]) -> dict[str, tuple]:
    return {j.job_id: (j.output_ids, j.finish_reason) for js in arrivals.values() for j in js}


# MLFQ with strict priority (a job outside the GPU may evict resident ones, no reserve), so
# that the tight pools preempt as often as possible.
_MLFQ = {"base_quantum_s": 0.01, "quantum_ratio": 2.0, "evict_to_admit": True,
         "admission_reserve_frac": 0.0}
CASES = [
    # (policy, swap policy, gpu blocks, max seqs): roomy; tight with swapping; tight with
    # recompute; proactive offloading under MLFQ demotions.
    (FCFSPolicy, RecomputePolicy, 256, 8),
    (lambda: MLFQPolicy(**_MLFQ), ReactivePolicy, 10, 4),
    (lambda: MLFQPolicy(**_MLFQ), RecomputePolicy, 10, 4),
    (lambda: MLFQPolicy(**_MLFQ), ProactivePolicy, 12, 2),
]


@pytest.mark.parametrize("policy,swap,gpu_blocks,max_seqs", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlapped_steps_give_the_same_tokens_and_stops(policy, swap, gpu_blocks, max_seqs, seed):
    results, counts = [], []
    for overlap in (False, True):
        arrivals = workload(seed, 12, 30)
        sched = make_scheduler(policy(), swap(), gpu_blocks=gpu_blocks, host_blocks=64,
                               max_num_seqs=max_seqs, fixed_step_time_s=0.01)
        _, conts = drive(sched, arrivals, overlap, aborts={9: "j3"})
        results.append(outcome(arrivals))
        counts.append(conts)
        assert sched.blocks.num_free_gpu_blocks == sched.blocks.num_gpu_blocks
        assert sched.blocks.num_free_host_blocks == sched.blocks.num_host_blocks
        assert sched.num_preemptions > 0 or gpu_blocks > 100  # the tight pools preempt
    # j3 is aborted at a fixed step, which is a different point of its life in each run.
    for r in results:
        r.pop("j3")
    assert results[0] == results[1]
    assert counts[0] == 0 and counts[1] > 0
    reasons = {r for _, r in results[1].values()}
    assert {FinishReason.STOP, FinishReason.LENGTH} <= reasons


def test_a_lone_decode_is_continued_every_step_until_max_tokens():
    s = make_scheduler(FCFSPolicy(), RecomputePolicy(), block_size=4)
    job = make_job("a", 5, 6, ignore_eos=True)
    steps, conts = drive(s, {0: [job]}, overlap=True, stop_strings=False)
    # Prefill samples token 1; tokens 2..6 are continuations; none is computed past the end.
    assert len(job.output_ids) == 6 and job.finish_reason is FinishReason.LENGTH
    assert (steps, conts) == (6, 5)


def test_continuation_feeds_the_token_in_flight_and_grows_the_table_by_delta():
    s = make_scheduler(FCFSPolicy(), RecomputePolicy(), block_size=4)
    s.add(make_job("a", 4, 8, ignore_eos=True), 0.0)
    first = s.schedule(0.0)  # the 4-token prompt fills block 1; its sample is position 4
    cont = s.schedule_continuation(first)
    assert cont is not None and not cont.new_jobs
    (seq,) = cont.seqs
    assert (seq.start, seq.num_tokens, seq.sample, seq.reset_table) == (4, 1, True, False)
    assert len(seq.new_blocks) == 1  # position 4 opens a second block
    assert s.is_in_flight("a") and s.num_in_flight == 2
    s.update(first, {"a": 5}, 0.01, 0.01)
    assert s.is_in_flight("a")  # still, until the continuation's result
    s.update(cont, {"a": 6}, 0.01, 0.02)
    assert not s.is_in_flight("a") and s.jobs["a"].output_ids == [5, 6]
    assert s.jobs["a"].num_computed_tokens == 5


def test_no_continuation_while_anyone_waits_or_a_prompt_is_chunked():
    s = make_scheduler(FCFSPolicy(), RecomputePolicy(), max_num_seqs=1)
    s.add(make_job("a", 4, 8), 0.0)
    s.add(make_job("b", 4, 8), 0.0)
    assert s.schedule_continuation(s.schedule(0.0)) is None  # b waits for a seat
    c = make_scheduler(FCFSPolicy(), RecomputePolicy(), max_num_batched_tokens=4)
    c.add(make_job("long", 10, 8), 0.0)
    chunk = c.schedule(0.0)
    assert not chunk.seqs[0].sample and c.schedule_continuation(chunk) is None


def test_no_continuation_when_a_block_is_missing_or_every_job_ends_now():
    # Two blocks of 4: a 4-token prompt plus its sample needs the second block; the third
    # position past it needs a block nobody has.
    s = make_scheduler(FCFSPolicy(), RecomputePolicy(), gpu_blocks=2, block_size=4)
    s.add(make_job("a", 7, 8, ignore_eos=True), 0.0)
    first = s.schedule(0.0)
    cont = s.schedule_continuation(first)  # position 7 fits block 2
    assert cont is not None
    s.update(first, {"a": 1}, 0.01, 0.01)
    assert s.schedule_continuation(cont) is None  # position 8 needs a third block
    one = make_scheduler(FCFSPolicy(), RecomputePolicy())
    one.add(make_job("b", 3, 1), 0.0)
    assert one.schedule_continuation(one.schedule(0.0)) is None  # its first token is its last


def test_a_job_finished_while_its_continuation_runs_drops_that_token_and_frees_after():
    s = make_scheduler(FCFSPolicy(), RecomputePolicy(), block_size=4)
    s.add(make_job("a", 4, 8), 0.0)
    first = s.schedule(0.0)
    cont = s.schedule_continuation(first)
    assert cont is not None
    touched = s.update(first, {"a": EOS}, 0.01, 0.01)  # EOS: finished, blocks back at once
    job = touched[0]
    assert job.finish_reason is FinishReason.STOP and job.state is JobState.FINISHED
    assert s.blocks.num_free_gpu_blocks == s.blocks.num_gpu_blocks
    assert s.update(cont, {"a": 3}, 0.01, 0.02) == []  # the extra token is dropped
    assert job.output_ids == [EOS]
    assert s.schedule(0.02).free == ["a"]  # the worker forgets it after running both
