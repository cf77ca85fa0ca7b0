"""The scheduling-policy plugin interface.

Contract: a policy only *orders* jobs. Every iteration the scheduler calls ``order(now)``
and fills the batch by walking that order, highest priority first, under its token and
batch-size budgets and the block manager's answers; any job may be left out of any
iteration (preempted after any token). ``admit`` is called once per job before it is
first ordered, ``charge`` after every iteration the job ran in with that iteration's
measured duration, and ``remove`` exactly once when the job finishes or is aborted; after
``remove`` the job never appears in ``order`` again. ``order`` yields every admitted,
unfinished job exactly once. Policies never touch KV blocks, the worker or the clock:
``now`` comes from the caller, so a virtual clock drives them in tests and the simulator.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from engine.request import Job


class SchedulingPolicy:
    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"policy {self.name!r} takes no options, got {sorted(options)}")

    def admit(self, job: Job, now: float) -> None:
        raise NotImplementedError

    def order(self, now: float) -> Iterable[Job]:
        raise NotImplementedError

    def charge(self, job: Job, service_s: float, now: float) -> None:
        """Account ``service_s`` seconds of execution to ``job`` (default: attained service)."""
        job.attained_service_s += service_s
        job.last_run_time = now

    def remove(self, job: Job) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """Knobs in force, for logs and ``/v1/scheduler``."""
        return {"name": self.name}
