"""The logit processors of the batched sampler that need per-job state (worker side):
``logit_bias``, the ``min_tokens`` mask, and the repetition / frequency / presence penalties.

Each job that asks for one holds a :class:`JobProcessors`; :class:`BatchProcessors` applies
them to the rows of a batch that have one, each processor vectorised over its rows, and
counts the drawn tokens. A job that asks for none has no ``JobProcessors`` and costs
nothing; a batch where no row asks is not touched (not even copied). Order (vLLM's, and
``docs/serving.md``): bias, then the min_tokens mask, then repetition, frequency, presence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class JobProcessors:
    presence: float = 0.0  # minus once for every token already generated
    frequency: float = 0.0  # minus per occurrence among generated tokens
    repetition: float = 1.0  # prompt or generated: logit / r if > 0, else * r
    bias: list[list[Any]] | None = None  # [[token id, bias], ...]
    min_tokens: int = 0
    min_tokens_ids: list[int] | None = None  # masked while fewer than min_tokens are drawn
    prompt_ids: Any = None  # repetition penalty: the prompt, until the job has a counts row
    num_drawn: int = 0  # tokens drawn while min_tokens was pending
    slot: int | None = None  # the job's row in TokenCounts (penalised jobs, from first draw)
    # The distinct ids a penalty can touch (generated; with a repetition penalty the
    # prompt's too), on the device; ids first drawn since, still to be appended.
    seen: Any = None
    seen_new: list[int] = field(default_factory=list)
    device_tensors: dict[str, Any] = field(default_factory=dict)  # bias / min-token ids

    @classmethod
    def from_view(cls, view: dict, prompt_ids: Any = None) -> JobProcessors | None:
        """From ``SamplingParams.worker_view()``; None when the job asks for none."""
        p = cls(
            presence=float(view.get("presence_penalty", 0.0)),
            frequency=float(view.get("frequency_penalty", 0.0)),
            repetition=float(view.get("repetition_penalty", 1.0)),
            bias=view.get("logit_bias") or None,
            min_tokens=int(view.get("min_tokens", 0)),
            min_tokens_ids=view.get("min_tokens_ids") or None,
        )
        if not (p.penalised or p.bias or p.min_tokens_ids):
            return None
        if p.repetition != 1.0 and prompt_ids is not None:
            import numpy as np

            # A copy: the plan's array may be a read-only view of a socket frame.
            p.prompt_ids = np.array(prompt_ids, dtype=np.int64)
        return p

    @property
    def penalised(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0

    @property
    def masks_stops(self) -> bool:
        return self.min_tokens_ids is not None and self.num_drawn < self.min_tokens

    @property
    def active(self) -> bool:
        """Some processor applies to the job's next draw."""
        return self.penalised or self.bias is not None or self.masks_stops

    def tensors(self, name: str, device: torch.device) -> Any:
        """The job's constant index tensors ("bias": ids and values; "stops"), made once."""
        import torch

        t = self.device_tensors.get(name)
        if t is None or (t[0] if isinstance(t, tuple) else t).device != device:
            if name == "bias":
                assert self.bias is not None
                t = (torch.tensor([int(b[0]) for b in self.bias], device=device),
                     torch.tensor([float(b[1]) for b in self.bias], device=device))
            else:
                t = torch.tensor(self.min_tokens_ids, dtype=torch.int64, device=device)
            self.device_tensors[name] = t
        return t


class TokenCounts:
    """How often each penalised job generated each token id, and which ids its prompt holds.

    One row of a [capacity, vocab] table per job that asked for a penalty, on the logits'
    device. After each draw the rows of the batch are bumped in place (one scatter), and a
    step reads the entries of the ids each job has seen (one gather): nothing is rebuilt
    from token lists. The row belongs to
    the job until the sampler forgets it, so preemption does not touch it: a swapped job
    keeps it, and a recomputed job re-feeds tokens that were counted when they were drawn
    (only its final position samples, a new token). A job that sits out a step is not in
    the batch and its row is not read or written.
    """

    INITIAL_ROWS = 8

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # [capacity, vocab] int32
        self.in_prompt: torch.Tensor | None = None  # [capacity, vocab] bool
        self._free: list[int] = []

    def assign(self, vocab: int, device: torch.device, prompt_ids: Any = None
               ) -> tuple[int, torch.Tensor]:
        """A zeroed row for a job; returns it and the distinct valid ids of ``prompt_ids``."""
        import torch

        if self.counts is None or self.counts.shape[1] != vocab:
            if self.counts is not None and len(self._free) != self.counts.shape[0]:
                raise RuntimeError(f"logits of width {vocab} for counts of {self.counts.shape[1]}")
            self.counts = torch.zeros(self.INITIAL_ROWS, vocab, dtype=torch.int32, device=device)
            self.in_prompt = torch.zeros(self.INITIAL_ROWS, vocab, dtype=torch.bool, device=device)
            self._free = list(range(self.INITIAL_ROWS - 1, -1, -1))
        assert self.in_prompt is not None
        if self.counts.device != device:
            self.counts, self.in_prompt = self.counts.to(device), self.in_prompt.to(device)
        if not self._free:  # double the table; rows keep their index
            cap = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.in_prompt = torch.cat([self.in_prompt, torch.zeros_like(self.in_prompt)])
            self._free = list(range(2 * cap - 1, cap - 1, -1))
        slot = self._free.pop()
        self.counts[slot].zero_()
        self.in_prompt[slot].zero_()
        ids = torch.zeros(0, dtype=torch.int64, device=device)
        if prompt_ids is not None and len(prompt_ids):
            ids = torch.as_tensor(prompt_ids, dtype=torch.int64).to(device)
            ids = torch.unique(ids[(ids >= 0) & (ids < vocab)])
            self.in_prompt[slot, ids] = True
        return slot, ids

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """One more of ``tokens[k]`` in row ``slots[k]`` (each slot at most once)."""
        import torch

        assert self.counts is not None
        one = torch.ones(tokens.shape, dtype=self.counts.dtype, device=tokens.device)
        self.counts.index_put_((slots, tokens), one, accumulate=True)


class BatchProcessors:
    """Applies the jobs' processors to a batch of logits and keeps their token counts."""

    def __init__(self) -> None:
        self.counts = TokenCounts()

    def apply(self, logits: torch.Tensor, procs: list[JobProcessors | None]) -> torch.Tensor:
        """Row i of ``logits`` [B, V] through ``procs[i]``: a processed copy, or ``logits``
        itself when no row has an active processor."""
        import torch

        if not any(p is not None and p.active for p in procs):
            return logits
        dev = logits.device
        logits = logits.clone()
        bias_rows = [i for i, p in enumerate(procs) if p is not None and p.bias]
        if bias_rows:
            pairs = [procs[i].tensors("bias", dev) for i in bias_rows]  # type: ignore[union-attr]
            rows, ids = _row_index([t[0] for t in pairs], bias_rows, dev)
            vals = torch.cat([t[1] for t in pairs]).to(logits.dtype)
            logits.index_put_((rows, ids), vals, accumulate=True)
        stop_rows = [i for i, p in enumerate(procs) if p is not None and p.masks_stops]
        if stop_rows:
            rows, ids = _row_index(
                [procs[i].tensors("stops", dev) for i in stop_rows], stop_rows, dev)  # type: ignore[union-attr]
            keep = ids < logits.shape[1]
            logits.index_put_((rows[keep], ids[keep]),
                              torch.tensor(-math.inf, dtype=logits.dtype, device=dev))
        pen_rows = [i for i, p in enumerate(procs) if p is not None and p.penalised]
        if pen_rows:
            self._penalise(logits, [procs[i] for i in pen_rows], pen_rows)  # type: ignore[misc]
        return logits

    def _penalise(self, logits: torch.Tensor, procs: list[JobProcessors], rows: list[int]) -> None:
        """Only the ids each job has seen can change, so only those are read and written:
        O(distinct ids seen) per step, not O(vocab)."""
        import torch

        dev, vocab = logits.device, logits.shape[1]
        for p in procs:
            if p.slot is None:  # first draw: its counts row starts with the prompt
                p.slot, p.seen = self.counts.assign(vocab, dev, p.prompt_ids)
                p.prompt_ids = None
            if p.seen_new:
                p.seen = torch.cat([p.seen, torch.tensor(p.seen_new, device=dev)])
                p.seen_new = []
        table = self.counts.counts
        assert table is not None
        lengths = torch.tensor([len(p.seen) for p in procs], device=dev)
        if not int(lengths.sum()):
            return
        ids = torch.cat([p.seen for p in procs])
        k = torch.arange(len(procs), device=dev).repeat_interleave(lengths)  # element -> job
        at = (torch.tensor(rows, device=dev)[k], ids)
        slots = torch.tensor([p.slot for p in procs], device=dev)[k]
        vals = logits[at]
        counts = table[slots, ids].to(vals.dtype)

        def per_job(xs: list[float]) -> torch.Tensor:
            return torch.tensor(xs, dtype=vals.dtype, device=dev)[k]

        # Every id here was seen; a job without a penalty divides / subtracts exactly
        # nothing (r = 1, f = p = 0), so its logits stay as they were.
        if any(p.repetition != 1.0 for p in procs):
            rep = per_job([p.repetition for p in procs])
            vals = torch.where(vals > 0, vals / rep, vals * rep)
        if any(p.frequency != 0.0 for p in procs):
            vals = vals - per_job([p.frequency for p in procs]) * counts
        if any(p.presence != 0.0 for p in procs):
            vals = vals - per_job([p.presence for p in procs]) * (counts > 0).to(vals.dtype)
        logits[at] = vals

    def record(self, procs: list[JobProcessors | None], tokens: torch.Tensor) -> None:
        """Count the drawn ``tokens`` (row i drew ``tokens[i]``) for the jobs that track them;
        a job's first draw of an id adds it to the ids its penalties touch."""
        import torch

        rows = [i for i, p in enumerate(procs) if p is not None and p.slot is not None]
        if rows:
            dev = tokens.device
            table, in_prompt = self.counts.counts, self.counts.in_prompt
            assert table is not None and in_prompt is not None
            slots = torch.tensor([procs[i].slot for i in rows], device=dev)  # type: ignore[union-attr]
            drawn = tokens[torch.tensor(rows, device=dev)]
            first = ((table[slots, drawn] == 0) & ~in_prompt[slots, drawn]).tolist()
            self.counts.add(slots, drawn)
            for i, is_first, tok in zip(rows, first, drawn.tolist()):
                if is_first:
                    procs[i].seen_new.append(tok)  # type: ignore[union-attr]
        for p in procs:
            if p is not None and p.masks_stops:
                p.num_drawn += 1

    def release(self, procs: JobProcessors | None) -> None:
        if procs is not None and procs.slot is not None:
            self.counts.release(procs.slot)
            procs.slot = None


def _row_index(
    ids: list[torch.Tensor], rows: list[int], dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) index pairs for ``index_put_``: row ``rows[k]`` with each of ``ids[k]``."""
    import torch

    lengths = torch.tensor([len(t) for t in ids], device=dev)
    return torch.tensor(rows, device=dev).repeat_interleave(lengths), torch.cat(ids)
