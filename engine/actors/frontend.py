"""FrontendActor: requests in, text out.

Validates and tokenizes a request into a Job, hands it to the scheduler, and turns the
scheduler's token events into per-request outputs: incremental detokenization, stop
strings (which finish the job in the scheduler), logprobs. Errors are pushed into the
request's own mailbox, so a failure reaches the caller instead of hanging it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.actors.base import Actor
from engine.actors.scheduler import TokenEvent
from engine.detokenizer import IncrementalDetokenizer
from engine.request import FinishReason, Job, stop_token_reason
from engine.sampling import InvalidRequestError, SamplingParams, check_vocab
from engine.tokenizer import Tokenizer


@dataclass
class RequestOutput:
    """One increment of a request's output. ``text``/``token_ids`` are the new part only."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[Any] | None = None  # per new token: [logprob, [[token_id, logprob], ...]]
    queue_level: int = 0
    stats: dict | None = None
    prompt_token_ids: list[int] | None = None  # on the first output only
    # ``params.prompt_logprobs``, on the first output only (vLLM's shape): one per prompt
    # token, None for the first (nothing before it), then [logprob, [[token_id, logprob],
    # ...]] of that token given the ones before it.
    prompt_logprobs: list[Any] | None = None
    # On the finished output (vLLM's): the stop string or stop token id that ended it;
    # None for EOS, length or abort.
    stop_reason: int | str | None = None


@dataclass
class _Live:
    job_id: str
    params: SamplingParams
    detok: IncrementalDetokenizer
    mailbox: asyncio.Queue
    prompt_ids: list[int]
    first: bool = True
    done: bool = False


class FrontendActor(Actor):
    name = "frontend"

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, eos_token_ids: frozenset[int],
                 vocab_size: int, scheduler: Actor) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.scheduler = scheduler
        self.live: dict[str, _Live] = {}

    # -- requests ---------------------------------------------------------------------------
    async def on_submit(
        self, request_id: str, prompt: str | Sequence[int] | None, messages: list[dict] | None,
        params: SamplingParams, grammar: Any = None,
    ) -> asyncio.Queue:
        """``grammar``: ``params.structured`` compiled (the engine compiles it before)."""
        if request_id in self.live:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        check_vocab(params, self.vocab_size)
        prompt_ids = self.tokenize(prompt, messages)
        params = fit_max_tokens(params, len(prompt_ids), self.max_model_len)
        job = Job(
            job_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            arrival_time=time.monotonic(),
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            grammar=grammar,
        )
        await self.scheduler.ask("add", job)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens,
                                       params.stop, params.min_tokens)
        live = _Live(request_id, params, detok, asyncio.Queue(), prompt_ids)
        self.live[request_id] = live
        return live.mailbox

    def tokenize(self, prompt: str | Sequence[int] | None, messages: list[dict] | None) -> list[int]:
        if messages is not None:
            if prompt is not None:
                raise InvalidRequestError("give either prompt or messages, not both", "messages")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        elif isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty", "prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequestError(f"prompt: token ids must be integers in [0, {self.vocab_size})", "prompt")
        else:
            raise InvalidRequestError("prompt: must be a string or a list of token ids", "prompt")
        field = "messages" if messages is not None else "prompt"
        if not ids:
            raise InvalidRequestError(f"{field}: must not be empty", field)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"{field}: {len(ids)} tokens leave no room to generate; the model's context is "
                f"{self.max_model_len} tokens", field)
        return ids

    def on_rewire(self, scheduler: Actor) -> None:
        """The supervisor replaced the worker group: new jobs go to its scheduler. Jobs of
        the old one were all failed before it was replaced."""
        self.scheduler = scheduler

    def on_forget(self, request_id: str) -> None:
        """The caller is gone (it aborted): drop its state; the scheduler frees its job."""
        if self.live.pop(request_id, None) is not None:
            self.scheduler.tell("abort", request_id)

    # -- outputs from the scheduler ---------------------------------------------------------
    def on_events(self, events: list[TokenEvent]) -> None:
        for ev in events:
            live = self.live.get(ev.job_id)
            if live is None or live.done:
                continue
            out = self._output(live, ev)
            if out is not None:
                live.mailbox.put_nowait(out)
            if live.done:
                del self.live[ev.job_id]

    def _output(self, live: _Live, ev: TokenEvent) -> RequestOutput | None:
        text, ids, stopped = "", [], False
        if ev.token_id is not None:
            ids = [ev.token_id]
            text, stopped = live.detok.step(ids)
        reason = ev.finish_reason
        stop_reason: int | str | None = None
        if stopped:
            reason = FinishReason.STOP
            stop_reason = live.detok.stop_reason
            self.scheduler.tell("finish", live.job_id, FinishReason.STOP)
        elif reason is not None:
            text += live.detok.flush()
            if reason is FinishReason.STOP and ev.token_id is not None:
                stop_reason = stop_token_reason(live.params, self.eos_token_ids, ev.token_id)
        if not (text or ids or reason):
            return None
        live.done = reason is not None
        out = RequestOutput(
            request_id=live.job_id,
            text=text,
            token_ids=ids,
            finished=live.done,
            finish_reason=reason.value if reason is not None else None,
            num_prompt_tokens=ev.num_prompt_tokens,
            num_output_tokens=ev.num_output_tokens,
            logprobs=[ev.logprob] if ev.logprob is not None else None,
            queue_level=ev.queue_level,
            stats=ev.stats if live.done else None,
            prompt_token_ids=live.prompt_ids if live.first else None,
            stop_reason=stop_reason,
            prompt_logprobs=[None, *ev.prompt_logprobs]
            if live.first and ev.prompt_logprobs is not None else None,
        )
        live.first = False
        return out

    def on_fail(self, job_ids: list[str], error: Exception) -> None:
        for jid in job_ids:
            live = self.live.pop(jid, None)
            if live is not None:
                live.mailbox.put_nowait(error)

    def on_failure(self, error: Exception) -> None:
        self.on_fail(list(self.live), error)


def fit_max_tokens(params: SamplingParams, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """``max_tokens`` against the context left after the prompt: cut to it when the request
    asked for that (``clamp_max_tokens``), else refused naming both numbers (vLLM's rule),
    so an impossible request is never accepted and run until the context is full."""
    left = max_model_len - num_prompt_tokens
    if params.max_tokens <= left:
        return params
    if params.clamp_max_tokens:
        if params.min_tokens > left:
            raise InvalidRequestError(
                f"min_tokens: this model's maximum context length is {max_model_len} tokens "
                f"and the prompt has {num_prompt_tokens}, which leaves {left} for the "
                f"completion, but min_tokens is {params.min_tokens}", "min_tokens")
        return dataclasses.replace(params, max_tokens=left)
    raise InvalidRequestError(
        f"max_tokens: this model's maximum context length is {max_model_len} tokens and the "
        f"prompt has {num_prompt_tokens}, which leaves {left} for the completion, but "
        f"{params.max_tokens} were requested; lower max_tokens or shorten the prompt",
        "max_tokens",
    )
