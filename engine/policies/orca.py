"""Orca-style FCFS (Yu et al., OSDI'22), the baseline of the FastServe paper.

Iteration-level first come, first served, but a job is admitted to run only once the KV
cache can hold its *maximum* length, reserved up front: it never needs another block, so
nothing is ever preempted, and jobs start strictly in arrival order (a later, smaller job
does not slip past one waiting for room). What this costs, and what vLLM-style paging
(``fcfs`` with ``reactive``/``recompute``) avoids, is the memory reserved for tokens a job
never produces.

The order is plain FCFS; the reservation is the block manager's
(:meth:`BlockManager.reserve`), which this policy asks for on admission. The scheduler
builder hands the policy its block manager through ``bind_memory`` (the engine and the
simulator both do), the same way a profile is handed to a policy that wants one.

Knob: ``reserve`` (``"max_model_len"``): tokens reserved per job — ``"max_model_len"``
(the model's context length, what a server that cannot know when a job stops must
assume), or ``"max_tokens"`` (prompt + the request's ``max_tokens``, capped by the context
length: an Orca told each job's length cap).
"""

from __future__ import annotations

from engine.policies.fcfs import FCFSPolicy
from engine.request import Job

RESERVE_MODES = ("max_model_len", "max_tokens")


class OrcaFCFSPolicy(FCFSPolicy):
    name = "orca-fcfs"

    def __init__(self, reserve: str = "max_model_len") -> None:
        super().__init__()
        if reserve not in RESERVE_MODES:
            raise ValueError(f"reserve must be one of {RESERVE_MODES}, got {reserve!r}")
        self.reserve = reserve
        self.blocks = None  # the block manager, from bind_memory

    def bind_memory(self, blocks: object) -> None:
        self.blocks = blocks

    def reserved_tokens(self, job: Job) -> int:
        if self.reserve == "max_tokens":
            return min(job.num_prompt_tokens + job.params.max_tokens, job.max_model_len)
        return max(job.max_model_len if job.max_model_len < 1 << 30 else 0,
                   job.num_prompt_tokens + job.params.max_tokens)

    def admit(self, job: Job, now: float) -> None:
        if self.blocks is None:
            raise RuntimeError("orca-fcfs needs its block manager (bind_memory) before admit")
        super().admit(job, now)
        self.blocks.reserve(job.job_id, self.reserved_tokens(job))

    def describe(self) -> dict:
        return {"name": self.name, "reserve": self.reserve}
