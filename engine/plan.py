"""What one scheduler iteration decides, as data: the batch (one row per job: where its
tokens start, how many it feeds, what the worker must add to its block table, whether it
samples), the copies between the KV pools, and running totals for whoever prices or counts
the step. Made by ``engine.scheduler.Scheduler``, read by the actor that sends it to the
workers, by the simulator's cost models and by swap policies; no behaviour beyond
reading itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.request import Job


class ScheduledSeq(NamedTuple):
    """One job's part of a step. A tuple: the scheduler records its batch as plain tuples
    of these fields (``StepPlan.rows``) and builds these only when asked (``seqs``)."""

    job: Job
    start: int  # position of the first token fed
    num_tokens: int  # tokens fed this step
    new_blocks: Sequence[int]  # appended to the worker's block table (often ``()``)...
    reset_table: bool  # ...or, if set, the table's whole new content
    sample: bool  # False for a prompt chunk that does not reach the end


# A ScheduledSeq's fields as a plain tuple: what the fill walk records for every job of
# every iteration (building an object per job costs more than the rest of placing it).
SeqRow = tuple[Job, int, int, Sequence[int], bool, bool]


class BatchJobs(Sequence[Job]):
    """The jobs of a batch, read from its rows on demand: what the swap policy is given
    every iteration, so that a policy that looks only at its size costs nothing per job."""

    __slots__ = ("_rows",)

    def __init__(self, rows: Sequence[SeqRow]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [r[0] for r in self._rows[i]]
        return self._rows[i][0]

    def __iter__(self) -> Iterator[Job]:
        return (r[0] for r in self._rows)


class PlanTotals(NamedTuple):
    """Sums over a plan's sequences, added up while the batch is formed so that whoever
    prices or counts a step (the simulator's cost models, metrics) need not walk it again."""

    num_seqs: int
    tokens: int  # tokens fed
    sampled: int  # sequences that sample a token
    context: int  # KV positions already in the cache before the step, summed
    attended: int  # (query, key) pairs in attention: sum of start + i + 1 over fed tokens


@dataclass
class StepPlan:
    """One iteration's plan. The batch is ``seqs`` (ScheduledSeq objects, built from
    ``rows`` on first access and from then on the plan's batch, so changes to that list
    count); the core itself reads it through ``batch()``, which does not build them."""

    step_id: int
    new_jobs: list[Job] = field(default_factory=list)  # first time the worker sees them
    # Demand moves: done before this step's forward (the batch needs the room or the KV).
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, host)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, gpu)
    # Proactive moves for jobs outside the batch: overlap this step's forward, land before
    # the next step starts.
    offload: list[tuple[int, int]] = field(default_factory=list)  # (gpu, host)
    prefetch: list[tuple[int, int]] = field(default_factory=list)  # (host, gpu)
    free: list[str] = field(default_factory=list)  # jobs the worker may forget
    # Set by the scheduler for the seqs it placed; None on a plan built by hand.
    totals: PlanTotals | None = None
    rows: list[SeqRow] = field(default_factory=list, repr=False)  # the batch, as placed
    _seqs: list[ScheduledSeq] | None = field(default=None, init=False, repr=False)

    @property
    def seqs(self) -> list[ScheduledSeq]:
        if self._seqs is None:
            make = tuple.__new__
            self._seqs = [make(ScheduledSeq, r) for r in self.rows]
        return self._seqs

    def batch(self) -> Sequence[SeqRow]:
        """The batch as tuples of ScheduledSeq's fields (ScheduledSeq objects are such
        tuples), without building objects that nobody asked for."""
        return self.rows if self._seqs is None else self._seqs

    def summed(self) -> PlanTotals:
        """The plan's totals: the scheduler's, or added up now (a plan built or changed by
        hand)."""
        rows = self.batch()
        t = self.totals
        if t is not None and t.num_seqs == len(rows):
            return t
        tokens = sampled = context = attended = 0
        for _, start, n, _, _, sample in rows:
            tokens += n
            sampled += sample
            context += start
            attended += (2 * start + n + 1) * n >> 1
        return PlanTotals(len(rows), tokens, sampled, context, attended)

    @property
    def num_seqs(self) -> int:
        return len(self.batch())

    @property
    def num_tokens(self) -> int:
        return self.summed().tokens

    def is_empty(self) -> bool:
        return not (self.batch() or self.swap_out or self.swap_in or self.offload or self.prefetch
                    or self.free)
