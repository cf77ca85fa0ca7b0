"""The ZeroMQ frontend: a ROUTER socket in the engine's event loop (wire format:
``engine.client.wire``, docs/client.md).

Each generate request runs in its own task that iterates ``engine.generate`` inside
``aclosing``; cancelling the task (abort message, client unreachable, server stop) closes
the generator, which aborts the engine job at once. Requests are keyed by
``(client identity, id)``, so an abort from one client cannot stop another's request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hmac
import logging
import os
from typing import Any

import zmq
import zmq.asyncio

from engine.client import wire
from engine.sampling import InvalidRequestError, SamplingParams
from engine.server.metrics import ServerMetrics
from engine.server.openai_api import ApiError, parse_messages
from engine.server.protocol import EngineLike, classify_error
from engine.server.tools import ToolOutput, prepare_wire, wire_output
from engine.structured.spec import OPENAI_FIELDS, spec_from_openai

log = logging.getLogger("fastserve.zmq")

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} - {"extra"}
MAX_ID_CHARS = 256  # ids are echoed in every reply; keep them small


def resolve_zmq_address(configured: str | None, http_port: int) -> str | None:
    """``None``: the default ipc path for this HTTP port; ``""``/``"off"``/``"none"``: no
    ZeroMQ frontend; anything else is used as given (``tcp://127.0.0.1:*`` picks a port)."""
    if configured is None:
        return wire.default_zmq_address(http_port)
    if configured.strip().lower() in ("", "off", "none"):
        return None
    return configured


class _Unreachable(Exception):
    """The client's identity is no longer routable (it disconnected)."""


class ZmqFrontend:
    def __init__(
        self,
        engine: EngineLike,
        address: str,
        model_name: str,
        *,
        metrics: ServerMetrics | None = None,
        heartbeat_interval_s: float = wire.HEARTBEAT_INTERVAL_S,
        max_message_bytes: int = 4 * 1024**2,
        api_key: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.engine = engine
        self.tool_call_parser = tool_call_parser  # None: the default for the model's family
        self.address = address  # after start(): the bound endpoint (a "*" port resolved)
        self.model_name = model_name
        self.metrics = metrics
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_message_bytes = max_message_bytes
        self._api_key = api_key.encode() if api_key else None
        self.admitting = True  # False while draining for shutdown: new generates get 503s
        self.num_dropped = 0  # malformed, oversized or unauthorized messages (tests, logs)
        self.live: dict[tuple[bytes, str], asyncio.Task] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._loops: list[asyncio.Task] = []

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Unroutable replies raise EHOSTUNREACH instead of vanishing: that is how a
        # departed client is noticed and its jobs aborted.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Past twice the limit libzmq itself drops the peer, so no frame of any size is
        # buffered whole; up to there a message over the limit is refused here, with a log line.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
        sock.bind(self.address)
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._loops = [
            asyncio.ensure_future(self._recv_loop()),
            asyncio.ensure_future(self._heartbeat_loop()),
        ]

    async def abort_live(self) -> None:
        """Abort every running request; each stream ends with finish_reason ``abort``."""
        for _identity, rid in list(self.live):
            await self.engine.abort(rid)

    async def stop(self) -> None:
        tasks = self._loops + list(self.live.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.live.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        self._sock = self._ctx = None
        if self.address and self.address.startswith("ipc://"):
            # libzmq leaves the socket file behind; a stale one would confuse the next bind.
            with contextlib.suppress(OSError):
                os.unlink(self.address.removeprefix("ipc://"))

    # -- I/O ----------------------------------------------------------------------------------
    async def _send(self, identity: bytes, msg: dict) -> None:
        assert self._sock is not None
        try:
            await self._sock.send_multipart([identity, wire.encode(msg)])
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                raise _Unreachable() from None
            raise

    async def _reply(self, identity: bytes, msg: dict) -> None:
        """Send a reply whose loss only matters to the (gone) client."""
        try:
            await self._send(identity, msg)
        except _Unreachable:
            self._drop_client(identity)

    def _drop_client(self, identity: bytes) -> None:
        for key in [k for k in self.live if k[0] == identity]:
            self.live.pop(key).cancel()

    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:  # [identity, body] is the only shape a DEALER client sends
                self._drop(frames[0] if frames else b"", f"{len(frames)} frames")
                continue
            identity, body = frames
            if len(body) > self.max_message_bytes:
                self._drop(identity, f"{len(body)} bytes (limit {self.max_message_bytes})")
                await self._reply(
                    identity,
                    wire.error_message(
                        None,
                        wire.BAD_MESSAGE,
                        f"message too large: {len(body)} bytes (limit {self.max_message_bytes})",
                    ),
                )
                continue
            try:
                msg = wire.decode(body)  # msgpack only: nothing read here is ever unpickled
            except wire.WireError as e:
                self._drop(identity, str(e))
                await self._reply(identity, wire.error_message(None, wire.BAD_MESSAGE, str(e)))
                continue
            if not self._authorized(msg):
                self._drop(identity, "missing or wrong api_key")
                await self._reply(
                    identity,
                    wire.error_message(
                        _id(msg),
                        wire.UNAUTHORIZED,
                        "missing or incorrect API key (send it as the 'api_key' field)",
                        "api_key",
                    ),
                )
                continue
            try:
                await self._handle(identity, msg)
            except Exception as e:  # one bad message must not stop the frontend
                log.exception("zmq frontend failed on a %r message", msg.get("kind"))
                await self._reply(
                    identity,
                    wire.error_message(_id(msg), wire.INTERNAL, f"{type(e).__name__}: {e}"),
                )

    def _drop(self, identity: bytes, why: str) -> None:
        self.num_dropped += 1
        # The identity is libzmq's or the client's choice of bytes: log a bounded hex prefix.
        log.warning("zmq frontend dropped a message from %s: %s", identity[:16].hex(), why[:200])

    def _authorized(self, msg: dict) -> bool:
        """Every kind but ``health`` needs the key when one is set (constant-time compare)."""
        if self._api_key is None or msg.get("kind") == wire.HEALTH:
            return True
        got = msg.get("api_key")
        if isinstance(got, str):
            got = got.encode("utf-8", "replace")
        return isinstance(got, bytes) and hmac.compare_digest(got, self._api_key)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            by_client: dict[bytes, list[str]] = {}
            for identity, rid in self.live:
                by_client.setdefault(identity, []).append(rid)
            for identity, ids in by_client.items():
                await self._reply(identity, {"kind": wire.HEARTBEAT, "ids": ids})

    # -- messages ---------------------------------------------------------------------------
    async def _handle(self, identity: bytes, msg: dict) -> None:
        kind, rid = msg["kind"], _id(msg)
        if rid is None:
            self._drop(identity, "no valid 'id'")
            await self._reply(
                identity,
                wire.error_message(
                    None,
                    wire.BAD_MESSAGE,
                    f"'id' must be a non-empty string of at most {MAX_ID_CHARS} characters",
                ),
            )
        elif kind == wire.GENERATE:
            await self._generate(identity, rid, msg)
        elif kind == wire.ABORT:
            task = self.live.pop((identity, rid), None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self._reply(
                    identity,
                    {
                        "kind": wire.OUTPUT,
                        "id": rid,
                        "request_id": rid,
                        "text": "",
                        "token_ids": [],
                        "finished": True,
                        "finish_reason": "abort",
                    },
                )
        elif kind == wire.HEALTH:
            await self._reply(
                identity, {"kind": wire.HEALTH, "id": rid, "serving": bool(self.engine.is_serving)}
            )
        elif kind == wire.MODELS:
            data = [
                {
                    "id": self.model_name,
                    "object": "model",
                    "max_model_len": self.engine.max_model_len,
                }
            ]
            await self._reply(identity, {"kind": wire.MODELS, "id": rid, "data": data})
        else:
            self._drop(identity, f"unknown kind {kind[:64]!r}")
            await self._reply(
                identity,
                wire.error_message(rid, wire.BAD_MESSAGE, f"unknown kind {kind[:64]!r}"),
            )

    async def _generate(self, identity: bytes, rid: str, msg: dict) -> None:
        key = (identity, rid)
        try:
            if not self.admitting:
                await self._reply(
                    identity,
                    wire.error_message(
                        rid, wire.ENGINE_UNAVAILABLE, "the server is shutting down"
                    ),
                )
                return
            if key in self.live:
                raise InvalidRequestError(f"id {rid!r} is already running", "id")
            prompt, messages = _prompt(msg)
            params, structured_field = _params(msg.get("params"))
            chat = messages is not None
            rendered, params, tool_out = prepare_wire(
                msg, messages, params, self.engine.tokenizer, self.tool_call_parser
            )
            if rendered is not None:
                prompt, messages = rendered, None
            if tool_out is not None and tool_out.req.structured() is not None:
                structured_field = "tools"  # the spec forcing the calls came from the tools
        except InvalidRequestError as e:
            await self._reply(
                identity, wire.error_message(rid, wire.INVALID_REQUEST, str(e), e.param)
            )
            return
        self.live[key] = asyncio.ensure_future(
            self._run(identity, rid, prompt, messages, params, structured_field, chat, tool_out)
        )

    async def _run(
        self,
        identity: bytes,
        rid: str,
        prompt: Any,
        messages: list[dict] | None,
        params: SamplingParams,
        structured_field: str = "params.structured",
        chat: bool = False,
        tool_out: ToolOutput | None = None,
    ) -> None:
        tracker = self.metrics.track() if self.metrics is not None else None
        try:
            gen = self.engine.generate(prompt, params, messages=messages, request_id=rid)
            async with contextlib.aclosing(gen) as outputs:
                async for out in outputs:
                    if tracker is not None:
                        tracker.on_output(out)
                    reply = wire.output_message(rid, out)
                    if tool_out is not None:
                        wire_output(reply, tool_out)
                    await self._send(identity, reply)
        except _Unreachable:
            log.info("zmq client went away; aborted %s", rid)
            self._drop_client(identity)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            info = classify_error(e, self.engine, chat=chat)
            if info.param == "structured":  # refused when compiled: name the field sent
                info = dataclasses.replace(
                    info, param=structured_field,
                    message=info.message.replace("structured", structured_field, 1))
            if info.kind == wire.INTERNAL:
                log.error("request %s failed", rid, exc_info=e)
            await self._reply(
                identity, wire.error_message(rid, info.kind, info.message, info.param)
            )
        finally:
            if self.live.get((identity, rid)) is asyncio.current_task():
                del self.live[(identity, rid)]


def _id(msg: dict) -> str | None:
    rid = msg.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None


_GENERATE_KEYS = {
    "kind", "id", "api_key", "prompt", "prompt_token_ids", "messages", "params",
    "tools", "tool_choice", "parallel_tool_calls",  # chat only (engine/server/tools.py)
}


def _prompt(msg: dict) -> tuple[Any, list[dict] | None]:
    unknown = [k for k in msg if k not in _GENERATE_KEYS]
    if unknown:
        raise InvalidRequestError(f"{unknown[0]!s:.64}: unknown field", f"{unknown[0]!s:.64}")
    given = [k for k in ("prompt", "prompt_token_ids", "messages") if msg.get(k) is not None]
    if len(given) != 1:
        raise InvalidRequestError(
            "give exactly one of prompt, prompt_token_ids, messages", "prompt"
        )
    if "messages" in given:
        if not isinstance(msg["messages"], list):
            raise InvalidRequestError("messages: must be an array", "messages")
        try:
            return None, parse_messages(msg["messages"])
        except ApiError as e:
            raise InvalidRequestError(e.message, e.param) from None
    value = msg[given[0]]
    if given[0] == "prompt_token_ids" and not isinstance(value, list):
        raise InvalidRequestError(
            "prompt_token_ids: must be an array of integers", "prompt_token_ids"
        )
    if not isinstance(value, (str, list)):
        raise InvalidRequestError("prompt: must be a string or an array of token ids", "prompt")
    return value, None


def _params(raw: Any) -> tuple[SamplingParams, str]:
    """The request's sampling parameters, and the field its output constraint came from:
    ``params.structured`` itself, or OpenAI's ``response_format`` / vLLM's ``guided_*``
    (accepted in ``params`` too and mapped as the HTTP routes map them)."""
    if raw is None:
        return SamplingParams(), "params.structured"
    if not isinstance(raw, dict):
        raise InvalidRequestError("params: must be a map", "params")
    for name in raw:
        if name not in _PARAM_FIELDS and name not in OPENAI_FIELDS:
            raise InvalidRequestError(f"params.{name}: unknown field", f"params.{name}")
    if raw.get("n", 1) != 1:
        raise InvalidRequestError("params.n: one sequence per request; send n requests", "params.n")
    kw = {k: v for k, v in raw.items() if k not in OPENAI_FIELDS}
    field = "params.structured"
    spec, openai_field = spec_from_openai(raw, prefix="params.")
    if spec is not None:
        if kw.get("structured") is not None:
            raise InvalidRequestError(
                f"{openai_field}: give one output constraint, not it and params.structured",
                openai_field)
        kw["structured"], field = spec, openai_field
    try:
        return SamplingParams(**kw), field
    except TypeError as e:  # e.g. stop given as a number: fails before validate() can name it
        raise InvalidRequestError(f"params: {e}", "params") from None
    except InvalidRequestError as e:
        if e.param == "structured":
            raise InvalidRequestError(str(e).replace("structured", field, 1), field) from None
        raise
