"""The OpenAI-compatible HTTP server against a fake engine, spoken to by the unmodified
``openai`` package and by raw aiohttp (for malformed bodies, disconnects, SSE details).

Everything runs on 127.0.0.1 with a free port, in-process, bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import ServerConfig
from engine.sampling import SamplingParams
from engine.server import build_app, start_http
from engine.server.testing import FakeEngine

pytestmark = pytest.mark.timeout(60)

MODEL = "fake-model"
CHAT = [{"role": "user", "content": "Say something."}]
JSON = {"Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def running(
    engine: FakeEngine | None = None, **server: object
) -> AsyncIterator[tuple[FakeEngine, str]]:
    engine = engine or FakeEngine()
    config = ServerConfig(host="127.0.0.1", port=0, **server)  # type: ignore[arg-type]
    runner, port = await start_http(build_app(engine, config, MODEL), "127.0.0.1", 0)
    try:
        yield engine, f"http://127.0.0.1:{port}"
    finally:
        while _clients:
            await _clients.pop().close()
        await runner.cleanup()


_clients: list[openai.AsyncOpenAI] = []


def oai(base: str, key: str = "unused") -> openai.AsyncOpenAI:
    """The unmodified openai package; closed when the server of the test stops."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=10)
    _clients.append(client)
    return client


async def wait_for(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def expected(engine: FakeEngine, prompt, max_tokens: int, **params) -> tuple[str, str, int]:
    ids = engine.prompt_ids(
        prompt if isinstance(prompt, (str, list)) else None,
        prompt if isinstance(prompt, tuple) else None,
    )
    _, text, reason = engine.expected(ids, SamplingParams(max_tokens=max_tokens, **params))
    return text, reason, len(ids)


async def test_completion_returns_the_engine_text_with_usage() -> None:
    async with running() as (engine, base):
        r = await oai(base).completions.create(
            model=MODEL, prompt="Hello", max_tokens=5, temperature=0
        )
    text, reason, n_prompt = expected(engine, "Hello", 5)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt,
        5,
        n_prompt + 5,
    )


async def test_completion_stream_ends_with_usage_then_done() -> None:
    async with running() as (engine, base):
        stream = await oai(base).completions.create(
            model=MODEL,
            prompt="Hello",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text, _, n_prompt = expected(engine, "Hello", 6)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == n_prompt
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_completion_uses_the_chat_template() -> None:
    async with running() as (engine, base):
        r = await oai(base).chat.completions.create(
            model=MODEL, messages=CHAT, max_completion_tokens=4
        )
    text, _, n_prompt = expected(engine, tuple(CHAT), 4)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 4
    assert engine.requests[0]["messages"] == CHAT


async def test_chat_stream_starts_with_the_assistant_role() -> None:
    async with running() as (engine, base):
        stream = await oai(base).chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=5, stream=True
        )
        chunks = [c async for c in stream]
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == expected(engine, tuple(CHAT), 5)[0]
    )
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_n_fans_out_with_seed_plus_index_and_counts_the_prompt_once() -> None:
    async with running() as (engine, base):
        r = await oai(base).completions.create(model=MODEL, prompt="abc", max_tokens=3, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [
        expected(engine, "abc", 3, seed=7 + i)[0] for i in range(3)
    ]
    assert len({c.text for c in r.choices}) == 3
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 9
    assert sorted(q["id"] for q in engine.requests) == [f"{r.id}-{i}" for i in range(3)]


async def test_several_prompts_and_token_id_prompts_are_indexed_prompt_major() -> None:
    async with running() as (engine, base):
        r = await oai(base).completions.create(
            model=MODEL, prompt=[[104, 105], [120]], max_tokens=2, n=2
        )
        s = await oai(base).completions.create(
            model=MODEL, prompt=["hi", "x"], max_tokens=2, stream=True
        )
        streamed = {}
        async for c in s:
            for ch in c.choices:
                streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [
        expected(engine, p, 2)[0] for p in ([104, 105],) * 2 + ([120],) * 2
    ]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 8
    assert streamed == {0: expected(engine, "hi", 2)[0], 1: expected(engine, "x", 2)[0]}


async def test_stop_string_cuts_the_text_and_finishes_with_stop() -> None:
    async with running() as (engine, base):
        full, _, _ = expected(engine, "Hello", 10)
        stop = full[3:5]
        r = await oai(base).completions.create(
            model=MODEL, prompt="Hello", max_tokens=10, stop=stop
        )
        c = await oai(base).chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=10,
            stop=[expected(engine, tuple(CHAT), 10)[0][2]],
        )
    assert r.choices[0].text == full[:3] and r.choices[0].finish_reason == "stop"
    assert len(c.choices[0].message.content) == 2 and c.choices[0].finish_reason == "stop"
    assert engine.requests[0]["params"].stop == (stop,)


async def test_logprobs_in_completions_and_chat_shapes() -> None:
    async with running() as (_, base):
        r = await oai(base).completions.create(model=MODEL, prompt="Hi", max_tokens=3, logprobs=2)
        c = await oai(base).chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=1
        )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.token_logprobs == [-0.5] * 3
    assert lp.text_offset == [0, 1, 2] and all(len(t) == 2 for t in lp.top_logprobs)
    content = c.choices[0].logprobs.content
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert all(len(t.top_logprobs) == 1 for t in content)


async def test_echo_with_logprobs_puts_the_prompts_tokens_first() -> None:
    async with running() as (engine, base):
        kw = {"model": MODEL, "prompt": "Hey", "max_tokens": 2, "echo": True, "logprobs": 1}
        r = await oai(base).completions.create(**kw)
        chunks = [ch async for ch in await oai(base).completions.create(stream=True, **kw)]
    assert engine.requests[0]["params"].prompt_logprobs == 1  # the prompt is scored
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith("Hey") and "".join(lp.tokens) == c.text
    # The fake scores prompt position p as -1/p and every sampled token as -0.5.
    assert lp.token_logprobs == [None, -1.0, -0.5, -0.5, -0.5]
    assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [0, 1, 2, 3, 4]
    first = chunks[0].choices[0]
    assert first.text == c.text[:4] and first.logprobs.tokens == lp.tokens[:4]
    parts = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    assert [x for part in parts for x in part.token_logprobs] == lp.token_logprobs


async def test_each_invalid_request_gets_its_4xx_and_the_server_keeps_serving() -> None:
    cases = [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
        (
            "/v1/completions",
            {"prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
        ),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),  # refused by the engine
        ("/v1/completions", {"prompt": "x" * 5000}, 400, "prompt"),  # longer than the context
        ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "max_completion_tokens": 0},
            400,
            "max_completion_tokens",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": 3}, 400, "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "tools": [{"type": "function"}]},
            400,
            "tools[0].function",
        ),
        ("/v1/completions", {"prompt": "x" * 10_000}, 413, None),
        ("/tokenize", {"prompt": "x", "messages": CHAT}, 400, "prompt"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/v1/nothing-here", {}, 404, None),
    ]
    async with running(max_body_bytes=8192) as (_, base), aiohttp.ClientSession() as s:
        for path, body, status, param in cases:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with s.post(base + path, data=data, headers=JSON) as r:
                err = (await r.json())["error"]
                assert (r.status, err["param"]) == (status, param), (path, body, err)
                assert err["message"] and err["type"]
        async with s.get(base + "/v1/completions") as r:
            assert r.status == 405 and "error" in await r.json()
        r = await oai(base).completions.create(model=MODEL, prompt="still fine", max_tokens=2)
        assert r.choices[0].finish_reason == "length"


async def test_full_queue_is_503_with_retry_after_and_dead_engine_fails_health() -> None:
    async with running() as (engine, base), aiohttp.ClientSession() as s:
        engine.queue_full = True
        for stream in (False, True):
            async with s.post(
                base + "/v1/completions", json={"prompt": "x", "stream": stream}
            ) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["code"] == "queue_full"
        engine.queue_full = False
        engine.serving = False
        async with s.get(base + "/health") as r:
            assert r.status == 503
        with pytest.raises(openai.APIStatusError) as e:
            await oai(base).completions.create(model=MODEL, prompt="x")
        assert e.value.status_code == 503
        engine.serving = True
        async with s.get(base + "/health") as r:
            assert r.status == 200


async def test_failure_after_streaming_began_is_an_sse_error_then_done() -> None:
    engine = FakeEngine()
    engine.fail_after_tokens = 2
    async with running(engine) as (_, base), aiohttp.ClientSession() as s:
        async with s.post(
            base + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True}
        ) as r:
            assert r.status == 200
            events = [e for e in (await r.text()).split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2].removeprefix("data: "))["error"]
        assert err["code"] == "engine_unavailable" and "worker died" in err["message"]
        assert len(events) == 4  # two tokens, the error, [DONE]
        engine.serving, engine.fail_after_tokens = True, 1
        with pytest.raises(openai.APIError):
            async for _ in await oai(base).completions.create(
                model=MODEL, prompt="x", max_tokens=5, stream=True
            ):
                pass


async def test_client_disconnect_mid_stream_aborts_the_engine_request() -> None:
    engine = FakeEngine(token_delay_s=0.02)
    async with running(engine) as (_, base):
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "x", "max_tokens": 4_000, "stream": True}
            async with s.post(base + "/v1/completions", json=body) as r:
                assert (await r.content.readline()).startswith(b"data: ")
        # the session is closed: the server must notice and close the engine generator
        await wait_for(lambda: len(engine.aborted) == 1 and not engine.live)
        assert engine.finished == []


async def test_client_disconnect_while_waiting_aborts_a_non_streaming_request() -> None:
    engine = FakeEngine(first_token_delay_s=30)
    async with running(engine) as (_, base):

        async def call() -> None:
            async with aiohttp.ClientSession() as s:
                await s.post(base + "/v1/completions", json={"prompt": "x", "n": 2})

        task = asyncio.ensure_future(call())
        await wait_for(lambda: len(engine.live) == 2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_for(lambda: len(engine.aborted) == 2 and not engine.live)


async def test_metrics_parse_and_counters_move() -> None:
    def scrape_values(text: str) -> dict[tuple, float]:
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[
                    (
                        s.name,
                        tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")),
                    )
                ] = s.value
        return out

    async with running() as (engine, base), aiohttp.ClientSession() as s:
        async with s.get(base + "/metrics") as r:
            before = scrape_values(await r.text())
        await oai(base).completions.create(model=MODEL, prompt="abc", max_tokens=4, n=2)
        stop = expected(engine, "abc", 4)[0][1]
        await oai(base).completions.create(model=MODEL, prompt="abc", max_tokens=4, stop=stop)
        async with s.get(base + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            after = scrape_values(await r.text())

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("fastserve:request_success_total", finished_reason="length") == 2
    assert delta("fastserve:request_success_total", finished_reason="stop") == 1
    assert delta("fastserve:generation_tokens_total") == 4 + 4 + 2
    assert delta("fastserve:prompt_tokens_total") == 9
    assert delta("fastserve:time_to_first_token_seconds_count") == 3
    assert delta("fastserve:e2e_request_latency_seconds_count") == 3
    assert delta("fastserve:inter_token_latency_seconds_count") == 3 + 3 + 1
    assert delta("fastserve:request_queue_time_seconds_count") == 3
    assert delta("fastserve:num_preemptions_total") == 3  # the fake counts one per finished request
    assert delta("fastserve:swap_out_bytes_total") == 3 * 4096
    assert delta("fastserve:demotions_total") == 0 + 0 + 0
    assert after[("fastserve:num_requests_running", ())] == 0
    assert after[("fastserve:engine_serving", ())] == 1


async def test_api_key_guards_every_route_but_health() -> None:
    async with running(api_key="sekret") as (_, base), aiohttp.ClientSession() as s:
        with pytest.raises(openai.AuthenticationError):
            await oai(base, "wrong").completions.create(model=MODEL, prompt="x")
        r = await oai(base, "sekret").completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert len(r.choices) == 1
        for path in ("/metrics", "/v1/models", "/version", "/v1/scheduler"):
            async with s.get(base + path) as resp:
                assert (
                    resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
                )
        async with s.get(base + "/health") as resp:
            assert resp.status == 200
        models = await oai(base, "sekret").models.list()
        assert [m.id for m in models.data] == [MODEL]


async def test_info_routes_and_scheduler_view() -> None:
    engine = FakeEngine(token_delay_s=0.05)
    async with running(engine) as (_, base), aiohttp.ClientSession() as s:
        async with s.post(
            base + "/tokenize", json={"prompt": "hi", "return_token_strs": True}
        ) as r:
            assert await r.json() == {
                "count": 2,
                "max_model_len": 4096,
                "tokens": [104, 105],
                "token_strs": ["h", "i"],
            }
        async with s.post(base + "/tokenize", json={"messages": CHAT}) as r:
            assert (await r.json())["tokens"] == engine.prompt_ids(None, CHAT)
        async with s.post(base + "/detokenize", json={"tokens": [104, 105]}) as r:
            assert await r.json() == {"prompt": "hi"}
        async with s.get(base + "/version") as r:
            assert "version" in await r.json()
        task = asyncio.ensure_future(
            oai(base).completions.create(model=MODEL, prompt="x", max_tokens=50)
        )
        await wait_for(lambda: engine.live)
        async with s.get(base + "/v1/scheduler") as r:
            jobs = (await r.json())["jobs"]
        assert len(jobs) == 1
        assert {
            "id",
            "state",
            "queue_level",
            "attained_service_s",
            "residency",
            "waiting_s",
        } <= set(jobs[0])
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
