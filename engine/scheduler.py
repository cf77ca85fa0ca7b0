"""The scheduler core: who runs in the next iteration. Synchronous, no I/O, no clock.

Each iteration ``schedule(now)`` walks the policy's order, highest priority first, and
gives each job ``min(pending tokens, remaining token budget)`` tokens — its prompt (in
chunks if needed), or the one token it sampled last — until the batch-size cap or the
token budget is reached. There is no prefill or decode phase: a batch mixes both. Jobs
left out keep their KV where it is unless a higher-priority job needs the room; then
victims are taken from the lowest-priority end of the order, and the swap policy says
whether each is swapped to host or recomputed later. A job whose KV is not on the GPU (new,
swapped out, or dropped for recompute) follows its policy's ``AdmissionRules``: with the
MLFQ defaults it never evicts a resident job and gets in only while a reserve of the pool
stays free; the rules are waived for an iteration in which nothing could run otherwise.
A victim that should be swapped but
does not fit the host pool is spared (the job that wanted its room waits) unless nothing
at all could run; only then is its KV dropped for recompute, since that throws away all
the compute it had (``SchedulerConfig.eager_recompute`` drops it at once instead).
``update`` applies the worker's sampled tokens, charges the iteration's measured duration
(or ``SchedulerConfig.fixed_step_time_s``) to every job in it, and finishes jobs that hit a
stop condition. Blocks are the block manager's; the scheduler only asks.

Pipeline parallelism keeps up to ``pipeline_depth`` batches in flight: ``schedule`` may be
called again before the last plan's ``update``. A job whose batch is in flight is never
scheduled, evicted or swapped until its result returns (its token count and last token are
not known until then); results must be applied in the order the plans were made, and the
demotion, promotion and stop checks happen then, when the batch leaves the last stage.
Blocks freed by an abort while a batch is in flight may be reused at once: every rank runs
plans in order, so the batch that still writes them is done before the next one reads.
With depth 1 ``schedule`` and ``update`` simply alternate, except for continuations.

Overlapped steps (``schedule_continuation``): while step N, the only batch in flight, still
runs, step N+1 may be planned as its continuation -- every job of step N that samples feeds
the token step N samples, which the worker already holds (a decode row ``(id, start, 1)``
feeds the runner's own last sampled token), so the engine's planning, update, detokenizing
and streaming overlap the worker's compute instead of sitting between its steps. A
continuation is only made when it is the plan ``schedule`` would make once step N's result
is in, whatever that result: every job held is in step N and samples there, none waits or
is swapped out (so no policy order or eviction could change who runs), and the pool has a
free block for each job that needs one. A job that step N ends for certain (``max_tokens``,
the context length) is left out; one that step N ends by chance (EOS, a stop token, a stop
string, an abort) computes one token that ``update`` drops, as it drops any token of a job
finished while its batch ran. So greedy outputs, stop conditions and preemption behave as
without overlap; only the tokens computed and dropped differ.

Cost. The core runs every iteration of a server and of the simulator (100,000-request runs),
so its bookkeeping is incremental: admission checks counters kept at every state change (no
scan of the waiting queue); an iteration costs O(batch) for the jobs it runs plus a cheap
check per job that cannot run; a job short of room looks for victims only among the
GPU-resident jobs below it, after an O(1) bound says enough room could be found there; a job
off the GPU that needs at least as many blocks as one already refused in the same walk (no
block freed since) is refused without asking; and once nothing below holds GPU blocks and
either the pool is full or a one-block job was refused, the walk stops.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque

from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager, Residency
from engine.memory.swap import EvictMode, SwapPolicy
from engine.plan import BatchJobs, PlanTotals, ScheduledSeq, SeqRow, StepPlan
from engine.policies.base import STRICT_ADMISSION, AdmissionRules, SchedulingPolicy
from engine.policies.mlfq import check_number
from engine.request import FinishReason, Job, JobState

# The plan types live in engine/plan.py; importing them from here keeps working.
__all__ = [
    "AdmissionError", "BatchJobs", "PlanTotals", "QueueFullError", "ScheduledSeq", "Scheduler",
    "SeqRow", "StepPlan",
]

_QUEUED = (JobState.WAITING, JobState.SWAPPED)  # not resident on the GPU: queued work


class AdmissionError(ValueError):
    """A job can never run here (e.g. its prompt alone exceeds the KV pool)."""


class QueueFullError(RuntimeError):
    """Too many jobs are waiting; the client should retry later."""


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        policy: SchedulingPolicy,
        swap_policy: SwapPolicy,
        blocks: BlockManager,
        pipeline_depth: int = 1,
    ) -> None:
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be >= 1")
        fixed = config.fixed_step_time_s
        if fixed is not None:
            check_number("fixed_step_time_s", fixed)
        self.config = config
        self.pipeline_depth = pipeline_depth
        # job id -> step id of its batch in the pipeline. ``schedule`` records its jobs only
        # with depth > 1: with depth 1 it never runs while a batch is in flight
        # (``can_schedule``), so nobody would read them; a continuation's jobs always are.
        self._in_flight: dict[str, int] = {}
        self._track_in_flight = pipeline_depth > 1
        self._plans_in_flight: deque[StepPlan] = deque()  # batches in flight, oldest first
        self.policy = policy
        # The policy's admission rules for jobs whose KV is not on the GPU; None: strict
        # priority (they may evict anything below them), which needs no checks at all.
        rules: AdmissionRules = getattr(policy, "admission", STRICT_ADMISSION)
        self._admission = None if rules.strict else rules
        self._reserve = 0 if rules.strict else rules.reserve_blocks(blocks.num_gpu_blocks)
        self._admission_closed = False  # in_order: a job outside found no room this pass
        self.swap_policy = swap_policy
        # A swap policy that keeps the base ``plan`` proposes nothing: skip asking it (and
        # building its arguments) every iteration.
        self._plans_ahead = type(swap_policy).plan is not SwapPolicy.plan
        self.blocks = blocks
        self.jobs: dict[str, Job] = {}
        self._step_ids = itertools.count()
        self._worker_known: set[str] = set()  # jobs registered with the worker
        self._worker_table_len: dict[str, int] = {}  # block-table length the worker holds
        self._to_free: list[str] = []
        self._finished: list[Job] = []
        # Jobs that may not run in the step being planned: evicted for a more urgent job
        # (running them now would undo that), or, with depth > 1, in flight.
        self._sitting_out: set[str] = set()
        # Output length from which a job's check_stop may fire (Job.first_stop_length):
        # update asks check_stop only from there on.
        self._stop_from: dict[str, int] = {}
        self.num_preemptions = 0
        # Jobs in state WAITING, and the prompt tokens of the jobs queued (WAITING or
        # SWAPPED): counters kept at every state change, so admission does not scan.
        self._num_waiting = 0
        self._queued_prompt_tokens = 0
        # Per fill pass: positions in the order of the jobs that held GPU blocks when it
        # started, and suffix sums of the blocks they held (victim search); None until needed.
        self._resident_pos: list[int] | None = None
        self._resident_suffix: list[int] = []

    def _set_state(self, job: Job, state: JobState) -> None:
        """Every state change of an admitted job goes through here (waiting counters)."""
        old = job.state
        if old is state:
            return
        if old is JobState.WAITING:
            self._num_waiting -= 1
        elif state is JobState.WAITING:
            self._num_waiting += 1
        was, now_queued = old in _QUEUED, state in _QUEUED
        if was != now_queued:
            self._queued_prompt_tokens += len(job.prompt_ids) if now_queued else -len(job.prompt_ids)
        job.state = state

    @property
    def num_waiting(self) -> int:
        """Jobs admitted and waiting to run (not yet run, or preempted by recompute)."""
        return self._num_waiting

    # -- admission / removal ----------------------------------------------------------------
    def add(self, job: Job, now: float) -> None:
        if job.job_id in self.jobs:
            raise AdmissionError(f"duplicate job id {job.job_id!r}")
        if self.blocks.blocks_for(job.num_prompt_tokens + 1) > self.blocks.num_gpu_blocks:
            raise AdmissionError(
                f"prompt of {job.num_prompt_tokens} tokens does not fit the KV cache "
                f"({self.blocks.num_gpu_blocks} blocks of {self.blocks.block_size} tokens)"
            )
        # Admission bounds every job the engine holds, whatever the policy: one full batch
        # (max_num_seqs) plus a queue (max_waiting) of jobs that are not running -- waiting
        # for their first turn, or preempted (swapped to host, or dropped for recompute).
        # A preemptive policy thus cannot pile up preempted jobs past the cap the user set.
        held_cap = self.config.max_num_seqs + self.config.max_waiting
        if len(self.jobs) >= held_cap:
            raise QueueFullError(
                f"{len(self.jobs)} jobs held, at most max_num_seqs={self.config.max_num_seqs} "
                f"running + max_waiting={self.config.max_waiting} queued"
            )
        cap = self.config.max_waiting_tokens
        if cap is not None and job.num_prompt_tokens > cap:
            raise AdmissionError(
                f"prompt of {job.num_prompt_tokens} tokens exceeds max_waiting_tokens={cap}"
            )
        if cap is not None:
            # Queued work: jobs not resident on the GPU (waiting, or swapped out); a counter
            # kept by _set_state, so admission does not scan every job.
            queued = self._queued_prompt_tokens
            if queued + job.num_prompt_tokens > cap:
                raise QueueFullError(
                    f"{queued} prompt tokens queued, {job.num_prompt_tokens} more would pass "
                    f"max_waiting_tokens={cap}"
                )
        job.state = JobState.WAITING
        self._num_waiting += 1
        self._queued_prompt_tokens += job.num_prompt_tokens
        self.jobs[job.job_id] = job
        self._stop_from[job.job_id] = job.first_stop_length()
        self.policy.admit(job, now)

    def abort(self, job_id: str, now: float) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        self._finish(job, FinishReason.ABORT, now)
        return job

    def has_work(self) -> bool:
        return bool(self.jobs) or bool(self._to_free)

    @property
    def num_in_flight(self) -> int:
        """Batches planned whose results have not been applied yet."""
        return len(self._plans_in_flight)

    def can_schedule(self) -> bool:
        """Whether another batch may enter the pipeline now."""
        return len(self._plans_in_flight) < self.pipeline_depth

    def is_in_flight(self, job_id: str) -> bool:
        if job_id in self._in_flight or self._track_in_flight:
            return job_id in self._in_flight
        return any(r[0].job_id == job_id for p in self._plans_in_flight for r in p.batch())

    # -- one iteration ----------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        if not self.can_schedule():
            raise RuntimeError(f"{self.pipeline_depth} batches already in flight")
        plan = StepPlan(step_id=next(self._step_ids), free=self._to_free)
        self._to_free = []
        order = list(self.policy.order(now))
        self._sitting_out = set(self._in_flight) if self._in_flight else set()
        # Dropping a job's KV because the host pool is full wastes all the compute it had:
        # unless configured to, do it only if nothing at all can run otherwise (no deadlock).
        self._fill_batch(order, plan, now, allow_recompute=self.config.eager_recompute)
        if not plan.rows and not (self.config.eager_recompute and self._admission is None):
            # Nothing could run: waive the admission rules and the host pool's limit, so
            # that the most urgent job always makes progress (no deadlock).
            self._fill_batch(order, plan, now, allow_recompute=True, rules=False)
        self._apply_proactive(order, plan, now)
        self.blocks.end_step()
        if plan.rows:
            self._plans_in_flight.append(plan)
            if self._track_in_flight:
                in_flight, step_id = self._in_flight, plan.step_id
                for row in plan.rows:
                    in_flight[row[0].job_id] = step_id
        return plan

    def schedule_continuation(self, last: StepPlan) -> StepPlan | None:
        """Step N+1 while ``last`` (step N, the only batch in flight) runs: each of its jobs
        that samples feeds the token step N samples (see the module docstring). None, with
        nothing changed, unless that is exactly the plan ``schedule`` would make after step
        N's result, whatever it is."""
        if [p.step_id for p in self._plans_in_flight] != [last.step_id] or not last.seqs:
            return None
        if self._num_waiting or len(self.jobs) > len(last.seqs):
            return None  # someone else might be chosen, or need room: plan after the result
        blocks = self.blocks
        carry: list[tuple[ScheduledSeq, int]] = []  # (seq of step N, blocks it needs next)
        held = 0
        for seq in last.seqs:
            job = seq.job
            if job.state is JobState.FINISHED:
                continue  # aborted or stopped while step N runs: it will not run again
            if not seq.sample or job.state is not JobState.RUNNING:
                return None  # a prompt chunk feeds known tokens: the ordinary plan does it
            held += 1
            outputs = len(job.output_ids) + 1  # once step N's token is applied
            if outputs >= job.params.max_tokens or job.num_prompt_tokens + outputs >= job.max_model_len:
                continue  # step N's token ends it for certain
            end = seq.start + seq.num_tokens
            carry.append((seq, blocks.extra_blocks_needed(job.job_id, end + 1)))
        if held != len(self.jobs) or not carry:
            return None
        if sum(need for _, need in carry) > blocks.num_free_gpu_blocks:
            return None  # someone would have to be evicted: that is the ordinary plan's call
        plan = StepPlan(step_id=next(self._step_ids), free=self._to_free)
        self._to_free = []
        table_len = self._worker_table_len
        for seq, need in carry:
            job_id = seq.job.job_id
            start = seq.start + seq.num_tokens
            if need:
                blocks.allocate(job_id, start + 1)
            table = blocks.gpu_table(job_id)
            known, size = table_len.get(job_id), len(table)
            if known == size:
                plan.seqs.append(ScheduledSeq(seq.job, start, 1, (), False, True))
            else:  # as in _fill_batch: a delta, or the whole table if the worker's is stale
                reset = known is None or known > size
                plan.seqs.append(ScheduledSeq(seq.job, start, 1, list(table) if reset else table[known:],
                                              reset, True))
                table_len[job_id] = size
            self._in_flight[job_id] = plan.step_id
        self._plans_in_flight.append(plan)
        return plan

    def _fill_batch(
        self, order: list[Job], plan: StepPlan, now: float, allow_recompute: bool,
        rules: bool = True,
    ) -> None:
        # This loop runs for every job of every iteration (tens of millions of times in a
        # 100,000-request simulation), so it reads attributes into locals once, inlines the
        # block-table arithmetic, and does only the checks that can be true here. The batch
        # is empty when a pass starts (the second pass runs only if the first placed
        # nothing) and each job appears once in ``order``, so no job the walk meets is in
        # the batch already, and every job placed sits above the position the walk has
        # reached, i.e. above every victim (``_pick_victims`` looks only below it): no set of
        # the batch's jobs is needed here.
        # The plan's totals, kept up as jobs join (``pairs`` is twice the attention pairs
        # less the tokens: sum of n * (start + end), cheaper to add up).
        placed, tokens, sampled, context, attended = plan.summed()
        pairs = 2 * attended - tokens
        budget = self.config.max_num_batched_tokens - tokens
        max_seqs = self.config.max_num_seqs
        rows = plan.rows  # the fill walk is the only writer: nobody has asked for seqs yet
        add_row = rows.append
        blocks = self.blocks
        in_flight = self._in_flight
        sitting_out = self._sitting_out
        finished, running = JobState.FINISHED, JobState.RUNNING
        table_of = blocks.gpu_tables.get
        table_len = self._worker_table_len
        known_len = table_len.get
        worker_known = self._worker_known
        block_size = blocks.block_size
        self._resident_pos = None  # victim index: built on the first shortage of this pass
        self._admission_closed = False
        admission = self._admission if rules else None
        # The most urgent job not in flight (with depth 1 nothing is in flight: order[0]).
        head = next((i for i, j in enumerate(order) if j.job_id not in in_flight), -1)
        # The smallest need of a job off the GPU that this pass refused, and the free blocks
        # then. Whatever refused it (no room under the admission rules, or too little to
        # evict below it) refuses every job further down that needs at least as much while
        # no block has been freed since: such a job has no more room and fewer jobs below
        # it. Under overload thousands of waiting jobs sit below a full pool, and this
        # turns each of them into a few comparisons instead of the admission path.
        refused_need = refused_free = -1
        for pos, job in enumerate(order):
            if placed >= max_seqs or budget <= 0:
                break
            job_id = job.job_id
            if job_id in sitting_out:
                continue  # evicted for a more urgent job this step, or its last batch in flight
            state = job.state
            if state is finished:
                continue  # a second pass: stopped for good by the first
            start = job.num_computed_tokens
            total = len(job.prompt_ids) + len(job.output_ids)
            end = total if total - start <= budget else start + budget
            n = end - start
            sample = end == total
            # The block-table length the worker holds: when known, it is the table's own
            # (every change to a table either is followed by this job's placement, which
            # records the new length, or drops the entry; check_integrity checks it).
            known = known_len(job_id)
            if known is not None and known * block_size >= end:
                # Resident, the worker's table up to date, room for these tokens already:
                # a decode step, mostly. Nothing to allocate, nothing to tell the worker.
                add_row((job, start, n, (), False, sample))
            else:
                table = table_of(job_id, ())
                size = len(table)
                if size * block_size < end:  # get the blocks, evicting below if needed
                    if size:  # resident and growing (a decode crossing a block boundary)
                        need = -(-end // block_size) - size
                    elif pos != head and blocks.waits_its_turn(job_id):
                        continue  # reserved behind another reservation: no room is enough
                    elif (refused_need >= 0 and -(-end // block_size) >= refused_need
                          and blocks.num_free_gpu_blocks <= refused_free):
                        continue  # needs at least every block of ``end``: refused as well
                    else:
                        need = blocks.extra_blocks_needed(job_id, end)
                    if size and need <= blocks.num_free_gpu_blocks:
                        blocks.allocate(job_id, end)  # room without evicting anyone
                    elif need and not self._make_resident(
                        job, need, end, order, pos, plan, now, allow_recompute,
                        admission if not size else None,
                    ):
                        free = blocks.num_free_gpu_blocks
                        if not size and (refused_need < 0 or need < refused_need
                                         or free > refused_free):
                            refused_need, refused_free = need, free
                        if pos == head and not self._fits_alone(job, n):
                            # Even an empty pool cannot hold it: stop it rather than deadlock.
                            self._finish(job, FinishReason.LENGTH, now)
                        elif (free == 0 or 0 <= refused_need <= 1) and not self._resident_below(
                                pos, order):
                            # Every job further down is off the GPU and needs a block (one
                            # is what was just refused), and none below holds one.
                            break
                        continue
                    table = table_of(job_id, ())
                    size = len(table)
                    state = job.state
                # What the worker must add to its copy of the block table.
                if known == size:
                    add_row((job, start, n, (), False, sample))
                else:
                    reset = known is None or known > size
                    add_row((job, start, n, list(table) if reset else table[known:], reset, sample))
                    table_len[job_id] = size
                    # A job the worker has never seen has no table there yet (and one it has
                    # seen keeps an entry until it finishes, is swapped or is recomputed).
                    if known is None and job_id not in worker_known:
                        worker_known.add(job_id)
                        plan.new_jobs.append(job)
                        if job.stats.first_scheduled_time is None:
                            job.stats.first_scheduled_time = now
            if state is not running:
                self._set_state(job, running)
            placed += 1
            budget -= n
            sampled += sample
            context += start
            pairs += n * (start + end)
        tokens = self.config.max_num_batched_tokens - budget
        plan.totals = PlanTotals(placed, tokens, sampled, context, (pairs + tokens) >> 1)

    def update(self, plan: StepPlan, sampled: dict[str, int], step_time_s: float, now: float) -> list[Job]:
        """Apply a step's results (the oldest batch in flight). Returns the jobs that got a
        token or finished."""
        seqs = plan.batch()
        if seqs:
            flying = self._plans_in_flight
            if not flying or flying[0].step_id != plan.step_id:
                raise RuntimeError(f"results of step {plan.step_id} applied out of order")
            flying.popleft()
            in_flight = self._in_flight
            if in_flight:  # with depth 1, only a continuation's jobs are ever in it
                step_id = plan.step_id
                for row in seqs:
                    job_id = row[0].job_id
                    if in_flight.get(job_id) == step_id:  # not if a continuation holds it
                        del in_flight[job_id]
        if self.config.fixed_step_time_s is not None:
            step_time_s = self.config.fixed_step_time_s
        touched: list[Job] = []
        charge = self.policy.charge
        finished = JobState.FINISHED
        stop_from = self._stop_from
        for job, start, n, _, _, sample in seqs:  # every job of every iteration: locals only
            if job.state is finished:  # aborted while the step ran
                continue
            job.num_computed_tokens = start + n
            charge(job, step_time_s, now)
            if not sample:
                continue
            job_id = job.job_id
            out = job.output_ids
            out.append(sampled[job_id])
            stats = job.stats
            if stats.first_token_time is None:
                stats.first_token_time = now
            stats.last_token_time = now
            if len(out) >= stop_from[job_id]:  # below it no token can stop the job
                reason = job.check_stop()
                if reason is not None:
                    self._finish(job, reason, now)
            touched.append(job)
        return touched

    def finish(self, job_id: str, reason: FinishReason, now: float) -> None:
        """Finish a job for a reason found outside (a stop string in the detokenizer)."""
        job = self.jobs.get(job_id)
        if job is not None:
            self._finish(job, reason, now)

    # -- helpers ----------------------------------------------------------------------------
    def _fits_alone(self, job: Job, n: int) -> bool:
        return self.blocks.blocks_for(job.num_computed_tokens + n) <= self.blocks.num_gpu_blocks

    def _make_resident(
        self, job: Job, need: int, num_tokens: int, order: list[Job], pos: int, plan: StepPlan,
        now: float, allow_recompute: bool = True, admission: AdmissionRules | None = None,
    ) -> bool:
        """Give ``job`` (``order[pos]``), which needs ``need`` more GPU blocks, room for
        ``num_tokens``, evicting jobs below it in the order if needed. ``admission``: the
        rules for a job whose KV is not on the GPU (see ``AdmissionRules``), or None."""
        blocks = self.blocks
        short = need - blocks.num_free_gpu_blocks
        if admission is not None:
            if self._admission_closed:
                return False
            if blocks.num_gpu_jobs:
                short += self._reserve  # room left for the resident jobs to grow
            if short > 0 and not admission.evict_to_admit:
                self._admission_closed = admission.in_order
                return False
        if short > 0:
            victims = self._pick_victims(order, pos, short, allow_recompute)
            if victims is None:
                if admission is not None:
                    self._admission_closed = admission.in_order
                return False  # evicting everyone allowed below would not be enough: evict no one
            for victim, mode in victims:
                self._evict(victim, mode, plan, now)
        if blocks.residency(job.job_id) is Residency.HOST:
            plan.swap_in.extend(blocks.swap_in(job.job_id))
            self._note_swapped_in(job, now)
        blocks.allocate(job.job_id, num_tokens)
        return True

    def _resident_index(self, order: list[Job]) -> list[int]:
        """Positions in ``order`` of the jobs holding GPU blocks, built once per fill pass.
        Jobs only lose GPU blocks below the walk's position (evictions), and the ones that
        gain them are placed in the batch, so the index stays a superset of the victims."""
        if self._resident_pos is None:
            gpu = self.blocks.gpu_job_ids()
            self._resident_pos = [i for i, j in enumerate(order) if j.job_id in gpu]
            held = [self.blocks.num_blocks_held(order[i].job_id) for i in self._resident_pos]
            suffix = [0] * (len(held) + 1)
            for k in range(len(held) - 1, -1, -1):
                suffix[k] = suffix[k + 1] + held[k]
            self._resident_suffix = suffix
        return self._resident_pos

    def _resident_below(self, pos: int, order: list[Job]) -> bool:
        """Whether a job below ``pos`` in ``order`` holds GPU blocks (it may after this pass
        indexed them only if the walk placed it, and the walk has not reached it yet)."""
        rp = self._resident_index(order)
        return bool(rp) and rp[-1] > pos

    def _pick_victims(
        self, order: list[Job], pos: int, short: int, allow_recompute: bool,
    ) -> list[tuple[Job, EvictMode]] | None:
        """Resident jobs below ``order[pos]`` to evict, lowest priority first, that free
        ``short`` GPU blocks; None if they cannot. Without ``allow_recompute`` a job the swap
        policy would swap but the host pool has no room for is spared. (No job below
        ``pos`` is in the batch: the walk places jobs in order.)"""
        rp = self._resident_index(order)
        first = bisect.bisect_right(rp, pos)
        if self._resident_suffix[first] < short:
            return None  # every resident job below together holds too little
        host_room = self.blocks.num_free_host_blocks
        chosen: list[tuple[Job, EvictMode]] = []
        for k in range(len(rp) - 1, first - 1, -1):
            if short <= 0:
                break
            victim = order[rp[k]]
            if self.blocks.residency(victim.job_id) is not Residency.GPU:
                continue
            if victim.job_id in self._in_flight:
                continue  # its batch is still computing with these blocks
            held = self.blocks.num_blocks_held(victim.job_id)
            mode = self.swap_policy.evict(victim, self.blocks)
            if mode == "swap":
                if held <= host_room:
                    host_room -= held
                elif allow_recompute:
                    mode = "recompute"  # the host pool is full: fall back
                else:
                    continue
            chosen.append((victim, mode))
            short -= held
        return chosen if short <= 0 else None

    def _evict(self, victim: Job, mode: EvictMode, plan: StepPlan, now: float) -> None:
        self._sitting_out.add(victim.job_id)
        self.num_preemptions += 1
        victim.stats.preemptions += 1
        if mode == "swap":
            plan.swap_out.extend(self._swap_out(victim, now))
        else:
            self._recompute(victim)

    def _swap_out(self, job: Job, now: float) -> list[tuple[int, int]]:
        pairs = self.blocks.swap_out(job.job_id)
        self._worker_table_len.pop(job.job_id, None)
        self._set_state(job, JobState.SWAPPED)
        job.swapped_since = now
        job.stats.swap_outs += 1
        return pairs

    def _note_swapped_in(self, job: Job, now: float) -> None:
        self._worker_table_len.pop(job.job_id, None)
        job.stats.swap_ins += 1
        if job.swapped_since is not None:
            job.stats.swapped_time_s += now - job.swapped_since
            job.swapped_since = None

    def _recompute(self, job: Job) -> None:
        self.blocks.free(job.job_id)
        self._worker_table_len.pop(job.job_id, None)
        job.num_computed_tokens = 0
        self._set_state(job, JobState.WAITING)
        job.stats.recomputes += 1

    def _apply_proactive(self, order: list[Job], plan: StepPlan, now: float) -> None:
        if not self._plans_ahead:
            return
        batch = BatchJobs(plan.batch())
        proposal = self.swap_policy.plan(self.blocks, order, batch)
        swapped_out_now: set[str] = set()
        in_batch = {j.job_id for j in batch} if proposal.swap_out else set()
        for job in proposal.swap_out:
            if job.job_id in in_batch or job.is_finished or job.job_id in self._in_flight:
                continue
            if self.blocks.residency(job.job_id) is Residency.GPU and self.blocks.can_swap_out(job.job_id):
                plan.offload.extend(self._swap_out(job, now))
                swapped_out_now.add(job.job_id)
        if plan.swap_out or plan.offload:
            return  # no ping-pong: a step that offloads does not also upload
        for job in proposal.swap_in:
            if job.job_id in swapped_out_now or job.job_id in self._sitting_out or job.is_finished:
                continue
            if self.blocks.can_swap_in(job.job_id):
                plan.prefetch.extend(self.blocks.swap_in(job.job_id))
                self._note_swapped_in(job, now)
                self._set_state(job, JobState.RUNNING)

    def _finish(self, job: Job, reason: FinishReason, now: float) -> None:
        if job.is_finished:
            return
        if job.swapped_since is not None:
            job.stats.swapped_time_s += now - job.swapped_since
            job.swapped_since = None
        self._set_state(job, JobState.FINISHED)
        job.finish_reason = reason
        job.stats.finish_time = now
        self.policy.remove(job)
        self.blocks.free(job.job_id)
        self._finished.append(job)
        self.jobs.pop(job.job_id, None)
        self._stop_from.pop(job.job_id, None)
        self._worker_table_len.pop(job.job_id, None)
        if job.job_id in self._worker_known:
            self._worker_known.discard(job.job_id)
            self._to_free.append(job.job_id)

    def drain_finished(self) -> list[Job]:
        """Jobs finished since the last call, for whoever reports them."""
        done, self._finished = self._finished, []
        return done

    # -- introspection ----------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.blocks.check_integrity()
        waiting = sum(1 for j in self.jobs.values() if j.state is JobState.WAITING)
        queued = sum(j.num_prompt_tokens for j in self.jobs.values() if j.state in _QUEUED)
        if waiting != self._num_waiting or queued != self._queued_prompt_tokens:
            raise AssertionError("waiting counters disagree with the jobs' states")
        for job_id, size in self._worker_table_len.items():
            if len(self.blocks.gpu_table(job_id)) != size:
                raise AssertionError(f"job {job_id}: the worker's table length is out of date")
        ordered = [j.job_id for j in self.policy.order(0.0)]
        if len(ordered) != len(set(ordered)):
            raise AssertionError("a job appears twice in the policy order")
        if set(ordered) != set(self.jobs):
            raise AssertionError("policy order and scheduler jobs disagree")
        for job in self.jobs.values():
            res = self.blocks.residency(job.job_id)
            expect = {
                JobState.WAITING: (Residency.NONE, Residency.GPU),
                JobState.RUNNING: (Residency.GPU,),
                JobState.SWAPPED: (Residency.HOST,),
            }[job.state]
            if res not in expect:
                raise AssertionError(f"job {job.job_id} is {job.state} but its KV is {res}")
