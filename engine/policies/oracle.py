"""Oracle shortest-remaining-job-first: a bound, not a deployable policy.

Orders jobs by the output tokens they still have to produce, fewest first, taking each
job's ``max_tokens`` as its true output length: exact in the simulator and in benchmarks
that send ``ignore_eos`` requests, which is where this policy is meant to run. A real
server does not know when a job will stop, which is why FastServe approximates this order
with skip-join MLFQ; comparing against it shows how much of the possible JCT reduction a
length-blind policy captures. Ties go by arrival.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from engine.policies.base import AdmissionRules, SchedulingPolicy
from engine.request import Job

_SEQ_BITS = 40  # admission numbers below 2**40: the sort key is one int, not a tuple


class OracleSRPTPolicy(SchedulingPolicy):
    name = "oracle-srpt"

    def __init__(self, evict_to_admit: bool = True, admission_reserve_frac: float = 0.0,
                 admission_in_order: bool = False) -> None:
        # Strict shortest-remaining-first by default (a shorter job outside the GPU evicts a
        # longer resident one); the knobs give it the admission rules of another policy, to
        # bound that policy's order under the same memory rules (see AdmissionRules).
        self.admission = AdmissionRules(evict_to_admit, admission_reserve_frac, admission_in_order)
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}
        self._counter = itertools.count()
        # Last order, re-sorted in place each time: between iterations only the jobs that
        # ran move (by one token), so the list is nearly sorted and the sort is near-linear.
        self._order: list[Job] = []
        self._removed = 0

    def admit(self, job: Job, now: float) -> None:
        job.queue_level = 0
        self._jobs[job.job_id] = job
        self._seq[job.job_id] = next(self._counter)
        self._order.append(job)

    def _key(self, job: Job) -> int:
        left = job.params.max_tokens - len(job.output_ids)
        return (left << _SEQ_BITS) + self._seq[job.job_id]

    def order(self, now: float) -> Iterable[Job]:
        if self._removed:
            jobs = self._jobs
            self._order = [j for j in self._order if jobs.get(j.job_id) is j]
            self._removed = 0
        self._order.sort(key=self._key)
        return list(self._order)

    def remove(self, job: Job) -> None:
        if self._jobs.pop(job.job_id, None) is not None:
            self._seq.pop(job.job_id, None)
            self._removed += 1

    def describe(self) -> dict:
        return {"name": self.name, **self.admission.describe()}
