"""Proactive KV swapping (FastServe, Wu et al., arXiv 2305.05920).

Reactive swapping moves KV only when a batch cannot fit, so the copy sits on the critical
path of that iteration. The proactive policy moves it one iteration ahead, where the
worker overlaps it with compute:

* **offload** — when fewer than ``headroom`` GPU blocks are free, swap out resident jobs
  that are not in this batch, lowest priority (end of ``upcoming``) first, until the
  headroom is restored, so the next batch can grow (new prefills, decode blocks) without
  a synchronous eviction;
* **upload** — otherwise, swap in host-resident jobs that will run soon, highest priority
  first, as long as the free GPU blocks stay at or above the headroom after each upload.

"Soon" is the *window*: the first ``len(batch) + lookahead`` jobs of ``upcoming`` (about
the next iteration's batch plus a margin). Invariants of every plan: it offloads or it
uploads, never both (matching the scheduler's no-ping-pong rule); it offloads only jobs
outside the window and uploads only jobs inside it, so a job offloaded for being far from
running is not uploaded back while the order stays the same (no ping-pong across steps);
it never names a job in ``batch`` or a job that would not fit the destination pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from engine.memory.block_manager import Residency
from engine.memory.swap import EvictMode, MemoryView, SwapPlan, SwapPolicy
from engine.request import Job

# A tenth of the pool: on the order of one block per running job at typical batch sizes,
# which is what a decode iteration adds in the worst case (every job crossing a block).
DEFAULT_HEADROOM_FRAC = 0.1


class ProactivePolicy(SwapPolicy):
    """Keep a headroom of free GPU blocks; upload the next-to-run jobs ahead of need.

    Knobs (give at most one of the two headroom knobs):

    * ``headroom_frac`` (0.1 when neither is given): headroom as a fraction of the GPU
      pool, rounded up, in [0, 1).
    * ``headroom_blocks`` (None): headroom as an absolute number of blocks.
    * ``lookahead`` (None: the current batch size, at least 1): jobs past the current
      batch size that count as "running soon".
    """

    name = "proactive"

    def __init__(
        self,
        headroom_frac: float | None = None,
        headroom_blocks: int | None = None,
        lookahead: int | None = None,
        spare_last_batch: bool = True,
    ) -> None:
        if headroom_frac is not None and headroom_blocks is not None:
            raise ValueError("give headroom_frac or headroom_blocks, not both")
        if headroom_blocks is not None:
            if isinstance(headroom_blocks, bool) or not isinstance(headroom_blocks, int):
                kind = type(headroom_blocks).__name__
                raise TypeError(f"headroom_blocks must be an integer, got {kind}")
            if headroom_blocks < 0:
                raise ValueError(f"headroom_blocks must be >= 0, got {headroom_blocks}")
        else:
            if headroom_frac is None:
                headroom_frac = DEFAULT_HEADROOM_FRAC
            if isinstance(headroom_frac, bool) or not isinstance(headroom_frac, (int, float)):
                kind = type(headroom_frac).__name__
                raise TypeError(f"headroom_frac must be a number, got {kind}")
            if not 0.0 <= headroom_frac < 1.0:
                raise ValueError(f"headroom_frac must be in [0, 1), got {headroom_frac!r}")
        if lookahead is not None:
            if isinstance(lookahead, bool) or not isinstance(lookahead, int):
                raise TypeError(f"lookahead must be an integer, got {type(lookahead).__name__}")
            if lookahead < 0:
                raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        if not isinstance(spare_last_batch, bool):
            raise TypeError(
                f"spare_last_batch must be a bool, got {type(spare_last_batch).__name__}")
        self.spare_last_batch = spare_last_batch
        self._last_batch: set[str] = set()  # ids of the jobs in the previous plan's batch
        self.headroom_frac = None if headroom_blocks is not None else float(headroom_frac)
        self.headroom_blocks = headroom_blocks
        self.lookahead = lookahead

    def headroom(self, view: MemoryView) -> int:
        """Free GPU blocks to keep, for this pool."""
        if self.headroom_blocks is not None:
            return min(self.headroom_blocks, view.num_gpu_blocks)
        return math.ceil(self.headroom_frac * view.num_gpu_blocks)

    def window(self, upcoming: Sequence[Job], batch: Sequence[Job]) -> Sequence[Job]:
        """The jobs expected to run soon: the head of ``upcoming``."""
        extra = self.lookahead if self.lookahead is not None else max(1, len(batch))
        return upcoming[: len(batch) + extra]

    def evict(self, job: Job, view: MemoryView) -> EvictMode:
        return "swap"

    def plan(self, view: MemoryView, upcoming: Sequence[Job], batch: Sequence[Job]) -> SwapPlan:
        headroom = self.headroom(view)
        soon = self.window(upcoming, batch)
        ran_last, self._last_batch = self._last_batch, {j.job_id for j in batch}
        if view.num_free_gpu_blocks < headroom:
            spared = ran_last if self.spare_last_batch else set()
            return SwapPlan(swap_out=self._victims(view, upcoming, batch, soon, headroom, spared))
        if not _count(view, "num_host_jobs", 1):
            return SwapPlan()  # nothing on the host to upload
        return SwapPlan(swap_in=self._uploads(view, soon, headroom))

    def _victims(
        self, view: MemoryView, upcoming: Sequence[Job], batch: Sequence[Job],
        soon: Sequence[Job], headroom: int, spared: set[str],
    ) -> list[Job]:
        free, host_free = view.num_free_gpu_blocks, view.num_free_host_blocks
        in_batch = {j.job_id for j in batch}
        keep = in_batch.union((j.job_id for j in soon), spared)
        # Only resident jobs are candidates, and under overload the tail of ``upcoming`` is
        # thousands of jobs that hold no GPU block: with a view that lists the resident ones
        # (``BlockManager`` does), they are picked out at C speed first.
        gpu_ids = getattr(view, "gpu_job_ids", None)
        if gpu_ids is not None:
            gpu = gpu_ids()
            candidates = [j for j in reversed(upcoming) if j.job_id in gpu]
        else:
            candidates = [j for j in reversed(upcoming)
                          if view.residency(j.job_id) is Residency.GPU]
        out: list[Job] = []
        for job in candidates:
            if free >= headroom:
                break
            if job.job_id in keep or job.is_finished:
                continue
            held = view.num_blocks_held(job.job_id)
            if held == 0 or held > host_free:
                continue  # nothing to gain, or no host room (a smaller job may still fit)
            out.append(job)
            free += held
            host_free -= held
        return out

    def _uploads(self, view: MemoryView, soon: Sequence[Job], headroom: int) -> list[Job]:
        free = view.num_free_gpu_blocks
        out: list[Job] = []
        for job in soon:
            if job.is_finished or view.residency(job.job_id) is not Residency.HOST:
                continue
            held = view.num_blocks_held(job.job_id)
            if free - held < headroom:
                break  # uploading a lower job instead would take the room this one needs
            out.append(job)
            free -= held
        return out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "headroom_frac": self.headroom_frac,
            "headroom_blocks": self.headroom_blocks,
            "lookahead": self.lookahead,
        }


def _count(view: MemoryView, name: str, default: int) -> int:
    """A job count the view may offer (``BlockManager`` does); ``default`` if it does not,
    so a plain view still works, only without the shortcut."""
    value = getattr(view, name, None)
    return default if value is None else value
