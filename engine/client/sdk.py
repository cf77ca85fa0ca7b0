"""ZeroMQ client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    with Client("ipc:///tmp/fastserve-8000.ipc") as c:
        for out in c.generate("Hello", max_tokens=8, temperature=0):
            print(out.text, end="")

Both share ``_Book``, the transport-free bookkeeping: replies are routed to per-request
buffers by ``id``, and every reply or heartbeat naming a request refreshes its
"last heard" time. A request not heard of for ``timeout`` seconds fails with
``EngineUnavailable``, so a dead or unreachable server never hangs the caller.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from engine.client import wire

if TYPE_CHECKING:
    from typing_extensions import Self

DEFAULT_TIMEOUT_S = 10.0  # seconds of silence about a request before the server counts as gone
POLL_S = 0.05  # how often a waiting caller re-checks for silence


class FastServeError(Exception):
    def __init__(self, message: str, *, param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.type = type


class InvalidRequest(FastServeError):
    """A request field is invalid; ``param`` names it."""


class QueueFull(FastServeError):
    """The engine's waiting queue is full; retry later."""


class EngineUnavailable(FastServeError):
    """The engine cannot serve, or the server did not answer within the timeout."""


class Unauthorized(FastServeError):
    """The server requires an API key (``api_key=``) and this one is missing or wrong."""


class ServerError(FastServeError):
    """The server failed (a bug) or could not read the message."""


_ERRORS: dict[str, type[FastServeError]] = {
    wire.INVALID_REQUEST: InvalidRequest,
    wire.QUEUE_FULL: QueueFull,
    wire.ENGINE_UNAVAILABLE: EngineUnavailable,
    wire.INTERNAL: ServerError,
    wire.BAD_MESSAGE: ServerError,
    wire.UNAUTHORIZED: Unauthorized,
}


def error_from_message(msg: dict) -> FastServeError:
    cls = _ERRORS.get(msg.get("type", ""), ServerError)
    return cls(str(msg.get("message", "")), param=msg.get("param"), type=msg.get("type"))


@dataclass
class Output:
    """One increment of a request's output (new text / token ids only)."""

    id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[Any] | None = None
    queue_level: int = 0
    stats: dict | None = None
    prompt_token_ids: list[int] | None = None
    request_id: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # With ``prompt_logprobs=k``, on the first output: one per prompt token, None for the
    # first, then ``[logprob, [[token_id, logprob], ...top k]]`` given the tokens before it.
    prompt_logprobs: list[Any] | None = None
    # With tools: pieces of tool calls, as OpenAI streams them ({index, id, type,
    # function: {name, arguments}} first, then {index, function: {arguments}}); ``text``
    # is then the content outside calls. ``join_tool_calls`` puts them together.
    tool_calls: list[dict] | None = None

    @classmethod
    def from_message(cls, msg: dict) -> Output:
        kw = {k: msg[k] for k in wire.OUTPUT_FIELDS if msg.get(k) is not None}
        return cls(id=msg["id"], **kw)


def generate_message(
    rid: str,
    prompt: Any,
    messages: list[dict] | None,
    prompt_token_ids: list[int] | None,
    params: Any,
    overrides: dict,
    tools: dict | None = None,
) -> dict:
    if params is not None and hasattr(params, "to_dict"):  # an engine.sampling.SamplingParams
        params = {k: v for k, v in params.to_dict().items() if k != "extra"}
    merged = {**(params or {}), **overrides}
    if isinstance(merged.get("logit_bias"), dict):  # the wire takes string keys only
        merged["logit_bias"] = {str(k): v for k, v in merged["logit_bias"].items()}
    msg: dict[str, Any] = {"kind": wire.GENERATE, "id": rid, "params": merged}
    for name, value in (
        ("prompt", prompt),
        ("messages", messages),
        ("prompt_token_ids", prompt_token_ids),
    ):
        if value is not None:
            msg[name] = value
    for name, value in (tools or {}).items():
        if value is not None:
            msg[name] = value
    return msg


def join_tool_calls(outputs: Any) -> list[dict]:
    """Whole tool calls ``[{id, type, function: {name, arguments}}]`` from the
    ``tool_calls`` pieces of a request's outputs."""
    calls: dict[int, dict] = {}
    for out in outputs:
        for piece in getattr(out, "tool_calls", None) or []:
            call = calls.setdefault(
                piece["index"], {"id": None, "type": "function",
                                 "function": {"name": None, "arguments": ""}}
            )
            if piece.get("id"):
                call["id"] = piece["id"]
                call["function"]["name"] = piece["function"]["name"]
            call["function"]["arguments"] += piece["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


class _Book:
    """Per-request buffers and liveness; no I/O."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.buffers: dict[str, collections.deque] = {}
        self.heard: dict[str, float] = {}

    def open(self, rid: str) -> None:
        if rid in self.buffers:
            raise InvalidRequest(f"id {rid!r} is already in use by this client", param="id")
        self.buffers[rid] = collections.deque()
        self.heard[rid] = time.monotonic()

    def close(self, rid: str) -> None:
        self.buffers.pop(rid, None)
        self.heard.pop(rid, None)

    def dispatch(self, msg: dict) -> str | None:
        """File a reply; returns the id it was for (None: heartbeat / unknown)."""
        now = time.monotonic()
        if msg.get("kind") == wire.HEARTBEAT:
            for rid in msg.get("ids") or []:
                if rid in self.heard:
                    self.heard[rid] = now
            return None
        rid = msg.get("id")
        if rid is None and msg.get("kind") == wire.ERROR:
            # The server could not read a message at all: fail every waiter rather than
            # let the one it belonged to wait out its timeout.
            for buf in self.buffers.values():
                buf.append(msg)
            return None
        if rid in self.buffers:
            self.buffers[rid].append(msg)
            self.heard[rid] = now
            return rid
        return None

    def take(self, rid: str) -> dict | None:
        buf = self.buffers.get(rid)
        if buf:
            return buf.popleft()
        if time.monotonic() - self.heard.get(rid, 0.0) > self.timeout:
            raise EngineUnavailable(
                f"no word from the server about {rid!r} for {self.timeout:g}s: "
                "it went away, or the request was lost"
            )
        return None


def _check(msg: dict) -> dict:
    if msg.get("kind") == wire.ERROR:
        raise error_from_message(msg)
    return msg


class Client:
    """Blocking client. Not thread-safe: use one per thread. Several ``generate``
    iterators may be consumed interleaved from the same thread."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
    ) -> None:
        self.address = address or wire.default_zmq_address()
        self._api_key = api_key  # sent in every message when the server wants one
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)  # close() must never block on unsent messages
        # A DEALER blocks sends once its queue to the server is full (server gone long
        # enough): bound that wait by the same timeout.
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        self._sock.connect(self.address)
        self._book = _Book(timeout)

    def _pump(self, wait_s: float) -> None:
        if self._sock.poll(int(wait_s * 1000)):
            while True:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                try:
                    self._book.dispatch(wire.decode(frames[-1]))
                except wire.WireError:
                    continue

    def _next(self, rid: str) -> dict:
        while True:
            msg = self._book.take(rid)
            if msg is not None:
                return _check(msg)
            self._pump(POLL_S)

    def _send(self, msg: dict, flags: int = 0) -> None:
        try:
            self._sock.send(_encode(msg, self._api_key), flags)
        except zmq.Again:
            if not flags:
                raise EngineUnavailable(
                    f"could not send to {self.address} within {self._book.timeout:g}s"
                ) from None

    def _call(self, kind: str) -> dict:
        rid = uuid.uuid4().hex
        self._book.open(rid)
        try:
            self._send({"kind": kind, "id": rid})
            return self._next(rid)
        finally:
            self._book.close(rid)

    def generate(
        self,
        prompt: str | list[int] | None = None,
        *,
        messages: list[dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        params: Any = None,
        request_id: str | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
        **sampling: Any,
    ) -> Iterator[Output]:
        """Stream a request's outputs; the last has ``finished=True``. ``params`` (a dict or
        ``SamplingParams``) and keyword arguments (``max_tokens=8``) are sampling fields.
        ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (with ``messages``) are
        OpenAI's; calls arrive in ``Output.tool_calls``. Stopping the iteration early
        aborts the request on the server."""
        rid = request_id or uuid.uuid4().hex
        msg = generate_message(
            rid, prompt, messages, prompt_token_ids, params, sampling,
            _tool_fields(tools, tool_choice, parallel_tool_calls),
        )
        self._book.open(rid)
        return self._stream(rid, msg)

    def _stream(self, rid: str, msg: dict) -> Iterator[Output]:
        finished = False
        try:
            self._send(msg)
            while not finished:
                out = Output.from_message(self._next(rid))
                finished = out.finished
                yield out
        finally:
            self._book.close(rid)
            if not finished and not self._sock.closed:
                self._send({"kind": wire.ABORT, "id": rid}, zmq.NOBLOCK)

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream (if still read) ends with finish_reason ``abort``."""
        self._send({"kind": wire.ABORT, "id": request_id})

    def health(self) -> bool:
        """True if the engine serves; False if it cannot or the server does not answer."""
        try:
            return bool(self._call(wire.HEALTH).get("serving"))
        except FastServeError:
            return False

    def models(self) -> list[dict]:
        return list(self._call(wire.MODELS).get("data") or [])

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; any number of concurrent ``generate`` calls share one socket."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
    ) -> None:
        self.address = address or wire.default_zmq_address()
        self._api_key = api_key
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)
        self._book = _Book(timeout)
        self._wake: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task | None = None

    async def _read_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                msg = wire.decode(frames[-1])
            except wire.WireError:
                continue
            rid = self._book.dispatch(msg)
            targets = (
                [rid]
                if rid is not None
                else list(self._wake)
                if msg.get("kind") == wire.ERROR
                else []
            )
            for r in targets:
                if r in self._wake:
                    self._wake[r].set()

    def _open(self, rid: str) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_loop())
        self._book.open(rid)
        self._wake[rid] = asyncio.Event()

    def _close(self, rid: str) -> None:
        self._book.close(rid)
        self._wake.pop(rid, None)

    async def _next(self, rid: str) -> dict:
        while True:
            msg = self._book.take(rid)
            if msg is not None:
                return _check(msg)
            wake = self._wake[rid]
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), POLL_S)

    async def _send(self, msg: dict) -> None:
        try:
            await asyncio.wait_for(
                self._sock.send(_encode(msg, self._api_key)), self._book.timeout
            )
        except asyncio.TimeoutError:
            raise EngineUnavailable(
                f"could not send to {self.address} within {self._book.timeout:g}s"
            ) from None

    async def _call(self, kind: str) -> dict:
        rid = uuid.uuid4().hex
        self._open(rid)
        try:
            await self._send({"kind": kind, "id": rid})
            return await self._next(rid)
        finally:
            self._close(rid)

    async def generate(
        self,
        prompt: str | list[int] | None = None,
        *,
        messages: list[dict] | None = None,
        prompt_token_ids: list[int] | None = None,
        params: Any = None,
        request_id: str | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
        **sampling: Any,
    ) -> AsyncIterator[Output]:
        """As ``Client.generate``; leaving the ``async for`` early (or cancelling) aborts."""
        rid = request_id or uuid.uuid4().hex
        msg = generate_message(
            rid, prompt, messages, prompt_token_ids, params, sampling,
            _tool_fields(tools, tool_choice, parallel_tool_calls),
        )
        self._open(rid)
        finished = False
        try:
            await self._send(msg)
            while not finished:
                out = Output.from_message(await self._next(rid))
                finished = out.finished
                yield out
        finally:
            self._close(rid)
            if not finished and not self._sock.closed:
                # Fire-and-forget: this may run during cancellation, so it must not block.
                _send_nowait(self._sock, _encode({"kind": wire.ABORT, "id": rid}, self._api_key))

    async def abort(self, request_id: str) -> None:
        await self._send({"kind": wire.ABORT, "id": request_id})

    async def health(self) -> bool:
        try:
            return bool((await self._call(wire.HEALTH)).get("serving"))
        except FastServeError:
            return False

    async def models(self) -> list[dict]:
        return list((await self._call(wire.MODELS)).get("data") or [])

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _send_nowait(sock: zmq.asyncio.Socket, data: bytes) -> None:
    """Best-effort send that never blocks (used from ``finally`` during cancellation)."""
    try:
        fut = sock.send(data, zmq.NOBLOCK)
    except zmq.ZMQError:
        return
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # consume the outcome


def _tool_fields(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> dict:
    return {"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls}


def _encode(msg: dict, api_key: str | None) -> bytes:
    return wire.encode({**msg, "api_key": api_key} if api_key is not None else msg)
