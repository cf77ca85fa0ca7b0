"""Multi-level feedback queue (MLFQ) at iteration level, with a starvation guard.

Queues are numbered 0 (highest priority) downwards. Queue ``i`` has quantum
``base_quantum_s * quantum_ratio ** i`` seconds of attained service. Invariants:

* every admitted, unfinished job sits in exactly one queue; ``job.queue_level`` names it;
* ``job.level_service_s`` is the service charged since the job entered its current queue;
  once it reaches that queue's quantum the job drops one level and the counter restarts
  (in the last queue, if ``num_queues`` is bounded, it just keeps running there: first
  come, first served, which is the better order for jobs with no length information);
* ``order`` yields the highest queue first and, within a queue, jobs in the order they
  *entered that queue* (FIFO per queue, as in the paper: a demoted or promoted job goes to
  the tail of its new queue; on admission, entry order is arrival order);
* a job that has not run for more than ``starvation_limit_s`` (``now - job.waited_since()``)
  is moved to the tail of queue 0 when ``order(now)`` is called (``stats.promotions``);
  with ``pin_promoted`` (the default) it then stays in queue 0 until it finishes.

Why pin: the classic guard lets a promoted job drop again after one small quantum. When
preemption discards KV (recompute, or swap with a full host pool), every promotion can
evict a job that was close to done, and under overload promotions never stop, so the
order never settles and no job may ever finish (a livelock the stateful scheduler test
finds within seconds). Pinned, each job is promoted at most once, the order settles once
arrivals stop, and a starved job's wait is bounded: it can only be overtaken by jobs that
entered queue 0 before it.

``initial_level`` is the hook that skip-join overrides; everything else is shared.

Cost: ``charge`` is O(1); ``order`` is O(jobs) list building (C-level) plus O(promoted log n)
for the starvation guard, which keeps a heap of candidate jobs keyed by the time they last
ran, so finding the starving ones does not scan every queue each iteration.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from typing import Any

from engine.policies.base import AdmissionRules, SchedulingPolicy
from engine.request import Job

# Defaults are sized for CPU-scale iterations (the bundled 135M model decodes a step in
# tens of milliseconds on CPU; real models on a GPU take 10-50 ms per iteration): the top
# queue gives a job about one or two iterations, so a short job reaches its first token
# before anything that has already run longer; each level below doubles the quantum, as
# in the paper; eight levels take the last quantum to 6.4 s, past which order is FCFS.
DEFAULT_BASE_QUANTUM_S = 0.05
DEFAULT_QUANTUM_RATIO = 2.0
DEFAULT_NUM_QUEUES = 8
# Well above the largest quantum, so the guard only rescues jobs stuck behind a stream of
# short ones and does not undo the MLFQ order in ordinary load.
DEFAULT_STARVATION_LIMIT_S = 10.0
DEFAULT_ADMISSION_RESERVE_FRAC = 0.05


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = True) -> float:
    """``value`` as a finite float above (``strict``) or at least ``minimum``, or raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {bound} {minimum}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class MLFQPolicy(SchedulingPolicy):
    """Every job joins queue 0; demotion after each queue's quantum; starvation promotion.

    Knobs (all optional keyword arguments):

    * ``base_quantum_s`` (0.05): quantum of queue 0, in seconds of attained service.
    * ``quantum_ratio`` (2.0): quantum growth per level; >= 1, and > 1 when unbounded.
    * ``num_queues`` (8): number of queues; ``None`` for unbounded (a job can always drop).
    * ``starvation_limit_s`` (10.0): seconds without running after which a job is promoted
      to queue 0; ``None`` disables the guard.
    * ``pin_promoted`` (True): a promoted job is not demoted again (see the module notes);
      False gives the classic guard, where it drops through the queues again.
    * ``evict_to_admit`` (False), ``admission_reserve_frac`` (0.05), ``admission_in_order``
      (False): how a job whose KV is not on the GPU (new, swapped out, or dropped for
      recompute) gets room; see :class:`AdmissionRules`. By default it never evicts a
      resident job and gets in only while 5 % of the GPU pool stays free for the resident
      jobs' growth. Why: when the KV cache bounds the batch, every resident job runs every
      iteration, so evicting one to let a more urgent job in only trades one job for
      another in the batch and pays a swap out and in (or a recompute) for it; and filling
      the cache to the last block makes the running jobs preempt each other a few steps
      later, as each needs its next block. Measured in the simulator at the paper's scale
      (OPT-13B, one A100, ShareGPT-like, 1.3x / 1.6x FCFS capacity), skip-join's mean JCT
      went from 38.9 / 80.3 s to 17.6 / 37.2 s with these rules; strict priority
      (``evict_to_admit=True``, no reserve) is what it was before.
    """

    name = "mlfq"

    def __init__(
        self,
        base_quantum_s: float = DEFAULT_BASE_QUANTUM_S,
        quantum_ratio: float = DEFAULT_QUANTUM_RATIO,
        num_queues: int | None = DEFAULT_NUM_QUEUES,
        starvation_limit_s: float | None = DEFAULT_STARVATION_LIMIT_S,
        pin_promoted: bool = True,
        evict_to_admit: bool = False,
        admission_reserve_frac: float = DEFAULT_ADMISSION_RESERVE_FRAC,
        admission_in_order: bool = False,
    ) -> None:
        self.base_quantum_s = check_number("base_quantum_s", base_quantum_s)
        self.quantum_ratio = check_number("quantum_ratio", quantum_ratio, minimum=1.0, strict=False)
        self.num_queues = (
            None if num_queues is None else check_int("num_queues", num_queues, minimum=1)
        )
        if num_queues is None and self.quantum_ratio == 1.0:
            raise ValueError("unbounded queues (num_queues=None) need quantum_ratio > 1")
        self.starvation_limit_s = (
            None
            if starvation_limit_s is None
            else check_number("starvation_limit_s", starvation_limit_s)
        )
        if not isinstance(pin_promoted, bool):
            raise TypeError(f"pin_promoted must be a bool, got {type(pin_promoted).__name__}")
        self.pin_promoted = pin_promoted
        self.admission = AdmissionRules(evict_to_admit, admission_reserve_frac, admission_in_order)
        self._pinned: set[str] = set()  # promoted jobs that stay in queue 0
        # level -> jobs in the order they entered that level (dicts keep insertion order,
        # and removal is O(1)); empty levels are dropped.
        self._levels: dict[int, dict[str, Job]] = {}
        self._level_of: dict[str, int] = {}
        # Starvation candidates: jobs below queue 0, as (waited_since when pushed, tie, id).
        # An entry whose job has run since is stale and pushed again with its new time, so
        # a job has at most one entry (ids in _in_heap) and every job below queue 0 has one.
        self._starve_heap: list[tuple[float, int, str]] = []
        self._in_heap: set[str] = set()
        self._ties = itertools.count()

    # -- queue geometry ---------------------------------------------------------------------
    @property
    def last_level(self) -> int | None:
        return None if self.num_queues is None else self.num_queues - 1

    def quantum(self, level: int) -> float:
        """Seconds of service a job may attain in ``level`` before it drops one level."""
        return self.base_quantum_s * self.quantum_ratio**level

    def level_for(self, service_s: float) -> int:
        """Highest-priority level whose quantum is at least ``service_s`` (the last level if
        none is, with bounded queues)."""
        level = 0
        last = self.last_level
        if not math.isfinite(service_s):
            if last is None:
                raise ValueError(f"no queue can hold a job needing {service_s} s")
            return last
        if service_s > self.base_quantum_s and self.quantum_ratio > 1.0:
            # Jump close to the answer, then settle it exactly (floats at the boundary).
            guess = math.log(service_s / self.base_quantum_s, self.quantum_ratio)
            level = max(0, math.floor(guess) - 1)
        while (last is None or level < last) and self.quantum(level) < service_s:
            level += 1
        return level if last is None else min(level, last)

    # -- the policy contract ----------------------------------------------------------------
    def initial_level(self, job: Job, now: float) -> int:
        """Queue a new job joins. Plain MLFQ: the top one."""
        return 0

    def admit(self, job: Job, now: float) -> None:
        self._enter(job, self.initial_level(job, now))

    def charge(self, job: Job, service_s: float, now: float) -> None:
        job.attained_service_s += service_s
        job.level_service_s = level_service = job.level_service_s + service_s
        job.last_run_time = now
        level = self._level_of.get(job.job_id)
        if level is None:  # removed while its step ran
            return
        if level_service < self.base_quantum_s * self.quantum_ratio**level:
            return  # the common case: still within its quantum (``quantum(level)``, inlined)
        # Past its quantum: jobs in the last queue stay there (every iteration of theirs
        # comes here, so ``last_level`` is inlined), and so do pinned ones.
        num_queues = self.num_queues
        if (num_queues is not None and level >= num_queues - 1) or job.job_id in self._pinned:
            return
        job.stats.demotions += 1
        self._enter(job, level + 1)

    def order(self, now: float) -> Iterable[Job]:
        self._promote_starving(now)
        levels = self._levels
        if len(levels) == 1:
            return list(next(iter(levels.values())).values())
        out: list[Job] = []
        for level in sorted(levels):
            out.extend(levels[level].values())
        return out

    def remove(self, job: Job) -> None:
        self._pinned.discard(job.job_id)
        self._drop(job)

    def describe(self) -> dict:
        # Jobs per queue, index = level (up to the lowest non-empty one when unbounded).
        depth = self.num_queues or (max(self._levels, default=-1) + 1)
        sizes = [len(self._levels.get(level, ())) for level in range(depth)]
        return {
            "name": self.name,
            "base_quantum_s": self.base_quantum_s,
            "quantum_ratio": self.quantum_ratio,
            "num_queues": self.num_queues,
            "starvation_limit_s": self.starvation_limit_s,
            "pin_promoted": self.pin_promoted,
            **self.admission.describe(),
            "queue_sizes": sizes,
            "pinned": len(self._pinned),
        }

    # -- helpers ----------------------------------------------------------------------------
    def _enter(self, job: Job, level: int) -> None:
        """Move ``job`` to the tail of ``level`` with a fresh quantum."""
        self._drop(job)
        job.queue_level = level
        job.level_service_s = 0.0
        self._levels.setdefault(level, {})[job.job_id] = job
        self._level_of[job.job_id] = level
        if level > 0 and job.job_id not in self._in_heap and self.starvation_limit_s is not None:
            self._in_heap.add(job.job_id)
            heapq.heappush(self._starve_heap, (job.waited_since(), next(self._ties), job.job_id))

    def _drop(self, job: Job) -> None:
        level = self._level_of.pop(job.job_id, None)
        if level is not None:
            self._levels[level].pop(job.job_id, None)
            if not self._levels[level]:
                del self._levels[level]

    def _promote_starving(self, now: float) -> None:
        limit = self.starvation_limit_s
        if limit is None:
            return
        heap, level_of = self._starve_heap, self._level_of
        found: set[str] = set()
        while heap and now - heap[0][0] > limit:
            _, _, job_id = heapq.heappop(heap)
            level = level_of.get(job_id)
            if level is None or level == 0:  # finished, or back in queue 0: not a candidate
                self._in_heap.discard(job_id)
                continue
            job = self._levels[level][job_id]
            since = job.waited_since()
            if now - since > limit:
                found.add(job_id)
                self._in_heap.discard(job_id)
            else:  # it ran since it was pushed: wait for its new time
                heapq.heappush(heap, (since, next(self._ties), job_id))
        if not found:
            return
        # The same jobs, in the order a scan of the queues would list them (rare: a scan).
        starving = [
            job
            for level, jobs in self._levels.items()
            if level > 0
            for job in jobs.values()
            if job.job_id in found
        ]
        # Longest-waiting first, so promoted jobs keep their relative age in queue 0.
        for job in sorted(starving, key=lambda j: j.waited_since()):
            job.stats.promotions += 1
            self._enter(job, 0)
            if self.pin_promoted:
                self._pinned.add(job.job_id)
