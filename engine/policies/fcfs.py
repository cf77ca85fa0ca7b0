"""First come, first served at iteration level (the Orca / vLLM baseline)."""

from __future__ import annotations

from collections.abc import Iterable

from engine.policies.base import SchedulingPolicy
from engine.request import Job


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"

    def __init__(self) -> None:
        # Insertion-ordered dict: arrival order, O(1) removal.
        self._jobs: dict[str, Job] = {}

    def admit(self, job: Job, now: float) -> None:
        job.queue_level = 0
        self._jobs[job.job_id] = job

    def order(self, now: float) -> Iterable[Job]:
        return list(self._jobs.values())

    def remove(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)
