"""Static per-request priority (vLLM's convention: lower ``params.priority`` runs first).

Invariants: ``order`` is sorted by ``job.params.priority``, ascending. Without MLFQ, ties
go by arrival time, then admission order. With ``mlfq=True`` a job also lives in an
:class:`MLFQPolicy` (which this class delegates to, so demotion, FIFO per level and the
starvation guard are the MLFQ's own code) and ties in priority go by MLFQ level, then by
the time the job entered that level. Priority is strict: the starvation guard promotes a
job within its priority class only, so a steady stream of more urgent work can starve
less urgent work, as it does in vLLM's priority scheduling.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from engine.policies.base import SchedulingPolicy
from engine.policies.mlfq import MLFQPolicy
from engine.request import Job


class PriorityPolicy(SchedulingPolicy):
    """Order by ``params.priority`` then arrival, or then MLFQ level (``mlfq=True``).

    Knobs: ``mlfq`` (False): combine with MLFQ levels; with it, any :class:`MLFQPolicy`
    knob (``base_quantum_s``, ``quantum_ratio``, ``num_queues``, ``starvation_limit_s``)
    is passed through. Without it, those knobs are refused.
    """

    name = "priority"

    def __init__(self, mlfq: bool = False, **mlfq_options: Any) -> None:
        if not isinstance(mlfq, bool):
            raise TypeError(f"mlfq must be a bool, got {type(mlfq).__name__}")
        if mlfq_options and not mlfq:
            raise TypeError(f"options {sorted(mlfq_options)} need mlfq=True")
        self._mlfq = MLFQPolicy(**mlfq_options) if mlfq else None
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}  # admission order: the final tie-break
        self._counter = itertools.count()
        self._sorted: list[Job] | None = None  # cache; the order only changes on admit/remove

    def admit(self, job: Job, now: float) -> None:
        self._jobs[job.job_id] = job
        self._seq[job.job_id] = next(self._counter)
        self._sorted = None
        if self._mlfq is not None:
            self._mlfq.admit(job, now)
        else:
            job.queue_level = 0

    def charge(self, job: Job, service_s: float, now: float) -> None:
        if self._mlfq is not None:
            self._mlfq.charge(job, service_s, now)
        else:
            super().charge(job, service_s, now)

    def order(self, now: float) -> Iterable[Job]:
        if self._mlfq is not None:
            # The MLFQ order is (level, entry into level); a stable sort on priority keeps it
            # within each priority class.
            return sorted(self._mlfq.order(now), key=lambda j: j.params.priority)
        if self._sorted is None:
            self._sorted = sorted(
                self._jobs.values(),
                key=lambda j: (j.params.priority, j.arrival_time, self._seq[j.job_id]),
            )
        return list(self._sorted)

    def remove(self, job: Job) -> None:
        if self._jobs.pop(job.job_id, None) is not None:
            self._seq.pop(job.job_id, None)
            self._sorted = None
        if self._mlfq is not None:
            self._mlfq.remove(job)

    def describe(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "mlfq": self._mlfq is not None}
        if self._mlfq is not None:
            out.update({k: v for k, v in self._mlfq.describe().items() if k != "name"})
        return out
