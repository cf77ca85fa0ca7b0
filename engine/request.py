"""A job: one generation request as the scheduler and memory manager see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from engine.sampling import SamplingParams


class JobState(enum.Enum):
    WAITING = "waiting"  # admitted, not yet run (or preempted by recompute)
    RUNNING = "running"  # has KV on the GPU pool
    SWAPPED = "swapped"  # KV lives in the host pool
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class JobStats:
    """What happened to a job, reported with its output (observability)."""

    demotions: int = 0
    promotions: int = 0
    preemptions: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    recomputes: int = 0
    swapped_time_s: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(eq=False)
class Job:
    """Token state of one request.

    ``num_computed_tokens`` counts tokens whose KV is in the cache. A job's next step feeds
    the tokens from there on (prompt, then outputs) — its prompt (or a chunk of it) at
    first, then the one token sampled last. Preemption by recompute resets it to 0.
    """

    job_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    state: JobState = JobState.WAITING
    finish_reason: FinishReason | None = None
    # Scheduling-policy state. Policies own the meaning of these fields.
    queue_level: int = 0
    attained_service_s: float = 0.0  # total seconds of iterations this job ran in
    level_service_s: float = 0.0  # seconds charged at the current queue level
    last_run_time: float | None = None  # end of the last iteration it ran in (starvation)
    swapped_since: float | None = None
    stats: JobStats = field(default_factory=JobStats)
    # The compiled grammar of ``params.structured`` (engine process only: the scheduler
    # actor makes the job's matcher from it; never sent to workers, never read by the core).
    grammar: Any = field(default=None, repr=False)
    # ``params.prompt_logprobs``: the entries the worker returned so far, one per prompt
    # position from 1 on (``[logprob, [[token id, logprob], ...]]``); complete once the
    # first output token is sampled, since the prompt's last chunk runs in that step.
    prompt_logprobs: list[Any] = field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to feed before the job can sample again."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.state is JobState.FINISHED

    def add_prompt_logprobs(self, first: int, entries: list[Any]) -> None:
        """Entries for prompt positions ``first``, ``first + 1``, ... Positions already held
        are dropped, so a chunk scored again (never by the worker, which scores each once)
        cannot make one appear twice."""
        skip = len(self.prompt_logprobs) + 1 - first
        if skip < 0:
            raise ValueError(f"job {self.job_id}: prompt logprobs from position {first}, "
                             f"but only {len(self.prompt_logprobs)} positions came before")
        self.prompt_logprobs.extend(entries[skip:])

    def waited_since(self) -> float:
        return self.last_run_time if self.last_run_time is not None else self.arrival_time

    def check_stop(self) -> FinishReason | None:
        """Stop conditions known from token ids alone (stop strings live in the detokenizer)."""
        out = self.output_ids
        if not out:
            return None
        last = out[-1]
        params = self.params
        # The sampler masks EOS and stop ids before min_tokens; a token that slips through
        # (an id past the logits) does not end the job early either.
        if len(out) > params.min_tokens and (
            (not params.ignore_eos and last in self.eos_token_ids)
            or last in params.stop_token_ids
        ):
            return FinishReason.STOP
        if len(out) >= params.max_tokens or len(self.prompt_ids) + len(out) >= self.max_model_len:
            return FinishReason.LENGTH
        return None


def stop_token_reason(
    params: SamplingParams, eos_token_ids: frozenset[int], token_id: int
) -> int | None:
    """vLLM's ``stop_reason`` for a job that ``check_stop`` finished with STOP on
    ``token_id``: the id when it is one of ``stop_token_ids``, None for EOS."""
    if not params.ignore_eos and token_id in eos_token_ids:
        return None
    return token_id if token_id in params.stop_token_ids else None
