"""Stateful property test: the real Scheduler + BlockManager under every scheduling policy
and every swap policy, with random arrivals, steps, aborts and stops.

Pools are tiny (a few blocks of 2-4 tokens, a host pool that may be empty) so preemption,
swapping and the host-full fallback to recompute really happen. After every rule: blocks
are conserved in both pools, no job is in two places, no job has computed more tokens
than it has, and every batch respects its budgets and is resident. At the end every
admitted job that was not aborted finishes within a bounded number of steps (no deadlock,
no lost job) and both pools are empty again.

The pipeline depth is drawn too (1 to 3 batches in flight, as pipeline parallelism runs):
a plan's result is applied only when the pipeline is full, or when the ``complete`` rule
says so. A plan never schedules, evicts or swaps a job whose batch is still in flight, and
an in-flight job keeps every block its batch uses.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine.memory.block_manager import Residency
from engine.request import FinishReason, Job
from engine.scheduler import AdmissionError, StepPlan

from .fakes import EOS, VirtualClock, fake_tokens, make_job, make_scheduler
from .policy_fakes import (
    POLICIES,
    SWAPS,
    SwapLedger,
    check_no_ping_pong,
    check_preempted_jobs_sit_out,
)

SETTINGS = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    database=None,  # no .hypothesis/ files from a unit run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class SchedulerMachine(RuleBasedStateMachine):
    policy_name = "fcfs"
    swap_name = "recompute"

    @initialize(
        gpu_blocks=st.integers(4, 12),
        host_blocks=st.integers(0, 10),
        block_size=st.sampled_from([2, 4]),
        max_num_seqs=st.integers(1, 4),
        token_budget=st.integers(4, 24),
        eager_recompute=st.booleans(),
        depth=st.integers(1, 3),
    )
    def setup(
        self, gpu_blocks: int, host_blocks: int, block_size: int, max_num_seqs: int,
        token_budget: int, eager_recompute: bool, depth: int,
    ) -> None:
        self.s = make_scheduler(
            POLICIES[self.policy_name](), SWAPS[self.swap_name](), gpu_blocks, host_blocks,
            block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=token_budget,
            eager_recompute=eager_recompute, pipeline_depth=depth,
        )
        self.in_flight: deque[tuple[StepPlan, float]] = deque()  # (plan, time it was sent)
        self.clock = VirtualClock(step_s=0.01)
        self.admitted: dict[str, Job] = {}
        self.aborted: set[str] = set()
        self.next_id = 0

    # -- rules ------------------------------------------------------------------------------
    @rule(burst=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 24), st.integers(-2, 2)),
                         min_size=1, max_size=3))
    def arrive(self, burst: list[tuple[int, int, int]]) -> None:
        for prompt, max_tokens, priority in burst:
            self._arrive(prompt, max_tokens, priority)

    @rule(steps=st.integers(1, 4), step_s=st.sampled_from([0.005, 0.01, 0.04]),
          eos_at=st.none() | st.integers(0, 7))
    def step(self, steps: int, step_s: float, eos_at: int | None) -> None:
        for i in range(steps):
            self._step(step_s, eos_at if i == 0 else None)

    @precondition(lambda self: self.s.jobs)
    @rule(pick=st.integers(0, 1 << 16))
    def abort(self, pick: int) -> None:
        job_id = sorted(self.s.jobs)[pick % len(self.s.jobs)]
        self.s.abort(job_id, self.clock.now)
        self.aborted.add(job_id)

    @precondition(lambda self: self.s.jobs)
    @rule(pick=st.integers(0, 1 << 16))
    def stop_string_found(self, pick: int) -> None:
        job_id = sorted(self.s.jobs)[pick % len(self.s.jobs)]
        self.s.finish(job_id, FinishReason.STOP, self.clock.now)

    @precondition(lambda self: self.s.jobs)
    @rule()
    def drain(self) -> None:
        self._drain()

    @precondition(lambda self: self.in_flight)
    @rule(step_s=st.sampled_from([0.005, 0.01, 0.04]), eos_at=st.none() | st.integers(0, 7))
    def complete(self, step_s: float, eos_at: int | None) -> None:
        self._complete_oldest(step_s, eos_at)

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def blocks_and_queues_are_consistent(self) -> None:
        self.s.check_integrity()
        for job in self.s.jobs.values():
            assert not job.is_finished
            assert 0 <= job.num_computed_tokens <= job.num_tokens
        for job in self.admitted.values():
            if job.is_finished:
                assert job.job_id not in self.s.jobs
                assert self.s.blocks.num_blocks_held(job.job_id) == 0

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        self._drain()
        for job in self.admitted.values():
            assert job.is_finished, f"{job.job_id} was lost"
            assert (job.finish_reason is FinishReason.ABORT) == (job.job_id in self.aborted)
        blocks = self.s.blocks
        assert blocks.num_free_gpu_blocks == blocks.num_gpu_blocks
        assert blocks.num_free_host_blocks == blocks.num_host_blocks
        blocks.check_integrity()

    # -- helpers ----------------------------------------------------------------------------
    def _arrive(self, prompt: int, max_tokens: int, priority: int) -> None:
        now = self.clock.now
        job = make_job(f"j{self.next_id}", prompt, max_tokens, arrival=now, priority=priority)
        self.next_id += 1
        fits = self.s.blocks.blocks_for(prompt + 1) <= self.s.blocks.num_gpu_blocks
        if fits:
            self.s.add(job, self.clock.now)
            self.admitted[job.job_id] = job
        else:
            with pytest.raises(AdmissionError):
                self.s.add(job, self.clock.now)
            assert job.job_id not in self.s.jobs

    def _step(self, step_s: float, eos_at: int | None = None) -> None:
        """Plan a batch if the pipeline has room; apply the oldest result when it is full
        (or when nothing more could be planned)."""
        if self.s.can_schedule():
            now = self.clock.now
            ledger = SwapLedger(self.admitted.values())
            preemptions = {j.job_id: j.stats.preemptions for j in self.s.jobs.values()}
            flying = {jid: list(self.s.blocks.gpu_table(jid)) for jid in self._in_flight_jobs()}
            plan = self.s.schedule(now)
            check_preempted_jobs_sit_out(plan, preemptions, self.s.jobs.values())
            check_no_ping_pong(plan, ledger)
            self._check_plan(plan, flying)
            if plan.seqs:
                self.in_flight.append((plan, now))
            else:
                self.s.update(plan, {}, 0.0, now)  # only moves or frees: nothing to wait for
            if self.s.can_schedule() and plan.seqs:
                return
        if self.in_flight:
            self._complete_oldest(step_s, eos_at)

    def _complete_oldest(self, step_s: float, eos_at: int | None = None) -> None:
        plan, sent = self.in_flight.popleft()
        sampled = fake_tokens(plan)
        if eos_at is not None and sampled:
            sampled[sorted(sampled)[eos_at % len(sampled)]] = EOS
        self.clock.now += step_s
        # Service charged: the time the batch spent in the pipeline.
        self.s.update(plan, sampled, self.clock.now - sent, self.clock.now)

    def _in_flight_jobs(self) -> set[str]:
        return {s.job.job_id for plan, _ in self.in_flight for s in plan.seqs if not s.job.is_finished}

    def _check_plan(self, plan: StepPlan, flying: dict[str, list[int]]) -> None:
        """``flying``: block tables, before this plan, of the jobs whose batches are in flight."""
        cfg, blocks = self.s.config, self.s.blocks
        assert len(plan.seqs) <= cfg.max_num_seqs and plan.num_tokens <= cfg.max_num_batched_tokens
        assert len({s.job.job_id for s in plan.seqs}) == len(plan.seqs)
        rescheduled = set(flying) & {s.job.job_id for s in plan.seqs}
        assert not rescheduled, f"jobs in flight scheduled again: {sorted(rescheduled)}"
        held = {b for table in flying.values() for b in table}
        assert not {gpu for gpu, _ in plan.swap_out + plan.offload} & held, "in-flight KV swapped out"
        for jid, table in flying.items():  # still resident, table untouched: not evicted, not dropped
            assert self.s.is_in_flight(jid)
            assert blocks.residency(jid) is Residency.GPU and blocks.gpu_table(jid) == table
        for seq in plan.seqs:
            assert seq.num_tokens > 0 and seq.start == seq.job.num_computed_tokens
            need = blocks.blocks_for(seq.start + seq.num_tokens)
            assert len(blocks.gpu_table(seq.job.job_id)) >= need

    def _drain(self) -> None:
        # Generous bound: every remaining token fed a few times over (recompute re-feeds).
        remaining = sum(j.num_prompt_tokens + j.params.max_tokens for j in self.s.jobs.values())
        for _ in range(100 + 20 * remaining):
            if not self.s.jobs and not self.in_flight:
                break
            self._step(0.01)
            self.s.check_integrity()
        assert not self.s.jobs, f"no progress: {sorted(self.s.jobs)} still unfinished"
        assert not self.in_flight and self.s.num_in_flight == 0
        self.s.schedule(self.clock.now)  # hands finished jobs' ids to the worker, settles swaps


@pytest.mark.parametrize("swap", sorted(SWAPS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_scheduler_state_machine(policy: str, swap: str) -> None:
    knobs = {"policy_name": policy, "swap_name": swap}
    machine = type(f"Machine[{policy},{swap}]", (SchedulerMachine,), knobs)
    run_state_machine_as_test(machine, settings=SETTINGS)
