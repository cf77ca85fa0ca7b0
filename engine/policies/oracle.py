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

from engine.policies.base import SchedulingPolicy
from engine.request import Job


class OracleSRPTPolicy(SchedulingPolicy):
    name = "oracle-srpt"

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}
        self._counter = itertools.count()

    def admit(self, job: Job, now: float) -> None:
        job.queue_level = 0
        self._jobs[job.job_id] = job
        self._seq[job.job_id] = next(self._counter)

    def order(self, now: float) -> Iterable[Job]:
        return sorted(self._jobs.values(),
                      key=lambda j: (j.params.max_tokens - len(j.output_ids), self._seq[j.job_id]))

    def remove(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)
        self._seq.pop(job.job_id, None)
