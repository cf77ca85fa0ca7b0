"""Run a workload through the real scheduler core on a virtual clock.

The loop is the scheduler actor's, with the worker replaced by the cost model: jobs that
have arrived by the start of a step are admitted (arrivals during a step wait for its end,
as they do in the engine), the core plans the step, the cost model says how long it took,
the clock advances by that much and ``update`` charges it to every job in the batch. The
"model" samples a fixed non-EOS token and jobs run with ``ignore_eos``, so every job
produces exactly its output length. Everything is deterministic.

A job the scheduler refuses on arrival (the waiting queue is full, or its prompt can never
fit the KV cache) is counted as rejected, as a server answers it with an error; the run
goes on. The cost model is either measured (:class:`engine.sim.cost.CostModel`, from a
profile) or analytic (:class:`engine.sim.analytic.AnalyticCost`, from a GPU and a model
shape); the simulator only calls ``step(plan)``.
With a scheduler of pipeline depth P (pipeline parallelism over P stages), a step's cost is
split evenly over P stages and up to P batches are in flight: a batch enters stage ``s``
when both it has left stage ``s - 1`` and the stage has finished the batch before it. The
loop plans while the pipeline has room, then waits for the oldest batch to leave the last
stage and applies its result, charging each job the time its batch spent in the pipeline.
With P = 1 this is the plain plan -> cost -> update loop.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.bench.metrics import RequestRecord, nearest_rank, saturated_capacity
from engine.bench.workload import WorkItem
from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.plan import StepPlan
from engine.policies.profile import PrefillProfile
from engine.policies.registry import (
    bind_memory,
    create_scheduling_policy,
    create_swap_policy,
    wants_profile,
)
from engine.request import Job
from engine.sampling import SamplingParams
from engine.scheduler import AdmissionError, QueueFullError, Scheduler
from engine.sim.cost import CostModel

TOKEN = 1  # every prompt token and every sampled token; never EOS (EOS is ignored anyway)

# The capacity run behind ``--load`` (every job queued at t=0, FCFS) needs a waiting queue
# that outlasts the start-up burst many times over, so that the window it measures is the
# steady state in which the batch is bounded by the KV cache (or the batch cap), as it is
# at a rate near capacity. With only as many jobs as fit at once, every job starts at t=0
# and the "capacity" is that of a burst, which is lower than what FCFS sustains (so
# "0.9 x capacity" left the KV cache half empty and nothing ever waited).
CAPACITY_ROUNDS = 8  # jobs = this many times the jobs that run at once
CAPACITY_MIN_JOBS = 200
CAPACITY_MAX_JOBS = 4000


@dataclass
class SimResult:
    jct: list[float]  # per admitted item, in workload order: finish - arrival
    ttft: list[float]  # first token - arrival
    makespan: float  # first arrival (t=0) to last finish
    output_tokens: int
    steps: int
    preemptions: int
    forward_steps: int = 0  # steps that ran a forward (the others only moved or freed blocks)
    swap_out_blocks: int = 0  # demand + proactive
    swap_in_blocks: int = 0
    proactive_blocks: int = 0  # of those, moved ahead of need (out + in)
    recomputes: int = 0
    busy_s: float = 0.0  # time spent in steps (makespan minus idle gaps)
    jobs: list[Job] = field(default_factory=list, repr=False)
    # per admitted item; with record_tokens=False only [first, last] token times
    token_times: list[list[float]] = field(default_factory=list, repr=False)
    rejected: list[int] = field(default_factory=list)  # indices of items refused on arrival
    records: list[RequestRecord] = field(default_factory=list, repr=False)  # per item

    @property
    def saturated_capacity(self) -> float:
        """See :func:`engine.bench.metrics.saturated_capacity` (all items at t=0)."""
        return saturated_capacity(self.token_times, [len(ts) for ts in self.token_times])

    @property
    def mean_jct(self) -> float:
        return statistics.mean(self.jct)

    @property
    def p99_jct(self) -> float:
        return nearest_rank(self.jct, 0.99)

    @property
    def mean_ttft(self) -> float:
        return statistics.mean(self.ttft)

    @property
    def throughput(self) -> float:
        """Output tokens per second over the makespan."""
        return self.output_tokens / self.makespan if self.makespan > 0 else math.inf


class SimulationStalled(RuntimeError):
    """Jobs remain, nothing can run and no arrival is pending: the policy deadlocked."""


def simulate(
    scheduler: Scheduler,
    items: Sequence[WorkItem],
    cost: CostModel,
    *,
    max_steps: int = 100_000_000,
    check_every: int = 0,
    priority: Callable[[WorkItem], int] | None = None,
    max_model_len: int | None = None,
    record_tokens: bool = True,
) -> SimResult:
    """Run ``items`` through ``scheduler`` (fresh, empty) and return per-job metrics.

    ``check_every`` > 0 runs ``scheduler.check_integrity()`` every that many steps (tests).
    ``priority`` gives each job its request priority (``SamplingParams.priority``, used by
    the ``priority`` policy); ``lambda it: it.output_len`` makes that policy an oracle
    shortest-job-first, a bound no policy that does not know output lengths can beat much.
    ``max_model_len`` is each job's context length (what ``orca-fcfs`` reserves).
    ``record_tokens=False`` keeps only each job's first and last token time (large runs:
    every token time of 100,000 jobs would take gigabytes).
    """
    if scheduler.jobs:
        raise ValueError("simulate needs an empty scheduler")
    ctx = {"max_model_len": max_model_len} if max_model_len else {}
    # SamplingParams are frozen and validated on construction (tens of microseconds): jobs
    # with the same length and priority share one.
    params: dict[tuple[int, int], SamplingParams] = {}

    def params_for(it: WorkItem) -> SamplingParams:
        key = (it.output_len, priority(it) if priority else 0)
        p = params.get(key)
        if p is None:
            p = params[key] = SamplingParams(max_tokens=key[0], temperature=0.0,
                                             ignore_eos=True, priority=key[1])
        return p

    jobs = [
        Job(job_id=f"sim-{i}", prompt_ids=[TOKEN] * it.prompt_len, params=params_for(it),
            arrival_time=it.arrival_s, **ctx)
        for i, it in enumerate(items)
    ]
    index = {j.job_id: i for i, j in enumerate(jobs)}
    # The model's answer for every job, built once: ``update`` looks up only the jobs that
    # sample, so no per-step dict is needed.
    answers = dict.fromkeys(index, TOKEN)
    times: list[list[float]] = [[] for _ in jobs]
    times_of = {j.job_id: ts for j, ts in zip(jobs, times, strict=True)}
    rejected: list[int] = []
    pending = sorted(jobs, key=lambda j: j.arrival_time)
    nxt = 0
    now = 0.0
    steps = forwards = 0
    busy = busy_until = 0.0
    swapped_out = swapped_in = offloaded = prefetched = 0
    preempted_before = scheduler.num_preemptions
    step_cost = cost.step
    depth = scheduler.pipeline_depth
    stage_free = [0.0] * depth  # when each pipeline stage finishes its current batch
    # (plan, sent, leaves the last stage, whole-model cost)
    in_flight: deque[tuple[StepPlan, float, float, float]] = deque()
    while nxt < len(pending) or scheduler.has_work() or in_flight:
        while nxt < len(pending) and pending[nxt].arrival_time <= now:
            try:
                scheduler.add(pending[nxt], now)
            except (QueueFullError, AdmissionError):
                rejected.append(index[pending[nxt].job_id])
            nxt += 1
        if not scheduler.has_work() and not in_flight:
            if nxt < len(pending):
                now = pending[nxt].arrival_time  # idle until the next arrival
            continue
        plan = scheduler.schedule(now) if scheduler.can_schedule() and len(in_flight) < depth else None
        if plan is not None and plan.is_empty():
            plan = None
            if not in_flight:
                if scheduler.jobs and nxt == len(pending):
                    raise SimulationStalled(f"{len(scheduler.jobs)} jobs left and none can run")
                if nxt < len(pending):
                    now = max(now, pending[nxt].arrival_time)
                continue
        if plan is not None:
            swapped_out += len(plan.swap_out)
            swapped_in += len(plan.swap_in)
            offloaded += len(plan.offload)
            prefetched += len(plan.prefetch)
            took = step_cost(plan).seconds
            t = now
            for stage in range(depth):
                t = stage_free[stage] = max(t, stage_free[stage]) + took / depth
            in_flight.append((plan, now, t if depth > 1 else now + took, took))
            forwards += plan.num_seqs > 0
            steps += 1
            if len(in_flight) < depth and scheduler.can_schedule():
                continue  # fill the pipeline before waiting for a result
        plan, sent, done, took = in_flight.popleft()
        busy += done - max(now, busy_until)
        busy_until = now = max(now, done)
        # The jobs that got a token (no job is aborted here, so every one that sampled).
        # Without record_tokens the first and last token times come from the jobs' stats.
        got = scheduler.update(plan, answers, done - sent if depth > 1 else took, now)
        if record_tokens:
            for job in got:
                times_of[job.job_id].append(now)
        scheduler.drain_finished()
        if check_every and steps % check_every == 0:
            scheduler.check_integrity()
        if steps > max_steps:
            raise SimulationStalled(f"more than {max_steps} steps")
    refused = set(rejected)
    unfinished = [j.job_id for i, j in enumerate(jobs)
                  if i not in refused and j.stats.finish_time is None]
    if unfinished:
        raise SimulationStalled(f"jobs never finished: {unfinished[:5]}")
    if not record_tokens:
        for j, ts in zip(jobs, times, strict=True):
            if j.output_ids:
                first, last = j.stats.first_token_time, j.stats.last_token_time
                ts.extend((first,) if len(j.output_ids) == 1 else (first, last))
    done = [j for i, j in enumerate(jobs) if i not in refused]
    records = []
    for i, (it, j) in enumerate(zip(items, jobs, strict=True)):
        rec = RequestRecord(it.prompt_len, it.output_len, it.arrival_s)
        if i in refused:
            rec.rejected, rec.error = True, "refused on arrival (queue full or prompt too long)"
        else:
            rec.token_s = times[i]
            rec.finish_s = j.stats.finish_time
            rec.scheduled_s = j.stats.first_scheduled_time
            if not record_tokens:
                rec.num_tokens = len(j.output_ids)
        records.append(rec)
    return SimResult(
        jct=[j.stats.finish_time - j.arrival_time for j in done],
        ttft=[j.stats.first_token_time - j.arrival_time for j in done],
        makespan=max((j.stats.finish_time for j in done), default=0.0),
        output_tokens=sum(len(j.output_ids) for j in done),
        steps=steps,
        preemptions=scheduler.num_preemptions - preempted_before,
        forward_steps=forwards,
        swap_out_blocks=swapped_out + offloaded,
        swap_in_blocks=swapped_in + prefetched,
        proactive_blocks=offloaded + prefetched,
        recomputes=sum(j.stats.recomputes for j in done),
        busy_s=busy,
        jobs=jobs,
        token_times=[times[i] for i in range(len(jobs)) if i not in refused],
        rejected=rejected,
        records=records,
    )


def concurrent_jobs(items: Sequence[WorkItem], kv_tokens: int, max_num_seqs: int) -> float:
    """About how many jobs of ``items`` run at once in a full batch: the KV cache over the
    mean context a running job holds (its prompt and half its output), at most the cap."""
    if not items:
        raise ValueError("need at least one item")
    mean_context = statistics.fmean(it.prompt_len + it.output_len / 2 for it in items)
    return min(float(max_num_seqs), kv_tokens / mean_context)


def capacity_jobs(items: Sequence[WorkItem], kv_tokens: int, max_num_seqs: int) -> int:
    """How many jobs the capacity run queues at t=0 (see ``CAPACITY_ROUNDS``)."""
    n = math.ceil(CAPACITY_ROUNDS * concurrent_jobs(items, kv_tokens, max_num_seqs))
    return max(CAPACITY_MIN_JOBS, min(CAPACITY_MAX_JOBS, n))


def fcfs_capacity(scheduler: Scheduler, items: Sequence[WorkItem], cost: CostModel,
                  max_model_len: int | None = None) -> float:
    """Jobs per second ``scheduler`` (fresh, FCFS, ``max_waiting`` at least ``len(items)``)
    sustains with every item queued at t=0: ``saturated_capacity`` of that run, which
    counts the work done until the queue ran dry. Size ``items`` with :func:`capacity_jobs`
    so that the queue outlasts the start-up burst."""
    if any(it.arrival_s for it in items):
        raise ValueError("the capacity run queues every item at t=0")
    res = simulate(scheduler, items, cost, max_model_len=max_model_len)
    if res.rejected:
        raise ValueError(f"{len(res.rejected)} items were refused: raise max_waiting")
    return res.saturated_capacity


def calibrate_overhead(
    scheduler: Scheduler,
    items: Sequence[WorkItem],
    cost: CostModel,
    measured_makespan_s: float,
) -> float:
    """The per-step overhead that makes a simulated run of ``items`` take
    ``measured_makespan_s`` on ``scheduler`` (fresh, empty), for a run whose step sequence
    does not depend on step times (fcfs with every item at t=0): the makespan is then the
    sum of the steps, linear in the overhead. Never negative: a model that is already
    slower than the measurement gets 0.
    """
    if any(it.arrival_s for it in items):
        raise ValueError("calibrate on a run with every item at t=0")
    base = simulate(scheduler, items, cost.with_overhead(0.0))
    return max(0.0, (measured_makespan_s - base.makespan) / base.forward_steps)


def calibrate_decode_line(
    runs: Sequence[tuple[Callable[[], Scheduler], Sequence[WorkItem], float]],
    cost: CostModel,
) -> CostModel:
    """``cost`` with its decode curve replaced by the line ``d1 + slope * (batch - 1)``
    (over the profile's decode batch sizes; no per-step overhead) that makes simulated runs
    last as long as measured ones. ``runs``: (fresh-scheduler factory, items all at t=0,
    measured makespan), at least two whose batches differ (say, one with a batch cap of 1
    and one saturating the cap), on step sequences that do not depend on step times (fcfs).

    Why: the worker's own decode profile is taken in a tight loop on an idle worker, and on
    a shared CPU it can miss what a step costs in service by more than the difference
    between batch sizes (one profile here measured batch 1 at 31 ms and batch 4 at 28 ms,
    while batch-1 steps in service took 26 ms); one overhead calibrated on a saturated run
    then prices every small batch too high. Fitted on served runs, the line is what
    service costs. A negative slope fits as flat (the best single step time); the
    intercept is never negative.
    """
    if len(runs) < 2:
        raise ValueError("fitting a line takes at least two runs")
    xs = [x for x, _ in cost.profile.decode_points] or [1]
    xs = sorted(set(xs) | {1})

    def priced(d1: float, slope: float) -> CostModel:
        line = PrefillProfile(cost.profile.prefill_points,
                              [(x, d1 + slope * (x - 1)) for x in xs])
        return CostModel(line, cost.swap_s_per_block, cost.overlap, 0.0)

    rows = []  # makespan = c + d1 * u + slope * v, exactly (a fixed step sequence)
    for make, items, measured in runs:
        if any(it.arrival_s for it in items):
            raise ValueError("calibrate on runs with every item at t=0")
        c = simulate(make(), items, priced(0.0, 0.0)).makespan
        u = simulate(make(), items, priced(1.0, 0.0)).makespan - c
        v = simulate(make(), items, priced(0.0, 1.0)).makespan - c
        rows.append((u, v, measured - c))
    # Least squares over the runs (exact for two): the 2x2 normal equations.
    suu = sum(u * u for u, _, _ in rows)
    suv = sum(u * v for u, v, _ in rows)
    svv = sum(v * v for _, v, _ in rows)
    suy = sum(u * y for u, _, y in rows)
    svy = sum(v * y for _, v, y in rows)
    det = suu * svv - suv * suv
    d1 = slope = 0.0
    if det > 1e-12 * max(1.0, suu * svv):
        d1, slope = (suy * svv - svy * suv) / det, (svy * suu - suy * suv) / det
    if slope < 0.0 or det <= 1e-12 * max(1.0, suu * svv):
        slope = 0.0
        d1 = suy / suu if suu else 0.0
    return priced(max(0.0, d1), slope)


def build_scheduler(
    config: SchedulerConfig,
    num_gpu_blocks: int,
    num_host_blocks: int,
    block_size: int,
    profile: PrefillProfile,
    pipeline_depth: int = 1,
) -> Scheduler:
    """A fresh scheduler core as the engine builds one: policies from the registry by name
    with ``config``'s options, and ``profile`` for a policy that wants one and was given
    none in its options (skip-join)."""
    policy = create_scheduling_policy(config.policy, dict(config.policy_options))
    swap = create_swap_policy(config.swap_policy, dict(config.swap_policy_options))
    if wants_profile(policy):
        policy.set_profile(profile)
    blocks = BlockManager(num_gpu_blocks, num_host_blocks, block_size)
    bind_memory(policy, blocks)
    return Scheduler(config, policy, swap, blocks, pipeline_depth=pipeline_depth)
