"""MemoryManagerActor: the engine's view of KV memory, kept off the step path.

The block manager itself lives inside the scheduler core (placement decisions are
synchronous check/act calls during batch formation). This actor owns what happens around
them: after every step it receives a snapshot of pool usage and swap traffic, keeps the
running totals that metrics and ``stats()`` report, and when the engine goes idle it asks
the scheduler to verify block conservation, so a leak is caught where it happens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engine.actors.base import Actor, ActorStoppedError

log = logging.getLogger("fastserve.memory")


@dataclass
class MemoryStats:
    num_gpu_blocks: int = 0
    num_host_blocks: int = 0
    block_bytes: int = 0
    num_free_gpu_blocks: int = 0
    num_free_host_blocks: int = 0
    swap_out_blocks: int = 0
    swap_in_blocks: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    proactive_out_blocks: int = 0  # of swap_out_blocks, moved ahead of need (overlapped)
    proactive_in_blocks: int = 0
    swap_seconds: float = 0.0  # worker-measured copy time, both directions
    integrity_checks: int = 0
    integrity_errors: list[str] = field(default_factory=list)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_gpu_blocks / self.num_gpu_blocks if self.num_gpu_blocks else 0.0

    @property
    def host_cache_usage(self) -> float:
        return 1.0 - self.num_free_host_blocks / self.num_host_blocks if self.num_host_blocks else 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["kv_cache_usage"] = self.kv_cache_usage
        d["host_cache_usage"] = self.host_cache_usage
        return d


class MemoryManagerActor(Actor):
    name = "memory"

    def __init__(self, num_gpu_blocks: int, num_host_blocks: int, block_bytes: int, scheduler: Actor) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.stats = MemoryStats(num_gpu_blocks, num_host_blocks, block_bytes,
                                 num_gpu_blocks, num_host_blocks)

    def on_step(self, free_gpu: int, free_host: int, moved: dict[str, int], swap_s: float) -> None:
        s = self.stats
        s.num_free_gpu_blocks, s.num_free_host_blocks = free_gpu, free_host
        swapped_out = moved["swap_out"] + moved["offload"]
        swapped_in = moved["swap_in"] + moved["prefetch"]
        s.proactive_out_blocks += moved["offload"]
        s.proactive_in_blocks += moved["prefetch"]
        s.swap_seconds += swap_s
        s.swap_out_blocks += swapped_out
        s.swap_in_blocks += swapped_in
        s.swap_out_bytes += swapped_out * s.block_bytes
        s.swap_in_bytes += swapped_in * s.block_bytes

    async def on_idle(self, free_gpu: int, free_host: int) -> None:
        self.stats.num_free_gpu_blocks, self.stats.num_free_host_blocks = free_gpu, free_host
        self.stats.integrity_checks += 1
        try:
            await self.scheduler.ask("check_integrity")
        except AssertionError as e:  # a bug, not a request error: record it loudly
            log.error("KV block integrity violated: %s", e)
            self.stats.integrity_errors.append(str(e))
        except ActorStoppedError:
            pass  # the worker group is being replaced: nothing left to check

    def on_get(self) -> MemoryStats:
        return self.stats
