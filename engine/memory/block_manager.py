"""Block pools and block tables. Decides *where bytes live*; never *who runs*.

Two pools of fixed-size KV blocks: the GPU pool (where attention reads) and the host pool
(swap space). A job's KV lives wholly in one pool at a time. The scheduler asks before it
acts (``can_allocate`` then ``allocate``; ``can_swap_out`` then ``swap_out``), so every
call that changes state either succeeds whole or raises without changing anything.

The worker carries out a plan in a fixed order: swap-out copies, then swap-in copies,
then the forward pass (which waits for both). So a GPU block vacated by a swap-out may be
handed out again in the same plan, but a host block vacated by a swap-in may not: a
swap-out of the same plan could overwrite it before it is read. Those host blocks are
*deferred* and return to the free list at ``end_step()``, once the plan is built.

Freeing a job whose blocks are being copied (an abort while its swap is in flight) puts
them back on the free lists at once. That is safe because the free lists only say what
*later plans* may use, and the worker runs plans in order: a plan's demand swaps complete
before its forward, and its proactive copies land before the next plan touches any block
(``AsyncBlockCopier.wait`` at the start of each step). So no plan built after the free can
overwrite or read a block before the copy that moved it has completed.
``tests/unit/test_abort_during_swap.py`` checks this against a model of the worker.

Reservations (Orca-style admission, see ``engine/policies/orca.py``): ``reserve(job,
tokens)`` makes the job's first allocation take room for ``tokens`` at once, so it never
needs another block; reservations are granted in the order they were made, so a job
whose turn has not come cannot allocate at all (strict first-come admission: a small job
never slips past a large one waiting for room). Without reservations nothing changes.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import KeysView, Mapping


class Residency(enum.Enum):
    NONE = "none"
    GPU = "gpu"
    HOST = "host"


class OutOfBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_gpu_blocks: int, num_host_blocks: int, block_size: int) -> None:
        if num_gpu_blocks <= 0 or block_size <= 0 or num_host_blocks < 0:
            raise ValueError("pool sizes and block size must be positive")
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_host_blocks = num_host_blocks
        # Stacks: recently freed blocks are reused first (warm in cache).
        self._gpu_free: list[int] = list(range(num_gpu_blocks - 1, -1, -1))
        self._host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))
        self._host_deferred: list[int] = []
        self._gpu_tables: dict[str, list[int]] = {}
        self._host_tables: dict[str, list[int]] = {}
        # job -> (tokens to hold from its first allocation, ticket); the queue holds
        # (ticket, job) in turn order. Granted or freed reservations leave the dict at once
        # and the queue lazily, so finding whose turn it is stays O(1) amortized (the first
        # key of a dict with many deletions at its front is not: iteration skips them).
        self._reserved: dict[str, tuple[int, int]] = {}
        self._turns: deque[tuple[int, str]] = deque()
        self._tickets = itertools.count()

    # -- queries ---------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_gpu_blocks(self) -> int:
        return len(self._gpu_free)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._host_free)

    def residency(self, job_id: str) -> Residency:
        if job_id in self._gpu_tables:
            return Residency.GPU
        if job_id in self._host_tables:
            return Residency.HOST
        return Residency.NONE

    def gpu_table(self, job_id: str) -> list[int]:
        return self._gpu_tables.get(job_id, [])

    @property
    def gpu_tables(self) -> Mapping[str, list[int]]:
        """Every GPU block table by job id (read-only: the scheduler's hot loop reads it
        directly instead of calling ``gpu_table`` once per job per iteration)."""
        return self._gpu_tables

    def host_job_ids(self) -> KeysView[str]:
        """Ids of the jobs whose KV is in the host pool (a live view, like ``gpu_job_ids``)."""
        return self._host_tables.keys()

    def num_blocks_held(self, job_id: str) -> int:
        return len(self._gpu_tables.get(job_id, ())) + len(self._host_tables.get(job_id, ()))

    @property
    def num_gpu_jobs(self) -> int:
        """Jobs whose KV is in the GPU pool."""
        return len(self._gpu_tables)

    def gpu_job_ids(self) -> KeysView[str]:
        """Ids of the jobs whose KV is in the GPU pool (a live view: do not hold it across
        changes)."""
        return self._gpu_tables.keys()

    @property
    def num_host_jobs(self) -> int:
        """Jobs whose KV is in the host pool."""
        return len(self._host_tables)

    def _turn(self) -> str | None:
        """The job whose reservation is granted next (the oldest one still queued)."""
        turns, reserved = self._turns, self._reserved
        while turns:
            ticket, job_id = turns[0]
            held = reserved.get(job_id)
            if held is not None and held[1] == ticket:
                return job_id
            turns.popleft()
        return None

    # -- GPU allocation ----------------------------------------------------------------------
    def extra_blocks_needed(self, job_id: str, num_tokens: int) -> int:
        """GPU blocks to add so the job can hold ``num_tokens`` tokens on the GPU.

        A job whose KV is on the host must be swapped in first; it needs a GPU block for
        every host block too.
        """
        table = self._gpu_tables.get(job_id)
        if table is not None:  # resident jobs have no reservation left (allocate took it)
            need = -(-num_tokens // self.block_size) - len(table)
            return max(0, need)
        if self._reserved:
            reserved = self._reserved.get(job_id)
            if reserved is not None:
                if self._turn() != job_id:
                    return self.num_gpu_blocks + 1  # not its turn: no room is enough
                num_tokens = max(num_tokens, reserved[0])
        return max(0, self.blocks_for(num_tokens))  # not on the GPU: every block is new

    def waits_its_turn(self, job_id: str) -> bool:
        """Whether the job holds a reservation that is not granted next (it cannot allocate
        anything until every reservation before it is granted)."""
        return bool(self._reserved) and job_id in self._reserved and self._turn() != job_id

    def reserve(self, job_id: str, num_tokens: int) -> None:
        """Queue a reservation: the job's first allocation will hold ``num_tokens``."""
        if job_id in self._gpu_tables or job_id in self._host_tables:
            raise OutOfBlocksError(f"job {job_id} already holds blocks")
        ticket = next(self._tickets)
        self._reserved[job_id] = (min(num_tokens, self.num_gpu_blocks * self.block_size), ticket)
        self._turns.append((ticket, job_id))

    def can_allocate(self, job_id: str, num_tokens: int) -> bool:
        return self.extra_blocks_needed(job_id, num_tokens) <= len(self._gpu_free)

    def allocate(self, job_id: str, num_tokens: int) -> list[int]:
        """Grow the job's GPU table to hold ``num_tokens``; returns the blocks added."""
        if job_id in self._host_tables:
            raise OutOfBlocksError(f"job {job_id} is on the host; swap it in first")
        need = self.extra_blocks_needed(job_id, num_tokens)
        free = self._gpu_free
        if need > len(free):
            raise OutOfBlocksError(f"job {job_id} needs {need} blocks, {len(free)} free")
        if need:
            new = free[-need:]
            new.reverse()  # the order pop() would give: most recently freed first
            del free[-need:]
        else:
            new = []
        self._gpu_tables.setdefault(job_id, []).extend(new)
        if self._reserved:
            self._reserved.pop(job_id, None)
        return new

    def free(self, job_id: str) -> None:
        """Release every block the job holds, in both pools, at once."""
        self._reserved.pop(job_id, None)
        self._gpu_free.extend(reversed(self._gpu_tables.pop(job_id, [])))
        self._host_free.extend(reversed(self._host_tables.pop(job_id, [])))

    # -- swapping ---------------------------------------------------------------------------
    def can_swap_out(self, job_id: str) -> bool:
        table = self._gpu_tables.get(job_id)
        return bool(table) and len(table) <= len(self._host_free)

    def swap_out(self, job_id: str) -> list[tuple[int, int]]:
        """Move the job's table to the host pool; returns (gpu_block, host_block) copies."""
        if not self.can_swap_out(job_id):
            raise OutOfBlocksError(f"cannot swap out job {job_id}")
        gpu = self._gpu_tables.pop(job_id)
        host = [self._host_free.pop() for _ in gpu]
        self._host_tables[job_id] = host
        self._gpu_free.extend(reversed(gpu))
        return list(zip(gpu, host))

    def can_swap_in(self, job_id: str) -> bool:
        table = self._host_tables.get(job_id)
        return table is not None and len(table) <= len(self._gpu_free)

    def swap_in(self, job_id: str) -> list[tuple[int, int]]:
        """Move the job's table back to the GPU pool; returns (host_block, gpu_block) copies."""
        if not self.can_swap_in(job_id):
            raise OutOfBlocksError(f"cannot swap in job {job_id}")
        host = self._host_tables.pop(job_id)
        gpu = [self._gpu_free.pop() for _ in host]
        self._gpu_tables[job_id] = gpu
        self._host_deferred.extend(host)
        return list(zip(host, gpu))

    def end_step(self) -> None:
        """The plan is built: blocks vacated by its swaps may now be handed out again."""
        self._host_free.extend(self._host_deferred)
        self._host_deferred.clear()

    # -- invariants -------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Blocks are conserved in each pool and no block has two owners; raises if not."""
        for pool, n, free, deferred, tables in (
            ("gpu", self.num_gpu_blocks, self._gpu_free, [], self._gpu_tables),
            ("host", self.num_host_blocks, self._host_free, self._host_deferred, self._host_tables),
        ):
            owned = [b for t in tables.values() for b in t]
            every = owned + free + deferred
            if sorted(every) != list(range(n)):
                raise AssertionError(
                    f"{pool} pool broken: {len(owned)} owned + {len(free)} free + "
                    f"{len(deferred)} deferred != {n}, or a block appears twice"
                )
        both = self._gpu_tables.keys() & self._host_tables.keys()
        if both:
            raise AssertionError(f"jobs in both pools: {sorted(both)}")
