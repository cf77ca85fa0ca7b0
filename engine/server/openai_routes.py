"""POST /v1/completions and /v1/chat/completions: fan-out to the engine, JSON or SSE back.

A request with several prompts and/or ``n > 1`` becomes one engine request per choice.
Each runs in its own task that iterates ``engine.generate`` inside ``aclosing`` and pushes
``(index, output | exception | None)`` into one queue; the handler drains that queue.
Every way out of the handler (finished, error, client gone, handler cancelled) cancels
the tasks, which closes their generators, which aborts the engine jobs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import Any

from aiohttp import web

from engine.sampling import InvalidRequestError
from engine.server.metrics import ServerMetrics
from engine.server.openai_api import (
    ApiError,
    ChoiceSpec,
    GenerationRequest,
    parse_chat,
    parse_completion,
)
from engine.server.openai_responses import (
    ChoiceState,
    TokenText,
    chunk,
    final_response,
    logprob_pairs,
    render_logprobs,
    usage,
)
from engine.server.protocol import EngineLike, classify_error
from engine.server.tools import ToolOutput, finish_response, prepare_choices, stream_choices

log = logging.getLogger("fastserve.server")

# How often a handler that is waiting on the engine checks whether its client hung up.
# aiohttp only cancels handlers on disconnect when the runner enables it, and a stream
# only notices on its next write; this bounds how long an abandoned job keeps running.
DISCONNECT_POLL_S = 0.1
# Seconds a client is told to wait (Retry-After) when the waiting queue is full or the
# engine is unavailable.
RETRY_AFTER_S = 1


class ClientGone(Exception):
    """The HTTP client hung up while its request was running."""


def client_gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


# Deepest nesting a body may have (chat content parts sit at depth 5); deeper is refused
# before any field is read, so no walk over a body can recurse without bound.
MAX_JSON_DEPTH = 32


async def read_json(request: web.Request, max_bytes: int) -> dict:
    """The body as a JSON object, or an ``ApiError``: 413 over ``max_bytes`` (checked before
    reading when Content-Length says so), 415 unless the Content-Type is JSON, 400 for bytes
    that are not UTF-8, text that is not JSON, nesting deeper than ``MAX_JSON_DEPTH``, or a
    string anywhere (key or value) that is not valid Unicode (a lone surrogate written as a
    ``\\ud800`` escape): such a string cannot be tokenized or echoed back."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(request.content_length, max_bytes)
    ctype = request.content_type
    if ctype != "application/json" and not (
        ctype.startswith("application/") and ctype.endswith("+json")
    ):
        raise ApiError(
            415,
            f"Content-Type must be application/json, got {ctype!r}",
            code="unsupported_media_type",
        )
    try:
        raw = await request.read()  # the app's client_max_size enforces the cap for chunked bodies
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None, max_bytes) from None
    if len(raw) > max_bytes:
        raise _too_large(len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            400, f"body is not valid UTF-8: {e.reason} at byte {e.start}", code="invalid_json"
        ) from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise ApiError(400, "body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, and integers past Python's digit limit
        raise ApiError(400, f"body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", code="invalid_json")
    check_json_values(body)
    return body


def check_json_values(body: dict) -> None:
    """Refuse, naming the field, a string that is not valid Unicode or nesting deeper
    than ``MAX_JSON_DEPTH`` (iterative: the check itself cannot overflow the stack)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _bad_at(path, f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            if not _valid_unicode(value):
                raise _bad_at(path, "is not valid Unicode (lone surrogate)")
        elif isinstance(value, dict):
            for k, v in value.items():
                at = f"{path}.{k}" if path else str(k)
                if not _valid_unicode(k):
                    raise _bad_at(path or None, "has a key that is not valid Unicode")
                stack.append((v, at, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_at(path: str | None, message: str) -> ApiError:
    if not path:
        return ApiError(400, f"body: {message}", code="invalid_json")
    return ApiError(400, f"{path}: {message}", param=path)


def _too_large(size: int | None, limit: int) -> ApiError:
    got = f"{size} bytes" if size is not None else "more"
    return ApiError(
        413, f"request body too large: {got} (limit {limit} bytes)", code="request_too_large"
    )


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def error_from_exception(
    exc: BaseException,
    engine: EngineLike,
    chat: bool = False,
    max_tokens_field: str = "max_tokens",
    structured_field: str | None = None,
) -> ApiError:
    info = classify_error(exc, engine, chat=chat)
    if info.param == "max_tokens" and max_tokens_field != "max_tokens":
        message = info.message.replace("max_tokens", max_tokens_field)
        info = dataclasses.replace(info, param=max_tokens_field, message=message)
    if info.param == "structured" and structured_field:  # name the field the client sent
        message = info.message.replace("structured", structured_field, 1)
        info = dataclasses.replace(info, param=structured_field, message=message)
    if info.status >= 500 and info.kind == "Internal":
        log.error("request failed", exc_info=exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if info.status == 503 else None
    return ApiError(
        info.status, info.message, type=info.type, param=info.param, code=info.code, headers=headers
    )


class _FanOut:
    def __init__(
        self, engine: EngineLike, req: GenerationRequest, metrics: ServerMetrics | None
    ) -> None:
        self.engine = engine
        self.req = req
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [asyncio.ensure_future(self._pump(c)) for c in req.choices]
        self._getter: asyncio.Future | None = None
        self.tools: dict[int, ToolOutput] = {}  # by choice index, when tools are in play

    async def _pump(self, c: ChoiceSpec) -> None:
        tracker = self.metrics.track() if self.metrics is not None else None
        gen = self.engine.generate(
            c.prompt, c.params, messages=c.messages, request_id=self.request_id(c)
        )
        try:
            async with contextlib.aclosing(gen) as outputs:
                async for out in outputs:
                    if tracker is not None:
                        tracker.on_output(out)
                    self.queue.put_nowait((c.index, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - sent to the client (error body / SSE event)
            self.queue.put_nowait((c.index, e))
            return
        self.queue.put_nowait((c.index, None))

    def request_id(self, c: ChoiceSpec) -> str:
        return f"{self.req.id}-{c.index}"

    async def get(self, request: web.Request) -> tuple[int, Any]:
        while True:
            if self._getter is None:
                self._getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._getter}, timeout=DISCONNECT_POLL_S)
            if done:
                item, self._getter = self._getter.result(), None
                return item
            if client_gone(request):
                raise ClientGone()

    async def close(self) -> None:
        pending = [t for t in self.tasks if not t.done()]
        if self._getter is not None:
            pending.append(self._getter)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class GenerationRoutes:
    def __init__(
        self,
        engine: EngineLike,
        model_name: str,
        max_body_bytes: int,
        metrics: ServerMetrics | None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.engine = engine
        self.tool_call_parser = tool_call_parser  # None: the default for the model's family
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.tok = TokenText(engine.tokenizer)
        # Shutdown: ``admitting`` False refuses new generations with 503 while the requests
        # in ``live`` drain; ``abort_live`` ends the ones still running at the deadline.
        self.admitting = True
        self.live: set[_FanOut] = set()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._check_admitting()
        body = await read_json(request, self.max_body_bytes)
        return await self._run(request, parse_completion(body, self.model_name))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._check_admitting()
        body = await read_json(request, self.max_body_bytes)
        req = parse_chat(body, self.model_name, self.engine.max_model_len)
        try:
            tools = prepare_choices(req, self.engine.tokenizer, self.tool_call_parser)
        except InvalidRequestError as e:
            raise error_from_exception(e, self.engine, True, req.max_tokens_field) from None
        return await self._run(request, req, tools)

    def _check_admitting(self) -> None:
        if not self.admitting:
            raise ApiError(
                503,
                "the server is shutting down",
                type="service_unavailable",
                code="shutting_down",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def abort_live(self) -> None:
        """Abort every running engine request; each ends with finish_reason ``abort``."""
        for fan in list(self.live):
            for c in fan.req.choices:
                await self.engine.abort(fan.request_id(c))

    async def _run(
        self,
        request: web.Request,
        req: GenerationRequest,
        tools: dict[int, ToolOutput] | None = None,
    ) -> web.StreamResponse:
        self._check_admitting()
        if not self.engine.is_serving:
            raise ApiError(
                503,
                "the engine cannot serve",
                type="service_unavailable",
                code="engine_unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        fan = _FanOut(self.engine, req, self.metrics)
        fan.tools = tools or {}
        self.live.add(fan)
        states = {c.index: ChoiceState(echo=self._echo(req, c)) for c in req.choices}
        try:
            if req.stream:
                return await self._stream(request, req, fan, states)
            return await self._collect(request, req, fan, states)
        except ClientGone:
            log.info("client went away; aborted %s", req.id)
            return web.Response(status=499)  # never sent: the connection is gone
        finally:
            self.live.discard(fan)
            await fan.close()

    async def _collect(
        self,
        request: web.Request,
        req: GenerationRequest,
        fan: _FanOut,
        states: dict[int, ChoiceState],
    ) -> web.Response:
        remaining = len(req.choices)
        while remaining:
            index, item = await fan.get(request)
            if isinstance(item, BaseException):
                raise error_from_exception(item, self.engine, req.chat, req.max_tokens_field,
                                           req.structured_field)
            if item is None:
                remaining -= 1
                continue
            st = states[index]
            st.add(item)
            if req.logprobs is not None:
                st.logprobs.extend(logprob_pairs(item, req.echo))
        body = final_response(req, states, self.tok)
        if fan.tools:
            finish_response(body, fan.tools)
        return web.json_response(body, dumps=_json_str)

    async def _stream(
        self,
        request: web.Request,
        req: GenerationRequest,
        fan: _FanOut,
        states: dict[int, ChoiceState],
    ) -> web.StreamResponse:
        # Hold the headers until every choice has answered once, so an up-front refusal
        # (invalid prompt, queue full) is a proper 4xx/503 rather than an in-stream error.
        early: list[tuple[int, Any]] = []
        answered: set[int] = set()
        while len(answered) < len(req.choices):
            index, item = await fan.get(request)
            if isinstance(item, BaseException):
                raise error_from_exception(item, self.engine, req.chat, req.max_tokens_field,
                                           req.structured_field)
            answered.add(index)
            early.append((index, item))
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        try:
            if req.chat:  # OpenAI opens each chat choice with a role-only delta
                role = {"role": "assistant", "content": ""}
                for c in req.choices:
                    first = {
                        "index": c.index,
                        "delta": role,
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    await self._send(resp, req, [first])
            remaining = len(req.choices)
            pending = list(early)
            while remaining:
                index, item = pending.pop(0) if pending else await fan.get(request)
                if isinstance(item, BaseException):
                    err = error_from_exception(item, self.engine, req.chat,
                                               req.max_tokens_field, req.structured_field)
                    await resp.write(b"data: " + dumps(err.body()) + b"\n\n")
                    break
                if item is None:
                    remaining -= 1
                    continue
                for choice in self._choice_chunks(req, states[index], index, item, fan.tools):
                    await self._send(resp, req, [choice])
            else:
                if req.include_usage:
                    await resp.write(
                        b"data: " + dumps(chunk(req, [], usage(req, states), True)) + b"\n\n"
                    )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ClientGone):  # aiohttp's ClientConnectionResetError included
            log.info("client went away mid-stream; aborted %s", req.id)
        return resp

    def _choice_chunks(
        self,
        req: GenerationRequest,
        st: ChoiceState,
        index: int,
        out: Any,
        tools: dict[int, ToolOutput],
    ) -> list[dict]:
        tool_out = tools.get(index)
        if tool_out is None:
            choice = self._choice_chunk(req, st, index, out)
            return [] if choice is None else [choice]
        st.add(out)
        lp = None
        if req.logprobs is not None and out.token_ids:
            lp = render_logprobs(req, self.tok, logprob_pairs(out), st)
        reason = out.finish_reason if out.finished else None
        stop_reason = st.stop_reason if out.finished else None
        return stream_choices(tool_out, index, out.text, reason, lp, stop_reason)

    def _echo(self, req: GenerationRequest, c: ChoiceSpec) -> str:
        """The prompt's text for ``echo``: as sent, or the decoded token ids."""
        if not req.echo:
            return ""
        if isinstance(c.prompt, str):
            return c.prompt
        return self.engine.tokenizer.decode(c.prompt or [])

    def _choice_chunk(
        self, req: GenerationRequest, st: ChoiceState, index: int, out: Any
    ) -> dict | None:
        st.add(out)
        lp = None
        if req.logprobs is not None and out.token_ids:  # echo: the prompt's lead the first
            lp = render_logprobs(req, self.tok, logprob_pairs(out, req.echo), st)
        reason = out.finish_reason if out.finished else None
        stop_reason = st.stop_reason if out.finished else None
        text, st.echo = st.echo + out.text, ""  # the echoed prompt leads the first chunk
        if not text and reason is None and lp is None:
            return None  # e.g. a token that ends mid-character: its text comes with the next one
        if req.chat:
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason,
                    "stop_reason": stop_reason}
        return {
            "index": index,
            "text": text,
            "logprobs": lp,
            "finish_reason": reason,
            "stop_reason": stop_reason,
        }

    @staticmethod
    async def _send(resp: web.StreamResponse, req: GenerationRequest, choices: list[dict]) -> None:
        await resp.write(b"data: " + dumps(chunk(req, choices, None, req.include_usage)) + b"\n\n")


def _json_str(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
