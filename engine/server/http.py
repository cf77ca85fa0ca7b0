"""The OpenAI-compatible HTTP server (aiohttp).

``build_app(engine, server_config, model_name)`` returns the application; ``serve`` runs
it (and the ZeroMQ frontend) until SIGINT/SIGTERM; ``run_server`` is the blocking entry
point for the CLI (uvloop where available). Routes and error shapes: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import inspect
import ipaddress
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from engine.config import EngineConfig, ServerConfig
from engine.sampling import InvalidRequestError
from engine.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from engine.server.openai_api import ApiError, bad, check_fields, check_model, parse_messages
from engine.server.openai_routes import RETRY_AFTER_S, GenerationRoutes, read_json
from engine.server.openapi import openapi_document
from engine.server.oplog import access_middleware, log_stats_forever
from engine.server.protocol import EngineLike
from engine.server.tools import chat_prompt_ids

log = logging.getLogger("fastserve.server")

ENGINE_KEY = web.AppKey("fastserve_engine", object)
METRICS_KEY = web.AppKey("fastserve_metrics", ServerMetrics)
ROUTES_KEY = web.AppKey("fastserve_generation_routes", GenerationRoutes)
# After the drain deadline: seconds the aborted requests get to send their last event.
ABORT_GRACE_S = 2.0
# Seconds to wait for engine.stats(): a wedged engine must not hang /metrics scrapes.
STATS_TIMEOUT_S = 5.0
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what ModelConfig(path=None) loads


def default_model_name(config: EngineConfig) -> str:
    if config.server.served_model_name:
        return config.server.served_model_name
    if config.model.path:
        return os.path.basename(os.path.normpath(config.model.path)).removesuffix(".gguf")
    return DEFAULT_MODEL_NAME


def _error_response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
):
    try:
        return await handler(request)
    except ApiError as e:
        return _error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # Router 404/405 and aiohttp's own 413 in OpenAI's shape, like every other error.
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        return _error_response(
            ApiError(e.status, f"{e.reason}: {request.method} {request.path}", code=code)
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(
            ApiError(
                500,
                f"internal error: {type(e).__name__}: {e}",
                type="internal_error",
                code="internal_error",
            )
        )


def _auth(api_key: str) -> Callable:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path != "/health":  # probes must work without the key
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                raise ApiError(
                    401,
                    "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                )
        return await handler(request)

    return auth


def build_app(
    engine: EngineLike,
    server_config: ServerConfig,
    model_name: str,
    *,
    metrics: ServerMetrics | None = None,
) -> web.Application:
    """The HTTP application. ``metrics`` may be shared with the ZeroMQ frontend."""
    middlewares: list = [_errors]
    if server_config.log_requests:  # outermost: it sees the status _errors turned errors into
        middlewares.insert(0, access_middleware())
    if server_config.api_key:
        middlewares.append(_auth(server_config.api_key))
    # client_max_size makes aiohttp itself stop reading a chunked body past the cap.
    app = web.Application(middlewares=middlewares, client_max_size=server_config.max_body_bytes)
    metrics = metrics or ServerMetrics(model_name)
    app[ENGINE_KEY] = engine
    app[METRICS_KEY] = metrics
    gen = GenerationRoutes(
        engine,
        model_name,
        server_config.max_body_bytes,
        metrics,
        tool_call_parser=server_config.tool_call_parser,
    )
    app[ROUTES_KEY] = gen
    misc = _MiscRoutes(engine, model_name, server_config.max_body_bytes, metrics, gen)
    app.router.add_post("/v1/completions", gen.completions)
    app.router.add_post("/v1/chat/completions", gen.chat)
    app.router.add_get("/v1/models", misc.models)
    app.router.add_get("/v1/models/{model_id:.+}", misc.model)  # ids may hold a '/'
    app.router.add_get("/health", misc.health)
    app.router.add_get("/version", misc.version)
    app.router.add_post("/tokenize", misc.tokenize)
    app.router.add_post("/detokenize", misc.detokenize)
    app.router.add_get("/metrics", misc.metrics_route)
    app.router.add_get("/v1/scheduler", misc.scheduler)
    app.router.add_get("/openapi.json", misc.openapi)
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("fastserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _MiscRoutes:
    def __init__(
        self,
        engine: EngineLike,
        model_name: str,
        max_body_bytes: int,
        metrics: ServerMetrics,
        gen: GenerationRoutes,
    ) -> None:
        self.gen = gen
        self.engine = engine
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.created = int(time.time())

    def _card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "fastserve",
            "root": self.model_name,
            "parent": None,
            "max_model_len": self.engine.max_model_len,
            "permission": [],
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]})

    async def model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id != self.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model",
                           code="model_not_found")
        return web.json_response(self._card())

    async def health(self, request: web.Request) -> web.Response:
        if self.engine.is_serving and self.gen.admitting:
            return web.Response(status=200)
        raise ApiError(
            503,
            "the engine cannot serve",
            type="service_unavailable",
            code="engine_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    async def openapi(self, request: web.Request) -> web.Response:
        doc = openapi_document(self.model_name, self.engine.max_model_len, _version())
        return web.json_response(doc)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": _version()})

    async def _stats(self) -> dict:
        try:
            return await asyncio.wait_for(self.engine.stats(), STATS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - timeout included: the engine cannot answer
            raise ApiError(
                503,
                f"engine stats unavailable: {type(e).__name__}: {e}",
                type="service_unavailable",
                code="engine_unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None

    async def metrics_route(self, request: web.Request) -> web.Response:
        try:
            self.metrics.refresh(await self._stats(), self.engine.is_serving)
        except ApiError:
            # Still answer: request counters are valid; only the gauges are stale.
            self.metrics.serving.labels(self.model_name).set(0)
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def scheduler(self, request: web.Request) -> web.Response:
        stats = await self._stats()
        body = {"object": "scheduler.stats", "model": self.model_name, **stats}
        return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request, self.max_body_bytes)
        fields = {
            "model": "str",
            "prompt": "str",
            "messages": "list",
            "add_special_tokens": "bool",
            "add_generation_prompt": "bool",
            "return_token_strs": "bool",
            "tools": "list",  # with messages: counted as the chat route renders them
        }
        f = check_fields(body, fields, {})
        check_model(f, self.model_name)
        tok = self.engine.tokenizer
        if ("prompt" in f) == ("messages" in f):
            raise bad("prompt", "give exactly one of prompt or messages")
        if "tools" in f and "messages" not in f:
            raise bad("tools", "only with messages")
        try:
            if "messages" in f:
                ids = chat_prompt_ids(
                    tok,
                    parse_messages(f["messages"]),
                    f.get("tools"),
                    self.gen.tool_call_parser,
                    add_generation_prompt=f.get("add_generation_prompt", True),
                )
            else:
                ids = self._encode(f["prompt"], f.get("add_special_tokens"))
        except ApiError:
            raise
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        except Exception as e:  # noqa: BLE001 - tokenizer errors are the input's fault
            raise bad(
                "messages" if "messages" in f else "prompt", f"cannot tokenize: {e}"
            ) from None
        ids = [int(t) for t in ids]
        strs = None
        if f.get("return_token_strs"):  # vocabulary strings, as vLLM returns them
            convert = getattr(tok, "convert_ids_to_tokens", None)
            strs = list(convert(ids)) if convert else [tok.decode([t]) for t in ids]
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": self.engine.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    def _encode(self, text: str, add_special_tokens: bool | None) -> list[int]:
        encode = self.engine.tokenizer.encode
        if add_special_tokens is None or add_special_tokens is True:
            # The default is exactly what generate() feeds the model for this prompt.
            return list(encode(text))
        if "add_special_tokens" not in inspect.signature(encode).parameters:
            raise bad(
                "add_special_tokens",
                "this tokenizer always encodes prompts the way generation does",
            )
        return list(encode(text, add_special_tokens=False))  # type: ignore[call-arg]

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request, self.max_body_bytes)
        f = check_fields(body, {"model": "str", "tokens": "list"}, {})
        check_model(f, self.model_name)
        tokens = f.get("tokens")
        vocab = self.engine.vocab_size
        if tokens is None or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise bad("tokens", f"required: an array of token ids in [0, {vocab})")
        try:
            text = self.engine.tokenizer.decode(tokens)
        except Exception as e:  # noqa: BLE001 - e.g. an id past the vocabulary
            raise bad("tokens", f"cannot detokenize: {e}") from None
        return web.json_response({"prompt": text})


# -- running --------------------------------------------------------------------------------
async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on host:port (0 = a free port); returns the runner and the bound port."""
    # handler_cancellation: a client that hangs up cancels its handler, which closes its
    # engine generators (the handlers also poll for disconnects, for runners without it).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []  # aiohttp exposes no public accessor
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound


async def serve(
    engine_config: EngineConfig,
    *,
    engine: Any = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str, str | None], None] | None = None,
) -> None:
    """Create the engine (unless given), serve HTTP on server.host:port and ZeroMQ on
    server.zmq_address until SIGINT/SIGTERM (or ``stop`` is set), then shut down.

    Shutdown drains: admission stops at once (new generations and ``/health`` answer 503),
    requests in flight get ``server.shutdown_timeout_s`` seconds to finish, the rest are
    aborted (their streams end with ``finish_reason: "abort"``), then the listeners, the
    ZeroMQ socket file and the engine's workers go. A second signal skips the wait.

    ``on_ready(http_url, zmq_address_or_None)`` is called once both listen (port 0 and
    ``tcp://host:*`` pick free ports; this is how a caller learns them). A given ``engine``
    is left running on exit; one created here is shut down.
    """
    from engine.server.zmq_frontend import ZmqFrontend, resolve_zmq_address

    sc = engine_config.server
    own_engine = engine is None
    stop = stop or asyncio.Event()
    hurry = asyncio.Event()  # a second signal: abort in-flight requests now
    loop = asyncio.get_running_loop()

    frontends: list[Any] = []  # the HTTP routes and the ZeroMQ frontend, once they exist

    def on_signal() -> None:
        # Admission closes here, in the signal's own callback: a request arriving a few
        # loop iterations later (before the drain starts) must already get its 503.
        for f in frontends:
            f.admitting = False
        if stop.is_set():
            hurry.set()
        stop.set()

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    name = default_model_name(engine_config)
    metrics = ServerMetrics(name)
    runner = zmq = app = trace = stats_task = None
    try:
        if own_engine:  # after the handlers: a SIGTERM while loading still shuts down cleanly
            from engine.api import Engine

            engine = await Engine.create(engine_config)
            if stop.is_set():
                return
        served = engine
        if sc.record_trace:  # `serve --record-trace`: every request, HTTP or ZeroMQ, is seen
            from engine.server.trace import TraceWriter, TracingEngine

            trace = TraceWriter(sc.record_trace, sc.record_trace_prompts)
            served = TracingEngine(engine, trace)
        app = build_app(served, sc, name, metrics=metrics)
        frontends.append(app[ROUTES_KEY])
        runner, port = await start_http(app, sc.host, sc.port)
        address = resolve_zmq_address(sc.zmq_address, port)
        if address:
            zmq = ZmqFrontend(
                served,
                address,
                name,
                metrics=metrics,
                max_message_bytes=sc.max_body_bytes,
                api_key=sc.api_key,
                tool_call_parser=sc.tool_call_parser,
            )
            await zmq.start()
            frontends.append(zmq)
            address = zmq.address
        url = f"http://{sc.host}:{port}"
        exposed = [a for a in (sc.host, address or "") if a and not _is_loopback(a)]
        if exposed and not sc.api_key:
            log.warning("listening beyond loopback (%s) without --api-key: anyone who can "
                        "reach it can use it (docs/security.md)", ", ".join(exposed))
        _log_banner(engine, [f"{url}/v1 (OpenAI API; {url}/metrics, {url}/health)",
                             *([f"{address} (ZeroMQ SDK)"] if address else [])])
        log.info("serving %s on %s%s", name, url, f" and {address}" if address else "",
                 extra={"fields": {"event": "ready", "model": name, "url": url,
                                   "zmq_address": address}})
        if sc.log_stats_interval_s > 0:
            stats_task = asyncio.ensure_future(log_stats_forever(engine, sc.log_stats_interval_s))
        if on_ready is not None:
            on_ready(url, address)
        await _until_stopped(stop, engine)
        await _drain(app[ROUTES_KEY], zmq, sc.shutdown_timeout_s, hurry)
    finally:
        if stats_task is not None:
            stats_task.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
        if zmq is not None:
            await zmq.stop()
        if runner is not None:
            await runner.cleanup()
        if own_engine and engine is not None:
            await engine.shutdown()
        if trace is not None:
            trace.close()
        log.info("server stopped")


def _is_loopback(address: str) -> bool:
    """An HTTP host or a ZeroMQ endpoint that only this machine can reach."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.removeprefix("tcp://").rsplit(":", 1)[0] if "://" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _drain(gen: GenerationRoutes, zmq: Any, timeout_s: float, hurry: asyncio.Event) -> None:
    """Stop admission, wait up to ``timeout_s`` for in-flight requests, abort the rest."""
    gen.admitting = False
    if zmq is not None:
        zmq.admitting = False

    def in_flight() -> int:
        return len(gen.live) + (len(zmq.live) if zmq is not None else 0)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(timeout_s, 0.0)
    if in_flight():
        log.warning("shutting down: draining %d request(s) for up to %gs", in_flight(), timeout_s)
    while in_flight() and loop.time() < deadline and not hurry.is_set():
        await asyncio.sleep(0.05)
    if not in_flight():
        return
    log.warning("shutting down: aborting %d request(s) still running", in_flight())
    await gen.abort_live()
    if zmq is not None:
        await zmq.abort_live()
    grace = loop.time() + ABORT_GRACE_S
    while in_flight() and loop.time() < grace:
        await asyncio.sleep(0.05)


async def _until_stopped(stop: asyncio.Event, engine: Any) -> None:
    """Until ``stop`` is set, or the engine gives up for good (its model no longer loads):
    then the process must end with an error rather than serve 503s forever."""
    fatal = getattr(engine, "wait_fatal", None)
    if fatal is None:
        await stop.wait()
        return
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(fatal())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if engine.fatal_error is not None:
        raise EngineFatalError(f"the engine stopped for good: {engine.fatal_error}")


class EngineFatalError(RuntimeError):
    """The engine cannot recover (its model no longer loads); the server exits."""


def _log_banner(engine: Any, urls: list[str]) -> None:
    describe = getattr(engine, "describe", None)
    if describe is None:  # a stand-in engine (tests)
        return
    from engine.banner import format_banner

    info = describe()
    log.info("%s", format_banner(info, urls), extra={"fields": {"event": "banner", **info}})


def run_server(engine_config: EngineConfig) -> int:
    """Blocking entry point for ``fastserve serve``: uvloop where available."""
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(engine_config))
    except EngineFatalError as e:
        log.error("%s", e)
        return 1
    return 0
