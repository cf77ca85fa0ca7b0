"""The HTTP server and the ZeroMQ SDK in front of the REAL engine (worker process, tiny
random Llama, byte-level BPE tokenizer with a ChatML template).

What the fake-engine tests cannot show: that the text, token counts and finish reasons a
client sees over HTTP are exactly what the engine produces offline; that clients hanging
up mid-stream give every KV block back; and that an engine that dies mid-stream reaches
the client as an error instead of a hang.

One engine and one server (HTTP + ZeroMQ on 127.0.0.1, free ports) serve the module; the
tests that stop an engine get their own. Every wait is bounded.

Seeds: a request with ``seed`` samples reproducibly whatever else is in the batch (the
worker draws from a per-request generator), and the server gives choice ``i`` of a
response ``seed + i``. So the same seeded request at temperature 1 returns the same texts,
and choice ``i`` equals a single-choice request (or an offline engine request) with
``seed + i``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from engine.api import Engine
from engine.client import AsyncClient, Client, EngineUnavailable, InvalidRequest
from engine.config import ParallelConfig, ServerConfig
from engine.sampling import SamplingParams
from engine.server import build_app, start_http
from engine.server.metrics import ServerMetrics
from engine.server.zmq_frontend import ZmqFrontend
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

MODEL = "tiny-llama"
MAX_BODY = 64 * 1024  # small, so a 413 needs no multi-megabyte body
PROMPTS = ["Hello, world!", "The capital of France is", "one two three", "def main():"]
CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is the capital of France?"},
]
MAX_TOKENS = 12


# -- fixtures -------------------------------------------------------------------------------
@dataclass
class Served:
    engine: Engine
    base: str  # http://127.0.0.1:<port>
    zmq: str  # the ZeroMQ frontend's bound endpoint
    metrics: ServerMetrics


@contextlib.asynccontextmanager
async def serving(engine: Engine, **server: object) -> AsyncIterator[Served]:
    """HTTP and ZeroMQ frontends on 127.0.0.1 (free ports), sharing one metrics registry,
    as ``engine.server.serve`` wires them."""
    config = ServerConfig(
        host="127.0.0.1", port=0, max_body_bytes=MAX_BODY, **server  # type: ignore[arg-type]
    )
    metrics = ServerMetrics(MODEL)
    runner, port = await start_http(
        build_app(engine, config, MODEL, metrics=metrics), "127.0.0.1", 0
    )
    front = ZmqFrontend(
        engine, "tcp://127.0.0.1:*", MODEL, metrics=metrics, max_message_bytes=MAX_BODY
    )
    await front.start()
    try:
        yield Served(engine, f"http://127.0.0.1:{port}", front.address, metrics)
    finally:
        await front.stop()
        await runner.cleanup()


async def start_engine(path: str) -> Engine:
    # One torch thread: the machine is shared, and a 2-layer model gains nothing from more.
    config = tiny_engine_config(path).replace(parallel=ParallelConfig(torch_threads=1))
    return await Engine.create(config)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path):
    eng = await start_engine(model_path)
    yield eng
    await eng.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine):
    async with serving(engine) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def oai(server):
    """The unmodified ``openai`` package, pointed at the module's server."""
    client = openai.AsyncOpenAI(
        base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=30
    )
    yield client
    await client.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def pools_whole_after_each_test(request):
    yield
    if "engine" in request.fixturenames:  # the module engine; tests that kill theirs skip this
        engine = request.getfixturevalue("engine")
        assert_pools_whole(await wait_all_blocks_free(engine, timeout=20))


# -- helpers --------------------------------------------------------------------------------
@dataclass
class Offline:
    ids: list[int]
    text: str
    reason: str | None
    prompt_ids: list[int]


async def offline(engine: Engine, prompt=None, *, messages=None, **params) -> Offline:
    """The same request straight to the engine (no server in between)."""
    ids: list[int] = []
    text: list[str] = []
    reason = None
    prompt_ids: list[int] = []
    async for out in engine.generate(prompt, SamplingParams(**params), messages=messages):
        prompt_ids = out.prompt_token_ids or prompt_ids
        ids.extend(out.token_ids)
        text.append(out.text)
        reason = out.finish_reason
    return Offline(ids, "".join(text), reason, prompt_ids)


async def tokenize(base: str, **body) -> list[int]:
    async with aiohttp.ClientSession() as s, s.post(base + "/tokenize", json=body) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["tokens"]


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of the rest of an SSE response."""
    lines = (await resp.text()).splitlines()
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def ascii_stop_string(text: str) -> str:
    """A 2-character printable ASCII piece from the second half of ``text``."""
    for k in range(len(text) // 2, len(text) - 1):
        piece = text[k : k + 2]
        if piece.isascii() and piece.isprintable() and piece.strip() == piece:
            return piece
    pytest.skip(f"no usable stop string in {text!r}")


# -- 1 + 2: the openai package; HTTP text equals the engine's ------------------------------
async def test_greedy_completions_equal_the_engine_offline_with_true_usage(server, oai):
    for prompt in PROMPTS:
        want = await offline(server.engine, prompt, max_tokens=MAX_TOKENS, temperature=0)
        r = await oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert r.model == MODEL and r.object == "text_completion"
        assert r.choices[0].text == want.text, prompt
        assert r.choices[0].finish_reason == want.reason
        assert r.usage.completion_tokens == len(want.ids)
        assert r.usage.prompt_tokens == len(want.prompt_ids)
        assert want.prompt_ids == await tokenize(server.base, prompt=prompt)
        assert r.usage.total_tokens == len(want.prompt_ids) + len(want.ids)

        stream = await oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.reason
        assert chunks[-1].choices == []
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
            len(want.prompt_ids), len(want.ids),
        )


async def test_greedy_chat_equals_engine_generate_with_messages(server, oai):
    want = await offline(server.engine, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert want.prompt_ids == await tokenize(server.base, messages=CHAT)
    r = await oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        len(want.prompt_ids), len(want.ids),
    )

    stream = await oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.reason
    assert chunks[-1].usage.completion_tokens == len(want.ids)


async def test_seeded_n_choices_are_reproducible_and_match_seed_plus_index(server, oai):
    prompt, n, seed, m = PROMPTS[1], 3, 1234, 8
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": m, "temperature": 1.0, "seed": seed,
          "extra_body": {"ignore_eos": True}}
    first = await oai.completions.create(n=n, **kw)
    again = await oai.completions.create(n=n, **kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == list(range(n))
    assert len(set(texts)) > 1  # seed + index: the choices are not copies of each other
    prompt_len = len(await tokenize(server.base, prompt=prompt))
    assert first.usage.prompt_tokens == prompt_len  # counted once for all n choices
    assert first.usage.completion_tokens == n * m  # ignore_eos: exactly m tokens each
    for i in range(n):
        alone = await offline(server.engine, prompt, max_tokens=m, temperature=1.0,
                              seed=seed + i, ignore_eos=True)
        assert texts[i] == alone.text and len(alone.ids) == m

    chat = await oai.chat.completions.create(
        model=MODEL, messages=CHAT, n=2, max_completion_tokens=m, temperature=1.0, seed=seed
    )
    for c in chat.choices:
        alone = await offline(server.engine, messages=CHAT, max_tokens=m, temperature=1.0,
                              seed=seed + c.index)
        assert c.message.content == alone.text


async def test_stop_string_cuts_the_text_and_finishes_with_stop(server, oai):
    prompt = PROMPTS[2]
    full = await offline(server.engine, prompt, max_tokens=16, temperature=0, ignore_eos=True)
    stop = ascii_stop_string(full.text)
    cut = full.text[: full.text.index(stop)]
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "stop": [stop],
          "extra_body": {"ignore_eos": True}}
    r = await oai.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens <= len(full.ids)
    chunks = [c async for c in await oai.completions.create(stream=True, **kw)]
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- 3: clients that hang up mid-stream --------------------------------------------------
async def test_200_streams_closed_early_give_back_every_kv_block(server, oai):
    engine, url = server.engine, server.base + "/v1/completions"
    vocab = engine.model_info["vocab_size"]
    rng = random.Random(200)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))] for _ in range(200)]
    before = _scrape(server.metrics.render().decode())
    gate = asyncio.Semaphore(40)
    opened = 0

    async def open_read_hang_up(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal opened
        # Would run ~200 tokens (seconds each on this machine) if nobody aborted it.
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 200, "ignore_eos": True,
                "temperature": 0, "stream": True}
        async with gate, session.post(url, json=body) as r:
            assert r.status == 200
            seen = 0
            while seen < 1 + i % 2:  # one or two chunks, then leave
                line = await r.content.readline()
                assert line, "stream ended before the client left"
                seen += line.startswith(b"data: ")
            opened += 1
            r.close()  # drops the TCP connection mid-stream

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await asyncio.wait_for(
            asyncio.gather(*(open_read_hang_up(s, i) for i in range(200))), 60
        )
    assert opened == 200
    assert_pools_whole(await wait_all_blocks_free(engine, timeout=20))
    after = _scrape(server.metrics.render().decode())
    # Departed clients' requests are aborted, not counted as finished.
    assert _delta(before, after, "fastserve:request_success_total") == 0

    r = await oai.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


# -- 4: every invalid request gets its 4xx; the server keeps serving ---------------------
INVALID = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b'"a string"', 400, None),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    # Refused by the engine itself: empty, an id past the vocabulary, longer than the context.
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "", "stream": True}, 400, "prompt"),
    ("/v1/completions", {"prompt": [100_000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 300, "stream": True}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400,
     "tools[0].function"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2000}]}, 400,
     "messages"),  # longer than the 256-token context once templated
    ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x" * (MAX_BODY + 1)}, 413, None),
    ("/tokenize", {"prompt": "x", "messages": CHAT}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/nothing-here", {}, 404, None),
]


async def test_each_invalid_request_gets_its_4xx_and_the_server_keeps_serving(server):
    valid = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:

        async def still_serving() -> None:
            async with s.post(server.base + "/v1/completions", json=valid) as ok:
                assert ok.status == 200 and (await ok.json())["usage"]["completion_tokens"] == 1

        for path, body, status, param in INVALID:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with s.post(server.base + path, data=data,
                              headers={"Content-Type": "application/json"}) as r:
                err = (await r.json())["error"]
                assert (r.status, err["param"]) == (status, param), (path, body, err)
                assert err["message"] and err["type"]
            await still_serving()

        async def chunked_oversized():  # no Content-Length: aiohttp must cap the read itself
            for _ in range(MAX_BODY // 1024 + 4):
                yield b" " * 1024

        async with s.post(server.base + "/v1/completions", data=chunked_oversized(),
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        await still_serving()
        async with s.get(server.base + "/v1/completions") as r:
            assert r.status == 405 and "error" in await r.json()
        await still_serving()


async def test_wrong_api_key_is_401_and_the_right_one_serves(server):
    async with serving(server.engine, api_key="sekret") as guarded:
        wrong = openai.AsyncOpenAI(base_url=guarded.base + "/v1", api_key="nope", max_retries=0,
                                   timeout=30)
        right = openai.AsyncOpenAI(base_url=guarded.base + "/v1", api_key="sekret",
                                   max_retries=0, timeout=30)
        try:
            with pytest.raises(openai.AuthenticationError) as e:
                await wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)
            assert e.value.status_code == 401
            r = await right.completions.create(model=MODEL, prompt="x", max_tokens=1)
            assert r.usage.completion_tokens == 1
            async with aiohttp.ClientSession() as s:
                async with s.get(guarded.base + "/metrics") as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["code"] == "invalid_api_key"
                async with s.get(guarded.base + "/health") as resp:
                    assert resp.status == 200
        finally:
            await wrong.close()
            await right.close()


# -- 5: the SDK --------------------------------------------------------------------------
async def test_sdk_streams_the_same_tokens_as_http(server, oai):
    engine, prompt = server.engine, PROMPTS[0]
    want = await offline(engine, prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    http = await oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True},
    )
    async with AsyncClient(server.zmq, timeout=10) as c:
        outs = [o async for o in c.generate(prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            ignore_eos=True)]
        chat_outs = [o async for o in c.generate(messages=CHAT, max_tokens=MAX_TOKENS,
                                                 temperature=0)]
        with pytest.raises(InvalidRequest) as e:  # renders past the context: blame messages
            async for _ in c.generate(messages=[{"role": "user", "content": "x" * 2000}]):
                pass
        assert e.value.param == "messages"

    def sync_sdk() -> list:
        with Client(server.zmq, timeout=10) as sc:
            return list(sc.generate(prompt, max_tokens=MAX_TOKENS, temperature=0,
                                    ignore_eos=True))

    sync_outs = await asyncio.wait_for(asyncio.to_thread(sync_sdk), 30)
    for got in (outs, sync_outs):
        assert [t for o in got for t in o.token_ids] == want.ids
        assert "".join(o.text for o in got) == http.choices[0].text == want.text
        assert got[-1].finished and got[-1].finish_reason == "length"
        assert got[-1].num_output_tokens == http.usage.completion_tokens == MAX_TOKENS
        assert got[0].prompt_token_ids == want.prompt_ids
    # HTTP's logprob tokens are the same ids, shown as text.
    assert http.choices[0].logprobs.tokens == [engine.tokenizer.token_to_text(t) for t in want.ids]

    chat = await oai.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0
    )
    assert "".join(o.text for o in chat_outs) == chat.choices[0].message.content


async def test_engine_shut_down_mid_stream_fails_sdk_and_http_streams_without_hanging(model_path):
    engine = await start_engine(model_path)
    try:
        async with serving(engine) as srv, AsyncClient(srv.zmq, timeout=10) as c:
            async with _open_streams(srv, c) as (sdk_outs, session, resp):
                await engine.shutdown()
                await _assert_streams_fail(sdk_outs, resp)
                async with session.get(srv.base + "/health") as h:
                    assert h.status == 503 and h.headers["Retry-After"] == "1"
                async with session.post(srv.base + "/v1/completions", json={"prompt": "x"}) as r:
                    assert r.status == 503
            assert await asyncio.wait_for(c.health(), 15) is False
    finally:
        await engine.shutdown()


# A backoff long enough that the 503 window is seen, short enough for a quick test.
RESTART_BACKOFF_S = 3.0


@pytest.mark.parametrize("failure", ["sigkill", "hang"])
@pytest.mark.timeout(150)
async def test_worker_killed_or_hung_mid_stream_fails_streams_then_engine_heals(model_path, failure):
    """SIGKILL of the worker, or a worker that stops answering (SIGSTOP: alive, silent,
    caught by the step deadline): every in-flight stream ends with an error (SSE error event
    and [DONE]; the SDK raises) within 5 s of detection, /health turns 503, and the engine's
    supervisor starts a new worker, so /health is 200 again and new requests are served
    within 60 s; /metrics counts the restart."""
    config = tiny_engine_config(model_path).replace(parallel=ParallelConfig(
        torch_threads=1, step_timeout_s=3.0, restart_backoff_s=RESTART_BACKOFF_S))
    engine = await Engine.create(config)
    old_pid = engine.worker_info["pid"]
    try:
        async with serving(engine) as srv, AsyncClient(srv.zmq, timeout=10) as c:
            async with _open_streams(srv, c) as (sdk_outs, session, resp):
                os.kill(old_pid, signal.SIGKILL if failure == "sigkill" else signal.SIGSTOP)
                detect = 0.0 if failure == "sigkill" else 3.0  # the step deadline
                await _assert_streams_fail(sdk_outs, resp, within=5 + detect)
                async with session.get(srv.base + "/health") as h:
                    assert h.status == 503
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while loop.time() < deadline:
                    async with session.get(srv.base + "/health") as h:
                        if h.status == 200:
                            break
                    await asyncio.sleep(0.2)
                else:
                    pytest.fail("the engine did not heal within 60 s")
                body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 4, "ignore_eos": True}
                async with session.post(srv.base + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    assert (await r.json())["usage"]["completion_tokens"] == 4
                async with session.get(srv.base + "/metrics") as r:
                    metrics = _scrape(await r.text())
            assert [o async for o in c.generate(PROMPTS[3], max_tokens=3, ignore_eos=True)][-1].finished
        assert metrics[("fastserve:worker_restarts_total", ())] == 1
        assert engine.num_restarts == 1 and engine.worker_info["pid"] != old_pid
        assert_pools_whole(await wait_all_blocks_free(engine))
    finally:
        await engine.shutdown()
    # The old worker was reaped: killed outright, or killed when it missed its deadline.
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)


@contextlib.asynccontextmanager
async def _open_streams(
    srv: Served, c: AsyncClient
) -> AsyncIterator[tuple[AsyncIterator, aiohttp.ClientSession, aiohttp.ClientResponse]]:
    """A long SDK stream and a long HTTP stream, each past its first token."""
    sdk_outs = c.generate(PROMPTS[0], max_tokens=240, temperature=0, ignore_eos=True)
    assert not (await asyncio.wait_for(sdk_outs.__anext__(), 10)).finished
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 240, "ignore_eos": True, "stream": True}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.post(srv.base + "/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        yield sdk_outs, session, resp


async def _assert_streams_fail(sdk_outs: AsyncIterator, resp: aiohttp.ClientResponse,
                               within: float = 15) -> None:
    async def drain() -> None:
        async for _ in sdk_outs:
            pass

    with pytest.raises(EngineUnavailable):
        await asyncio.wait_for(drain(), within)
    events = await asyncio.wait_for(sse_events(resp), within)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "engine_unavailable", err


# -- 6: /metrics ---------------------------------------------------------------------------
def _scrape(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    if not labels:  # summed over every label set
        return sum(v for (n, _), v in after.items() if n == name) - sum(
            v for (n, _), v in before.items() if n == name
        )
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_parse_and_count_real_requests(server, oai):
    prompt = PROMPTS[3]
    greedy = await offline(server.engine, prompt, max_tokens=8, temperature=0, ignore_eos=True)
    stop_at = greedy.ids[2]
    stopped = greedy.ids[: greedy.ids.index(stop_at) + 1]
    async with aiohttp.ClientSession() as s:
        async with s.get(server.base + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            before = _scrape(await r.text())
        await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=2,
                                     temperature=0, extra_body={"ignore_eos": True})
        r = await oai.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True, "stop_token_ids": [stop_at]},
        )
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == len(stopped)
        async with s.get(server.base + "/metrics") as r:
            after = _scrape(await r.text())

    def d(name: str, **labels: str) -> float:
        return _delta(before, after, "fastserve:" + name, **labels)

    assert d("request_success_total", finished_reason="length") == 2
    assert d("request_success_total", finished_reason="stop") == 1
    assert d("request_success_total", finished_reason="abort") == 0
    assert d("prompt_tokens_total") == 3 * len(greedy.prompt_ids)  # once per engine request
    assert d("generation_tokens_total") == 4 + 4 + len(stopped)
    assert d("e2e_request_latency_seconds_count") == 3
    assert d("time_to_first_token_seconds_count") == 3
    # One gap per token after a request's first output (which may hold several tokens when
    # a character spans them).
    assert 0 < d("inter_token_latency_seconds_count") <= d("generation_tokens_total") - 3
    assert d("e2e_request_latency_seconds_sum") > 0
    assert after[("fastserve:engine_serving", ())] == 1
    assert after[("fastserve:num_requests_running", ())] == 0
    assert after[("fastserve:kv_cache_usage_perc", ())] == 0
