"""SchedulerActor: runs the iteration loop plan -> execute -> update around the core.

While the worker computes step N, the actor's mailbox keeps filling (new jobs, aborts,
stop-string finishes); they are applied before step N+1 is planned. With P pipeline stages
the actor plans and sends up to P disjoint batches before it waits for the oldest result,
so no stage idles while another works; results are applied in the order they were sent.
With one rank and ``overlap`` on, the actor sends step N+1 as step N's continuation (the
core's ``schedule_continuation``) before it waits for step N, so the worker finds its next
plan queued when it finishes, and applying, streaming and planning run beside its compute.
Constrained jobs are never continued: their next bitmask needs step N's token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from engine.actors.base import Actor
from engine.parallel.executor import WorkerDiedError, WorkerError, WorkerExecutor
from engine.parallel.protocol import plan_to_message
from engine.plan import StepPlan
from engine.request import FinishReason, Job
from engine.scheduler import Scheduler
from engine.structured.book import GrammarBook

log = logging.getLogger("fastserve.scheduler")


@dataclass(frozen=True)
class TokenEvent:
    """One job's progress in one step, as sent to the frontend (a snapshot, not the Job)."""

    job_id: str
    token_id: int | None
    logprob: Any
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    stats: dict | None  # set when finished
    queue_level: int
    # With the job's first token, when its params ask for prompt_logprobs: one entry per
    # prompt position from 1 on (engine.request.Job.prompt_logprobs).
    prompt_logprobs: list[Any] | None = None


class SchedulerActor(Actor):
    name = "scheduler"

    def __init__(
        self,
        core: Scheduler,
        executor: WorkerExecutor,
        emit: Callable[[list[TokenEvent]], None],
        fail: Callable[[list[str], Exception], None],
        memory: Actor | None = None,
        clock: Callable[[], float] = time.monotonic,
        grammars: GrammarBook | None = None,
        overlap: bool = False,
        overlap_max_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.core = core
        # Overlapped steps need every rank to feed its own sampled tokens: one rank only.
        self.overlap = overlap and core.pipeline_depth == 1 and executor.world_size == 1
        # Overlap only steps whose jobs that sample number at most this (None: any): on a CPU
        # whose cores all run worker threads, only a small step leaves the engine a core,
        # and only once the worker runs it on one thread (the step is sent ``one_thread``).
        self.overlap_max_rows = overlap_max_rows
        self.num_overlapped_steps = 0
        # Grammar state of constrained jobs (engine/structured/book.py says why it is here):
        # a matcher per job, advanced when its tokens are applied, read when plans are built.
        self.grammars = grammars
        self.executor = executor
        self.emit = emit
        self.fail = fail
        self.memory = memory
        self.clock = clock
        self.error: Exception | None = None
        self._failed = asyncio.Event()
        self.num_steps = 0
        # Wall seconds spent stepping: each applied step counts from the previous step's
        # result, or from when the actor last woke from idle if later. Busy time over steps
        # is the step time as served (planning, messages, the forward, applying the result).
        self.busy_s = 0.0
        self._last_applied = self._woke = 0.0
        # Batches sent and not yet applied, oldest first: (plan, answer, time sent).
        self._in_flight: deque[tuple[StepPlan, Awaitable[dict], float]] = deque()
        # Tokens fed to prefill (prompts, recomputed KV) and sampled: the stats line's rates.
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    async def run(self) -> None:
        busy = False
        self._woke = self.clock()  # work queued before the start counts from here
        while True:
            # After a worker failure nothing can run: wait for messages (which are refused)
            # instead of spinning on jobs that can never be stepped.
            if (not self.core.has_work() and not self._in_flight) or self.error is not None:
                if busy and self.memory is not None:
                    blocks = self.core.blocks
                    self.memory.tell("idle", blocks.num_free_gpu_blocks, blocks.num_free_host_blocks)
                busy = False
                msg, fut = await self.mailbox.get()
                self._woke = self.clock()
                await self.dispatch(msg, fut)
            for msg, fut in self.drain_nowait():
                await self.dispatch(msg, fut)
            if (self.core.has_work() or self._in_flight) and self.error is None:
                busy = True
                try:
                    await self._step()
                except Exception as e:  # a bug: fail every request now rather than hang them
                    log.exception("scheduler step failed")
                    self._die(e)

    # -- messages ---------------------------------------------------------------------------
    def on_add(self, job: Job) -> None:
        if self.error is not None:
            raise WorkerDiedError(f"engine cannot serve: {self.error}")
        if job.grammar is not None and self.grammars is None:
            raise RuntimeError("a constrained job, but this scheduler keeps no grammar state")
        self.core.add(job, self.clock())
        if job.grammar is not None:
            self.grammars.add(job.job_id, job.grammar)  # type: ignore[union-attr]

    def on_abort(self, job_id: str) -> None:
        if self.grammars is not None:
            self.grammars.remove(job_id)
        job = self.core.abort(job_id, self.clock())
        if job is not None:
            self.emit([self._event(job, None, None)])

    def on_finish(self, job_id: str, reason: FinishReason) -> None:
        self.core.finish(job_id, reason, self.clock())

    def on_snapshot(self) -> dict:
        return self.snapshot()

    async def on_profile(self, args: dict) -> dict:
        if self.core.jobs:
            raise RuntimeError("profile needs an idle engine")
        reply = await self.executor.call("profile", args=args, timeout=self.executor.startup_timeout_s)
        return {"prefill": reply["prefill"], "decode": reply["decode"]}

    def on_check_integrity(self) -> None:
        self.core.check_integrity()

    # -- the step ---------------------------------------------------------------------------
    async def _step(self) -> None:
        core = self.core
        # Fill the pipeline: each batch planned now holds jobs no batch in flight holds.
        while core.can_schedule() and len(self._in_flight) < core.pipeline_depth and self.error is None:
            plan = core.schedule(self.clock())
            if plan.is_empty():
                self._emit_finished(set())
                if not self._in_flight and core.jobs:  # nothing fits right now: let arrivals and aborts in
                    await asyncio.sleep(0.001)
                break
            try:
                msg = plan_to_message(plan, 0, with_feed=self.executor.world_size > 1,
                                      grammar=self._grammar_masks(plan))
                answer = await self.executor.submit("step", **_fields(msg))
            except (WorkerDiedError, WorkerError) as e:
                self._die(e)
                return
            self._in_flight.append((plan, answer, self.clock()))
        if self.overlap and len(self._in_flight) == 1 and self.error is None:
            await self._send_continuation(self._in_flight[0][0])
        if self._in_flight:
            await self._complete_oldest()

    async def _send_continuation(self, last: StepPlan) -> None:
        """Step N+1 while ``last`` (step N) runs, when the core can plan it now."""
        if self.grammars and any(s.job.job_id in self.grammars for s in last.seqs):
            return
        # A continuation feeds one token per job of ``last`` that samples, at most.
        if self.overlap_max_rows is not None and sum(s.sample for s in last.seqs) > self.overlap_max_rows:
            return
        plan = self.core.schedule_continuation(last)
        if plan is None:
            return
        try:
            msg = plan_to_message(plan, 0)
            if self.overlap_max_rows is not None:  # overlapped because small: one thread
                msg["one_thread"] = True
            answer = await self.executor.submit("step", **_fields(msg))
        except (WorkerDiedError, WorkerError) as e:
            self._die(e)
            return
        self.num_overlapped_steps += 1
        self._in_flight.append((plan, answer, self.clock()))

    async def _complete_oldest(self) -> None:
        core = self.core
        plan, answer, sent = self._in_flight.popleft()
        try:
            reply = await answer
        except (WorkerDiedError, WorkerError) as e:
            self._die(e)
            return
        now = self.clock()
        tokens = [int(t) for t in reply["tokens"]]
        logprobs = reply.get("logprobs") or [None] * len(tokens)
        sampled = dict(zip(reply["ids"], tokens))
        lp_by_id = dict(zip(reply["ids"], logprobs))
        self.num_prompt_tokens_total += sum(
            s.num_tokens for s in plan.seqs
            if s.num_tokens > 1 or s.start < s.job.num_prompt_tokens)
        for jid, first, entries in reply.get("prompt_logprobs") or ():
            job = core.jobs.get(jid)
            if job is None:
                continue  # aborted while the step ran
            try:
                job.add_prompt_logprobs(int(first), entries)
            except ValueError as e:  # the worker skipped positions: a bug, fail only this job
                log.error("%s", e)
                core.abort(jid, now)
                self.fail([jid], e)
        # Service: the worker's step time; with several batches in flight, the time this
        # batch spent in the pipeline (queued behind another stage included).
        service = float(reply["elapsed"]) if core.pipeline_depth == 1 else now - sent
        touched = core.update(plan, sampled, service, now)
        self.num_generation_tokens_total += len(touched)  # not tokens of jobs already finished
        if self.grammars:
            self._advance_grammars(touched, now)
        self.num_steps += 1
        self.busy_s += max(0.0, now - max(self._last_applied, self._woke))
        self._last_applied = now
        if touched:
            self.emit([self._event(j, j.output_ids[-1], lp_by_id.get(j.job_id)) for j in touched])
        self._emit_finished({j.job_id for j in touched})
        if self.memory is not None:
            b = core.blocks
            moved = {k: len(getattr(plan, k)) for k in ("swap_out", "swap_in", "offload", "prefetch")}
            self.memory.tell("step", b.num_free_gpu_blocks, b.num_free_host_blocks, moved,
                             float(reply.get("swap_s", 0.0)))

    def _grammar_masks(self, plan: StepPlan) -> dict | None:
        """The next-token bitmasks of the plan's constrained sampled rows; None if none."""
        if not self.grammars:
            return None
        ids = [s.job.job_id for s in plan.seqs if s.sample and s.job.job_id in self.grammars]
        if not ids:
            return None
        return {"ids": ids, "bitmask": self.grammars.bitmask(ids)}

    def _advance_grammars(self, touched: list[Job], now: float) -> None:
        """Feed each constrained job's new token to its matcher (once per token: the only
        place a matcher moves). A grammar that has ended finishes its job ("stop")."""
        book = self.grammars
        assert book is not None
        for job in touched:
            if job.job_id not in book or job.is_finished:
                continue  # finished jobs lose their matcher when drained
            accepted, terminated = book.accept(job.job_id, job.output_ids[-1])
            if not accepted:  # the sampler honours the mask, so this is a bug: say so
                err = RuntimeError(f"token {job.output_ids[-1]} of job {job.job_id} "
                                   "breaks its grammar")
                log.error("%s", err)
                self.core.abort(job.job_id, now)
                self.fail([job.job_id], err)
            elif terminated:
                self.core.finish(job.job_id, FinishReason.STOP, now)

    def _emit_finished(self, reported: set[str]) -> None:
        """Final events for jobs finished without a token this step (the frontend ignores
        a second final event for a job, so over-reporting is harmless; missing one is not)."""
        finished = self.core.drain_finished()
        if self.grammars:
            for j in finished:
                self.grammars.remove(j.job_id)
        done = [j for j in finished if j.job_id not in reported]
        if done:
            self.emit([self._event(j, None, None) for j in done])

    @staticmethod
    def _event(job: Job, token: int | None, logprob: Any) -> TokenEvent:
        first = token is not None and len(job.output_ids) == 1
        return TokenEvent(
            job_id=job.job_id,
            token_id=token,
            logprob=logprob,
            finish_reason=job.finish_reason,
            num_prompt_tokens=job.num_prompt_tokens,
            num_output_tokens=len(job.output_ids),
            stats=job.stats.to_dict() if job.is_finished else None,
            queue_level=job.queue_level,
            prompt_logprobs=job.prompt_logprobs
            if first and job.params.prompt_logprobs is not None else None,
        )

    async def failed(self) -> None:
        """Return once the worker group has failed: a step failed, or a worker exited or
        missed a deadline while the actor was idle, or the actor's task ended on its own.
        Whoever replaces the group calls ``fail_jobs`` after stopping this actor."""
        waits = [asyncio.ensure_future(self._failed.wait()),
                 asyncio.ensure_future(self.executor.died.wait())]
        if self._task is not None:
            waits.append(self._task)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits[:2]:
                w.cancel()

    def fail_jobs(self, error: Exception) -> None:
        """Fail every job still held (a no-op after a failed step, which did it already)."""
        if self.error is None:
            self._die(error, logging.WARNING)

    def _die(self, error: Exception, level: int = logging.ERROR) -> None:
        if self.core.jobs:
            log.log(level, "worker group failed; failing %d jobs: %s", len(self.core.jobs), error)
        self.error = error
        for _plan, answer, _sent in self._in_flight:  # their results will never be applied
            if isinstance(answer, asyncio.Future | asyncio.Task):
                answer.cancel()
            elif hasattr(answer, "close"):
                answer.close()
        self._in_flight.clear()
        self._failed.set()
        ids = list(self.core.jobs)
        now = self.clock()
        for jid in ids:
            self.core.abort(jid, now)
        self.core.drain_finished()
        if self.grammars is not None:
            for jid in ids:
                self.grammars.remove(jid)
        self.fail(ids, error)

    def snapshot(self) -> dict:
        core = self.core
        now = self.clock()
        return {
            "jobs": [
                {
                    "id": j.job_id,
                    "state": j.state.value,
                    "queue_level": j.queue_level,
                    "attained_service_s": j.attained_service_s,
                    "residency": core.blocks.residency(j.job_id).value,
                    "waiting_s": now - j.waited_since(),
                    "num_prompt_tokens": j.num_prompt_tokens,
                    "num_output_tokens": len(j.output_ids),
                }
                for j in core.jobs.values()  # not policy.order(): listing must not promote anyone
            ],
            "num_free_gpu_blocks": core.blocks.num_free_gpu_blocks,
            "num_gpu_blocks": core.blocks.num_gpu_blocks,
            "num_free_host_blocks": core.blocks.num_free_host_blocks,
            "num_host_blocks": core.blocks.num_host_blocks,
            "num_preemptions": core.num_preemptions,
            "num_steps": self.num_steps,
            "busy_s": self.busy_s,
            "num_overlapped_steps": self.num_overlapped_steps,
            "num_prompt_tokens_total": self.num_prompt_tokens_total,
            "num_generation_tokens_total": self.num_generation_tokens_total,
            "policy": core.policy.describe(),
            "swap_policy": core.swap_policy.describe(),
        }


def _fields(msg: dict) -> dict:
    return {k: v for k, v in msg.items() if k not in ("kind", "call")}
