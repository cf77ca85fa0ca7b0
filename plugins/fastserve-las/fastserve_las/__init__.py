"""Least-attained-service (LAS) scheduling: an example FastServe policy plugin.

LAS runs the job that has received the least service so far. Like MLFQ it needs no job
lengths: a new job has attained nothing and goes straight to the front, so short requests
finish quickly while long ones sink as they run. MLFQ is LAS with coarse, geometric bands.

Invariants: ``order`` is sorted by ``job.attained_service_s`` (in whole ``quantum_s``
bands when that knob is set), ties by arrival time, then admission order; it yields
every admitted, unfinished job exactly once. Service is accounted by the base class's
``charge``. Only the public plugin interface is used (``SchedulingPolicy``, ``Job``).

Limitation (kept, to keep the example small): when preempted jobs lose their KV (the
``recompute`` swap policy, or a full host pool), two jobs whose prompts do not fit the
pool together can overtake and evict each other in the middle of a chunked prefill forever.
MLFQ avoids this with quanta that grow geometrically and by pinning promoted jobs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

from engine.policies.base import SchedulingPolicy
from engine.request import Job

__all__ = ["LeastAttainedServicePolicy"]


class LeastAttainedServicePolicy(SchedulingPolicy):
    """Order by attained service, least first.

    Knob: ``quantum_s`` (0.0): compare service in bands of this many seconds; within a
    band the order is first come, first served. 0 is exact LAS, where two jobs with about
    the same service overtake each other every iteration, so each preempts the other (and
    under memory pressure swaps or recomputes it). A band of a few iterations lets a job
    keep running until it has had a whole quantum more than the others.
    """

    name = "las"

    def __init__(self, quantum_s: float = 0.0) -> None:
        if isinstance(quantum_s, bool) or not isinstance(quantum_s, (int, float)):
            raise TypeError(f"quantum_s must be a number, got {type(quantum_s).__name__}")
        if not math.isfinite(quantum_s) or quantum_s < 0:
            raise ValueError(f"quantum_s must be finite and >= 0, got {quantum_s!r}")
        self.quantum_s = float(quantum_s)
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}  # admission order: the final tie-break
        self._counter = itertools.count()

    def admit(self, job: Job, now: float) -> None:
        job.queue_level = 0  # one queue; the service itself is the priority
        self._jobs[job.job_id] = job
        self._seq[job.job_id] = next(self._counter)

    def order(self, now: float) -> Iterable[Job]:
        return sorted(self._jobs.values(), key=self._key)

    def remove(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)
        self._seq.pop(job.job_id, None)

    def describe(self) -> dict:
        return {"name": self.name, "quantum_s": self.quantum_s, "num_jobs": len(self._jobs)}

    def _key(self, job: Job) -> tuple[float, float, int]:
        service = job.attained_service_s
        if self.quantum_s > 0:
            service = math.floor(service / self.quantum_s)
        return (service, job.arrival_time, self._seq[job.job_id])
