"""What the servers need from an engine, and how engine errors map to client-facing errors.

The HTTP and ZeroMQ frontends depend on this small protocol instead of ``engine.api`` so
they can be driven by a fake engine in tests (``engine.server.testing.FakeEngine``) and do
not import the worker/model stack at import time. ``engine.api.Engine`` satisfies it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from engine.sampling import InvalidRequestError, SamplingParams
from engine.scheduler import AdmissionError, QueueFullError


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]: ...


class OutputLike(Protocol):
    """``engine.actors.frontend.RequestOutput``: one increment (new text/ids only)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[Any] | None  # per new token: [logprob, [[token_id, logprob], ...]]
    queue_level: int
    stats: dict | None  # on the final output: demotions, promotions, swapped_time_s, ...
    prompt_token_ids: list[int] | None
    # On the first output, when params.prompt_logprobs is set: None for the first prompt
    # token, then per token [logprob, [[token_id, logprob], ...]] (absent on fakes: None).
    prompt_logprobs: list[Any] | None


class EngineLike(Protocol):
    """The engine surface the servers use. Contract:

    * ``generate`` is an async generator; it raises ``InvalidRequestError`` /
      ``QueueFullError`` / ``AdmissionError`` on (or before) its first item for a request
      that cannot run, and closing it early (``aclose``, or cancelling the task iterating
      it) aborts the job at once.
    * ``is_serving`` is False once the engine cannot serve (worker died, shut down); any
      failure raised while it is False is reported as 503, not 500.
    * ``stats()`` returns ``Engine.stats()``'s dict (jobs, block counts, ``memory``).
    """

    tokenizer: TokenizerLike
    max_model_len: int
    vocab_size: int  # the model's; token ids must be below it

    @property
    def is_serving(self) -> bool: ...

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[OutputLike]: ...

    async def abort(self, request_id: str) -> None: ...

    async def stats(self) -> dict: ...

    async def shutdown(self) -> None: ...


@dataclass(frozen=True)
class ErrorInfo:
    """A failure as a client sees it; ``kind`` is the transport-neutral name used by the
    ZeroMQ protocol, ``status``/``type``/``code`` the OpenAI-shaped HTTP rendering."""

    kind: str  # InvalidRequest | QueueFull | EngineUnavailable | Internal
    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None


def classify_error(exc: BaseException, engine: EngineLike, *, chat: bool = False) -> ErrorInfo:
    """``chat``: the request gave ``messages``; the engine checks the prompt they render to
    and blames ``prompt``, a field such a request does not have, so name ``messages``."""
    if isinstance(exc, (InvalidRequestError, AdmissionError)):
        # AdmissionError: the request can never run here (e.g. prompt larger than the KV
        # pool): the client must change it, so it is a 400 like any other invalid request.
        param = exc.param if isinstance(exc, InvalidRequestError) else "prompt"
        message = str(exc)
        if chat and param == "prompt":
            param, message = "messages", "messages: " + message.removeprefix("prompt: ")
        return ErrorInfo("InvalidRequest", 400, "invalid_request_error", None, message, param)
    if isinstance(exc, QueueFullError):
        return ErrorInfo("QueueFull", 503, "server_overloaded", "queue_full", str(exc))
    if not engine.is_serving:
        return ErrorInfo(
            "EngineUnavailable",
            503,
            "service_unavailable",
            "engine_unavailable",
            f"the engine cannot serve: {exc}",
        )
    return ErrorInfo(
        "Internal", 500, "internal_error", "internal_error", f"{type(exc).__name__}: {exc}"
    )
