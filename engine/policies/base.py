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

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.request import Job


@dataclass(frozen=True)
class AdmissionRules:
    """How a job whose KV is not on the GPU gets GPU room: a new job, one swapped out to
    host, or one whose KV was dropped for recompute ("a job outside"). Jobs resident on the
    GPU always take room for their next tokens from the lowest-priority resident jobs.

    * ``evict_to_admit`` (True): a job outside may evict resident jobs below it in the
      order to get in. False: it waits for free room; waiting costs it nothing, while
      evicting a running job costs a swap out and back in (or a recompute) and gives the
      batch nothing, since one job replaces another when the KV cache is the bound.
    * ``reserve_frac`` (0.0): a job outside gets in only if, after it, this fraction of the
      GPU pool is still free (while other jobs are resident): room for the resident jobs'
      next blocks, so that admissions do not force preemptions a few steps later. Only
      with ``evict_to_admit`` False (with it, keeping the reserve would mean evicting
      resident jobs to keep room free for resident jobs).
    * ``in_order`` (False): once a job outside finds no room, no job below it in the order
      gets in during that iteration (no smaller job slips past a larger, more urgent one).

    The defaults are plain strict priority, what the scheduler does for any policy that
    sets no rules. If nothing at all can run in an iteration, the rules are waived for it.
    """

    evict_to_admit: bool = True
    reserve_frac: float = 0.0
    in_order: bool = False

    def __post_init__(self) -> None:
        for name in ("evict_to_admit", "in_order"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        frac = self.reserve_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)):
            raise TypeError(f"reserve_frac must be a number, got {type(frac).__name__}")
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"reserve_frac must be in [0, 1), got {frac!r}")
        if frac and self.evict_to_admit:
            raise ValueError("reserve_frac needs evict_to_admit=False: a job that may evict "
                             "would evict resident jobs to keep the reserve free")

    @property
    def strict(self) -> bool:
        """Whether these are the scheduler's plain rules (nothing to enforce)."""
        return self.evict_to_admit and self.reserve_frac == 0.0 and not self.in_order

    def reserve_blocks(self, num_gpu_blocks: int) -> int:
        return math.ceil(self.reserve_frac * num_gpu_blocks)

    def describe(self) -> dict:
        return {"evict_to_admit": self.evict_to_admit, "admission_reserve_frac": self.reserve_frac,
                "admission_in_order": self.in_order}


STRICT_ADMISSION = AdmissionRules()


class SchedulingPolicy:
    name: ClassVar[str] = ""
    # How jobs whose KV is not on the GPU get room (see AdmissionRules); the scheduler reads
    # it once, when it is built. Default: strict priority.
    admission: AdmissionRules = STRICT_ADMISSION

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
