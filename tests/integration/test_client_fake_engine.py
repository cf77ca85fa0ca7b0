"""The ZeroMQ frontend and the client SDK (sync and async) against a fake engine.

Server and clients run in this process on 127.0.0.1 (free ports); the blocking ``Client``
runs in a worker thread so the server's event loop keeps going. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator

import aiohttp
import pytest
import zmq
import zmq.asyncio

from engine.client import AsyncClient, Client, EngineUnavailable, InvalidRequest, QueueFull, wire
from engine.config import ServerConfig
from engine.sampling import SamplingParams
from engine.server import build_app, start_http
from engine.server.metrics import ServerMetrics
from engine.server.testing import FakeEngine
from engine.server.zmq_frontend import ZmqFrontend

pytestmark = pytest.mark.timeout(60)

MODEL = "fake-model"


class Server:
    def __init__(
        self, engine: FakeEngine, http: str, zmq_frontend: ZmqFrontend, metrics: ServerMetrics
    ) -> None:
        self.engine, self.http, self.zmq, self.metrics = engine, http, zmq_frontend, metrics

    @property
    def address(self) -> str:
        return self.zmq.address


@contextlib.asynccontextmanager
async def running(
    engine: FakeEngine | None = None, heartbeat_s: float = 0.2
) -> AsyncIterator[Server]:
    engine = engine or FakeEngine()
    metrics = ServerMetrics(MODEL)
    runner, port = await start_http(
        build_app(engine, ServerConfig(port=0), MODEL, metrics=metrics), "127.0.0.1", 0
    )
    front = ZmqFrontend(
        engine, "tcp://127.0.0.1:*", MODEL, metrics=metrics, heartbeat_interval_s=heartbeat_s
    )
    await front.start()
    try:
        yield Server(engine, f"http://127.0.0.1:{port}", front, metrics)
    finally:
        await front.stop()
        await runner.cleanup()


async def wait_for(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_sdk_streams_the_same_tokens_as_http() -> None:
    async with running() as srv:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "Hello there", "max_tokens": 12, "temperature": 0}
            async with s.post(srv.http + "/v1/completions", json=body) as r:
                http_text = (await r.json())["choices"][0]["text"]

        def sync_run() -> list:
            with Client(srv.address, timeout=5) as c:
                return list(c.generate("Hello there", max_tokens=12, temperature=0))

        sync_outs = await asyncio.to_thread(sync_run)
        async with AsyncClient(srv.address, timeout=5) as ac:
            async_outs = [
                o
                async for o in ac.generate(
                    "Hello there", params=SamplingParams(max_tokens=12, temperature=0)
                )
            ]
    for outs in (sync_outs, async_outs):
        assert "".join(o.text for o in outs) == http_text
        assert [t for o in outs for t in o.token_ids] == [ord(c) for c in http_text]
        assert (
            outs[-1].finished
            and outs[-1].finish_reason == "length"
            and outs[-1].num_output_tokens == 12
        )
        assert outs[0].prompt_token_ids == [ord(c) for c in "Hello there"]
        assert not any(o.finished for o in outs[:-1])


async def test_chat_messages_token_ids_health_and_models() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    async with running() as srv, AsyncClient(srv.address, timeout=5) as c:
        outs = [o async for o in c.generate(messages=msgs, max_tokens=3, logprobs=1)]
        ids_outs = [o async for o in c.generate(prompt_token_ids=[104, 105], max_tokens=2)]
        assert await c.health() is True
        models = await c.models()
        srv.engine.serving = False
        assert await c.health() is False
    _, text, _ = srv.engine.expected(
        srv.engine.prompt_ids(None, msgs), SamplingParams(max_tokens=3)
    )
    assert "".join(o.text for o in outs) == text and outs[0].logprobs[0][0] == -0.5
    assert (
        "".join(o.text for o in ids_outs)
        == srv.engine.expected([104, 105], SamplingParams(max_tokens=2))[1]
    )
    assert models == [{"id": MODEL, "object": "model", "max_model_len": 4096}]


async def test_errors_arrive_as_typed_exceptions_and_the_server_keeps_serving() -> None:
    async with running() as srv, AsyncClient(srv.address, timeout=5) as c:
        cases = [
            ({"prompt": "x", "temperature": -1}, InvalidRequest, "temperature"),
            ({"prompt": "x", "bogus": 1}, InvalidRequest, "params.bogus"),
            ({"prompt": "x", "n": 2}, InvalidRequest, "params.n"),
            (
                {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                InvalidRequest,
                "prompt",
            ),
            ({"prompt": ""}, InvalidRequest, "prompt"),
            ({"prompt": "x" * 5000}, InvalidRequest, "prompt"),
        ]
        for kw, exc, param in cases:
            with pytest.raises(exc) as e:
                [o async for o in c.generate(**kw)]
            assert e.value.param == param, kw
        srv.engine.queue_full = True
        with pytest.raises(QueueFull):
            [o async for o in c.generate("x")]
        srv.engine.queue_full, srv.engine.serving = False, False
        with pytest.raises(EngineUnavailable):
            [o async for o in c.generate("x")]
        srv.engine.serving = True
        assert [o async for o in c.generate("x", max_tokens=2)][-1].finished

        def sync_invalid() -> str | None:
            with Client(srv.address, timeout=5) as sc, pytest.raises(InvalidRequest) as e:
                list(sc.generate("x", top_p=0))
            return e.value.param

        assert await asyncio.to_thread(sync_invalid) == "top_p"


async def test_leaving_the_stream_early_or_abort_stops_the_engine_request() -> None:
    async with (
        running(FakeEngine(token_delay_s=0.02)) as srv,
        AsyncClient(srv.address, timeout=5) as c,
    ):
        async with contextlib.aclosing(
            c.generate("x", max_tokens=4_000, request_id="early")
        ) as it:
            async for _ in it:
                break
        await wait_for(lambda: srv.engine.aborted == ["early"])

        outs = []

        async def consume() -> None:
            async for o in c.generate("x", max_tokens=4_000, request_id="explicit"):
                outs.append(o)

        task = asyncio.ensure_future(consume())
        await wait_for(lambda: outs)
        await c.abort("explicit")
        await asyncio.wait_for(task, 5)
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        await wait_for(lambda: "explicit" in srv.engine.aborted and not srv.engine.live)


async def test_heartbeats_keep_a_slow_request_alive_past_the_timeout() -> None:
    engine = FakeEngine(first_token_delay_s=1.0)
    async with running(engine, heartbeat_s=0.1) as srv, AsyncClient(srv.address, timeout=0.5) as c:
        outs = [o async for o in c.generate("x", max_tokens=2)]
    assert outs[-1].finished


async def test_server_stopped_mid_stream_raises_instead_of_hanging() -> None:
    async with running(FakeEngine(token_delay_s=0.02)) as srv:
        got_one = threading.Event()

        def sync_stream() -> BaseException | None:
            # The timeout is the silence a client tolerates; 2 s rides out a loaded machine
            # (a 0.5 s one failed at load average 9.5 before the server was stopped).
            with Client(srv.address, timeout=2.0) as c:
                try:
                    for _ in c.generate("x", max_tokens=4_000):
                        got_one.set()
                except EngineUnavailable as e:
                    return e
            return None

        sync_task = asyncio.ensure_future(asyncio.to_thread(sync_stream))
        async with AsyncClient(srv.address, timeout=2.0) as c:
            stream = c.generate("y", max_tokens=4_000)
            await stream.__anext__()
            await wait_for(got_one.is_set)
            await srv.zmq.stop()  # the frontend goes away without a word
            with pytest.raises(EngineUnavailable):
                await asyncio.wait_for(_drain(stream), 10)
        assert isinstance(await asyncio.wait_for(sync_task, 10), EngineUnavailable)
        await wait_for(lambda: len(srv.engine.aborted) == 2)


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def sync_calls() -> tuple[bool, bool]:
        with Client(f"tcp://127.0.0.1:{port}", timeout=0.3) as c:
            healthy = c.health()
            try:
                list(c.generate("x"))
            except EngineUnavailable:
                return healthy, True
        return healthy, False

    assert await asyncio.wait_for(asyncio.to_thread(sync_calls), 10) == (False, True)


async def test_client_that_vanishes_gets_its_request_aborted_and_garbage_is_answered() -> None:
    async with running(FakeEngine(token_delay_s=0.02)) as srv:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(srv.address)
        await sock.send(b"\xc1 not msgpack")
        reply = wire.decode(await asyncio.wait_for(sock.recv(), 5))
        assert reply["kind"] == "error" and reply["type"] == "BadMessage"
        await sock.send(
            wire.encode(
                {"kind": "generate", "id": "r1", "prompt": "x", "params": {"max_tokens": 4_000}}
            )
        )
        assert wire.decode(await asyncio.wait_for(sock.recv(), 5))["kind"] == "output"
        sock.close(linger=0)  # no abort sent: the server must notice the peer is gone
        ctx.term()
        await wait_for(lambda: srv.engine.aborted == ["r1"])
        async with AsyncClient(srv.address, timeout=5) as c:
            assert [o async for o in c.generate("x", max_tokens=1)][-1].finished


async def test_zmq_requests_are_counted_in_the_shared_metrics() -> None:
    async with running() as srv, AsyncClient(srv.address, timeout=5) as c:
        [o async for o in c.generate("x", max_tokens=3)]
        text = srv.metrics.render().decode()
    assert 'fastserve:generation_tokens_total{model_name="fake-model"} 3.0' in text


async def test_serve_runs_http_and_zmq_until_stopped() -> None:
    from engine.config import EngineConfig
    from engine.server import serve

    engine, stop = FakeEngine(), asyncio.Event()
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    config = EngineConfig(
        server=ServerConfig(port=0, zmq_address="tcp://127.0.0.1:*", served_model_name=MODEL)
    )
    task = asyncio.ensure_future(
        serve(
            config,
            engine=engine,
            stop=stop,
            on_ready=lambda url, addr: ready.set_result((url, addr)),
        )
    )
    url, address = await asyncio.wait_for(ready, 10)
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as r:
        assert (await r.json())["data"][0]["id"] == MODEL
    async with AsyncClient(address, timeout=5) as c:
        assert [o async for o in c.generate("x", max_tokens=2)][-1].finished
    stop.set()
    await asyncio.wait_for(task, 10)
    assert engine.serving  # an engine passed in is the caller's to shut down
