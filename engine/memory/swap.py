"""Swap-policy plugin interface and the baseline policies.

A swap policy decides *what* to move between the GPU and host pools; it never moves bytes
and never changes block tables. The scheduler consults it in two places:

* ``evict(job, view)`` — the batch needs GPU blocks that ``job`` (a resident job of lower
  priority than everything already in the batch) holds: keep its KV on the host
  (``"swap"``) or drop it and prefill again later (``"recompute"``). If the host pool has
  no room for a job to swap, the scheduler spares it while anything else can run and
  recomputes it only when the batch would be empty, so a policy may always say swap.
  It is a question, not an order: the scheduler may ask about a job and then evict
  nobody (when evicting every candidate would still not free enough room).
* ``plan(view, upcoming, batch)`` — after the batch is formed: proactive moves for
  jobs *not* in this batch, ahead of need. ``upcoming`` is the policy order, highest
  priority first. The scheduler applies the plan atomically per job and skips moves that
  no longer fit; it never swaps in a job that this same step swapped out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from engine.memory.block_manager import Residency
from engine.request import Job

EvictMode = Literal["swap", "recompute"]


class MemoryView(Protocol):
    """Read-only facts about the pools, for swap policies."""

    block_size: int
    num_gpu_blocks: int
    num_host_blocks: int

    @property
    def num_free_gpu_blocks(self) -> int: ...
    @property
    def num_free_host_blocks(self) -> int: ...
    def residency(self, job_id: str) -> Residency: ...
    def num_blocks_held(self, job_id: str) -> int: ...
    def blocks_for(self, num_tokens: int) -> int: ...


@dataclass
class SwapPlan:
    swap_out: list[Job] = field(default_factory=list)
    swap_in: list[Job] = field(default_factory=list)


class SwapPolicy:
    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"swap policy {self.name!r} takes no options, got {sorted(options)}")

    def evict(self, job: Job, view: MemoryView) -> EvictMode:
        raise NotImplementedError

    def plan(self, view: MemoryView, upcoming: Sequence[Job], batch: Sequence[Job]) -> SwapPlan:
        return SwapPlan()

    def describe(self) -> dict:
        return {"name": self.name}


class RecomputePolicy(SwapPolicy):
    """Drop a preempted job's KV; it prefills prompt + output again when it next runs."""

    name = "recompute"

    def evict(self, job: Job, view: MemoryView) -> EvictMode:
        return "recompute"


class ReactivePolicy(SwapPolicy):
    """Swap out only when a batch cannot fit; swap in on demand (vLLM v0's swap mode)."""

    name = "reactive"

    def evict(self, job: Job, view: MemoryView) -> EvictMode:
        return "swap"
