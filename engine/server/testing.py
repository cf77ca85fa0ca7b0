"""A fake engine implementing ``EngineLike``, for testing the servers without a model.

Deterministic: one token per character (token id = code point), and the text generated for
a prompt is a function of its token ids and seed (``FakeEngine.expected``). It validates
like the real frontend (empty / too-long prompt -> ``InvalidRequestError``), honours stop
strings, stop token ids (with ``stop_reason``), ``min_tokens``, ``max_tokens``, logprobs and
prompt logprobs (position p of the prompt scores -1/p),
checks ``logit_bias`` ids against its vocabulary (the other logit processors are the
worker's and change nothing here), and records every request, finish and
abort. ``script`` (a string) makes every request generate that text instead, then
stop. Failures are injected through attributes: ``queue_full``, ``fail_after_tokens``,
``serving``; delays through ``first_token_delay_s`` / ``token_delay_s``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.actors.frontend import fit_max_tokens
from engine.sampling import InvalidRequestError, SamplingParams, check_vocab
from engine.scheduler import QueueFullError

VOCAB = "abcdefghijklmnopqrstuvwxyz "
MAX_TOKEN_ID = 0x10FFFF


class FakeEngineDeadError(RuntimeError):
    """Stands in for ``engine.api.EngineDeadError``."""


@dataclass
class FakeOutput:  # the fields of engine.actors.frontend.RequestOutput
    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[Any] | None = None
    queue_level: int = 0
    stats: dict | None = None
    prompt_token_ids: list[int] | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[Any] | None = None


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return self.encode(text + ("<|assistant|>" if add_generation_prompt else ""))


class FakeEngine:
    def __init__(
        self,
        *,
        max_model_len: int = 4096,
        token_delay_s: float = 0.0,
        first_token_delay_s: float = 0.0,
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.vocab_size = MAX_TOKEN_ID + 1
        self.token_delay_s = token_delay_s
        self.first_token_delay_s = first_token_delay_s
        self.serving = True
        self.queue_full = False
        self.fail_after_tokens: int | None = None  # the "worker" dies after this many tokens
        self.script: str | None = None  # when set: the text every request generates
        self.requests: list[dict] = []  # every accepted request: id, prompt_ids, params
        self.finished: list[str] = []
        self.aborted: list[str] = []  # closed early or abort()ed
        self.failed: list[str] = []
        self.live: dict[str, dict] = {}
        self.num_preemptions = 0
        self.swap_bytes = 0

    @property
    def is_serving(self) -> bool:
        return self.serving

    # -- the deterministic "model" ------------------------------------------------------------
    def prompt_ids(
        self, prompt: str | Sequence[int] | None, messages: list[dict] | None = None
    ) -> list[int]:
        if messages is not None:
            return self.tokenizer.apply_chat_template(messages)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt or [])

    def expected(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """(token ids, text, finish reason) that generate() produces."""
        ids, text, reason, _ = self.expected_with_stop_reason(prompt_ids, params)
        return ids, text, reason

    def expected_with_stop_reason(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> tuple[list[int], str, str, int | str | None]:
        """``expected`` and the ``stop_reason`` of the last output."""
        budget = min(params.max_tokens, self.max_model_len - len(prompt_ids))
        start = sum(prompt_ids) + (params.seed or 0)
        ids: list[int] = []
        text = ""
        for i in range(budget):
            if self.script is not None:
                if i >= len(self.script):
                    return ids, text, "stop", None
                tid = ord(self.script[i])
            else:
                tid = ord(VOCAB[(start + i) % len(VOCAB)])
            ids.append(tid)
            text += chr(tid)
            if tid in params.stop_token_ids and i + 1 > params.min_tokens:
                return ids, text[:-1], "stop", tid
            if i + 1 >= params.min_tokens:
                hits = [(text.find(s), n) for n, s in enumerate(params.stop) if s in text]
                if hits:
                    cut, n = min(hits)
                    return ids, text[:cut], "stop", params.stop[n]
        return ids, text, "length", None

    # -- EngineLike -----------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[FakeOutput]:
        params = params or SamplingParams()
        rid = request_id or uuid.uuid4().hex
        if not self.serving:
            raise FakeEngineDeadError("engine is not serving")
        check_vocab(params, self.vocab_size)
        prompt_ids = self._validate(prompt, messages)
        params = fit_max_tokens(params, len(prompt_ids), self.max_model_len)
        if self.queue_full:
            raise QueueFullError("4096 jobs waiting (max_waiting=4096)")
        if rid in self.live:
            raise InvalidRequestError(f"request id {rid!r} is already running", "request_id")
        ids, text, reason, stop_reason = self.expected_with_stop_reason(prompt_ids, params)
        arrival = time.monotonic()
        self.requests.append(
            {"id": rid, "prompt_ids": prompt_ids, "params": params, "messages": messages}
        )
        job = self.live[rid] = {
            "id": rid,
            "state": "waiting",
            "level": 0,
            "n_out": 0,
            "arrival": arrival,
            "abort": False,
            "prompt_len": len(prompt_ids),
        }
        outcome = "aborted"
        try:
            await asyncio.sleep(self.first_token_delay_s)
            job["state"], first_scheduled = "running", time.monotonic()
            for i, tid in enumerate(ids):
                if i:
                    await asyncio.sleep(self.token_delay_s)
                if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                    self.serving = False
                    outcome = "failed"
                    raise FakeEngineDeadError("engine failed: worker died")
                if job["abort"]:
                    yield self._out(
                        rid, "", [], i, prompt_ids, "abort", params, arrival, first_scheduled
                    )
                    return
                job["n_out"], job["level"] = i + 1, min(i // 4, 3)  # "demoted" every 4 tokens
                last = i == len(ids) - 1
                if last:
                    outcome = "finished"  # set before yielding: the caller may stop right after
                piece = text[i] if i < len(text) else ""  # tokens of a stop string show no text
                out = self._out(
                    rid,
                    piece,
                    [tid],
                    i + 1,
                    prompt_ids,
                    reason if last else None,
                    params,
                    arrival,
                    first_scheduled,
                )
                out.stop_reason = stop_reason if last else None
                yield out
        finally:
            self.live.pop(rid, None)
            {"finished": self.finished, "aborted": self.aborted, "failed": self.failed}[
                outcome
            ].append(rid)
            if outcome == "finished":
                self.num_preemptions += 1  # gives the mirrored counters something to move
                self.swap_bytes += 4096

    def _validate(
        self, prompt: str | Sequence[int] | None, messages: list[dict] | None
    ) -> list[int]:
        if prompt is not None and messages is not None:
            raise InvalidRequestError("give either prompt or messages, not both", "messages")
        if prompt is not None and not isinstance(prompt, (str, list, tuple)):
            raise InvalidRequestError("prompt: must be a string or a list of token ids", "prompt")
        if isinstance(prompt, (list, tuple)) and any(
            not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= MAX_TOKEN_ID
            for t in prompt
        ):
            raise InvalidRequestError(
                f"prompt: token ids must be integers in [0, {MAX_TOKEN_ID}]", "prompt"
            )
        ids = self.prompt_ids(prompt, messages)
        if not ids:
            raise InvalidRequestError("prompt: must not be empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt: {len(ids)} tokens leave no room to generate; the model's "
                f"context is {self.max_model_len} tokens",
                "prompt",
            )
        return ids

    def _out(
        self,
        rid: str,
        text: str,
        ids: list[int],
        n_out: int,
        prompt_ids: list[int],
        reason: str | None,
        params: SamplingParams,
        arrival: float,
        first_scheduled: float,
    ) -> FakeOutput:
        logprobs = None
        if params.logprobs is not None and ids:
            top = [[ord(c), -1.0 - k] for k, c in enumerate("xyz" + VOCAB)][: params.logprobs]
            logprobs = [[-0.5, top]]
        stats = None
        if reason is not None:
            stats = {
                "demotions": min((n_out - 1) // 4, 3) if n_out else 0,
                "promotions": 0,
                "preemptions": 0,
                "swapped_time_s": 0.0,
                "arrival_time": arrival,
                "first_scheduled_time": first_scheduled,
                "finish_time": time.monotonic(),
            }
        out = FakeOutput(
            rid,
            text,
            ids,
            reason is not None,
            reason,
            len(prompt_ids),
            n_out,
            logprobs,
            min(max(n_out - 1, 0) // 4, 3),
            stats,
            prompt_ids if n_out <= 1 else None,
        )
        if params.prompt_logprobs is not None and n_out <= 1:
            # Prompt token p scores -1/p; its alternatives as the sampled tokens' do.
            top = [[ord(c), -1.0 - k] for k, c in enumerate("xyz" + VOCAB)]
            out.prompt_logprobs = [None] + [
                [-1.0 / p, top[: params.prompt_logprobs]] for p in range(1, len(prompt_ids))]
        return out

    async def abort(self, request_id: str) -> None:
        if request_id in self.live:
            self.live[request_id]["abort"] = True

    async def stats(self) -> dict:
        now = time.monotonic()
        jobs = [
            {
                "id": j["id"],
                "state": j["state"],
                "queue_level": j["level"],
                "attained_service_s": 0.001 * j["n_out"],
                "residency": "gpu" if j["state"] == "running" else "none",
                "waiting_s": now - j["arrival"],
                "num_prompt_tokens": j["prompt_len"],
                "num_output_tokens": j["n_out"],
            }
            for j in self.live.values()
        ]
        used = min(len(self.live), 100)
        return {
            "jobs": jobs,
            "num_gpu_blocks": 100,
            "num_free_gpu_blocks": 100 - used,
            "num_host_blocks": 100,
            "num_free_host_blocks": 100,
            "num_preemptions": self.num_preemptions,
            "num_steps": 0,
            "busy_s": 0.0,
            "num_overlapped_steps": 0,
            "policy": {"name": "fake"},
            "serving": self.serving,
            "memory": {
                "num_gpu_blocks": 100,
                "num_free_gpu_blocks": 100 - used,
                "kv_cache_usage": used / 100,
                "host_cache_usage": 0.0,
                "swap_out_bytes": self.swap_bytes,
                "swap_in_bytes": self.swap_bytes,
            },
        }

    async def shutdown(self) -> None:
        self.serving = False
