"""First come, first served at iteration level (the Orca / vLLM baseline)."""

from __future__ import annotations

from collections.abc import Iterable

from engine.policies.base import AdmissionRules, SchedulingPolicy
from engine.request import Job


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"

    def __init__(self, evict_to_admit: bool = True, admission_reserve_frac: float = 0.0,
                 admission_in_order: bool = False) -> None:
        # vLLM-style by default: a job outside the GPU may take room from anyone below it,
        # and no room is held back (see AdmissionRules for the knobs).
        self.admission = AdmissionRules(evict_to_admit, admission_reserve_frac, admission_in_order)
        # Insertion-ordered dict: arrival order, O(1) removal.
        self._jobs: dict[str, Job] = {}

    def admit(self, job: Job, now: float) -> None:
        job.queue_level = 0
        self._jobs[job.job_id] = job

    def order(self, now: float) -> Iterable[Job]:
        return list(self._jobs.values())

    def remove(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)

    def describe(self) -> dict:
        return {"name": self.name, **self.admission.describe()}
