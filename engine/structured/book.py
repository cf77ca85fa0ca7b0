"""Grammar state of the running jobs: one xgrammar matcher per constrained job.

Where the state lives, and why. The matchers live in the engine process, next to the
scheduler, not in the workers (vLLM v1 makes the same choice):

* The scheduler already owns each job's accepted tokens. A matcher is advanced exactly
  once per token the scheduler appends (``accept``), when a step's results are applied,
  so it always stands where the job's output stands.
* Preemption cannot disturb it. A swapped job keeps its matcher untouched while its KV is
  on the host; a recomputed job refeeds prompt + outputs to rebuild its KV, but those
  positions are not sampled and append nothing, so the matcher is not advanced twice.
  The one sampled position of a job is always the next one after its outputs, which is
  exactly where the matcher is: the bitmask is computed for it when the plan is built.
* A job in a pipeline batch is never planned again before its result is applied (the
  scheduler's rule), so with several batches in flight a plan's bitmask never lags.
* Workers stay grammar-free: the plan carries each constrained row's bitmask (int32
  words, bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed: xgrammar's
  format), and the sampler applies it with tensor ops. Tensor-parallel and pipeline
  ranks need nothing more, and a restarted worker group has nothing to rebuild.

Jobs without a grammar cost nothing: a plan without constrained rows carries no bitmask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class GrammarBook:
    """Matchers by job id. Synchronous; driven by the scheduler actor. ``vocab_size`` is
    the model's (the logits' width), which the grammars were compiled for."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self._matchers: dict[str, Any] = {}

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def add(self, job_id: str, compiled: Any) -> None:
        """Start ``job_id`` at the beginning of ``compiled`` (an xgrammar CompiledGrammar)."""
        import xgrammar as xgr

        self._matchers[job_id] = xgr.GrammarMatcher(compiled)

    def remove(self, job_id: str) -> None:
        self._matchers.pop(job_id, None)

    def bitmask(self, job_ids: Sequence[str]) -> np.ndarray:
        """Rows of allowed next tokens for ``job_ids`` (each must have a matcher):
        int32 [len(job_ids), ceil(vocab_size / 32)]."""
        out = np.full((len(job_ids), (self.vocab_size + 31) // 32), -1, dtype=np.int32)
        for row, jid in enumerate(job_ids):
            self._matchers[jid].fill_next_token_bitmask(out, row)
        return out

    def accept(self, job_id: str, token_id: int) -> tuple[bool, bool]:
        """Advance ``job_id``'s matcher by the token it sampled. Returns (accepted,
        terminated): a token the grammar refuses is not accepted (the matcher does not
        move), and a grammar that has ended (its stop token accepted) is terminated."""
        m = self._matchers[job_id]
        ok = bool(m.accept_token(int(token_id)))
        return ok, bool(m.is_terminated())

    def is_terminated(self, job_id: str) -> bool:
        return bool(self._matchers[job_id].is_terminated())
