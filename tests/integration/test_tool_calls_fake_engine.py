"""Tool calling over HTTP (the unmodified ``openai`` package) and the ZeroMQ SDK, against a
fake engine whose output is scripted, so the server's side is checked exactly: the
prompt the engine is given, the calls read from the text, the stream of deltas, the
refusals (nothing queued).

Everything runs on 127.0.0.1 with free ports, in-process, bounded in time.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import openai
import pytest

from engine.client import AsyncClient, InvalidRequest, join_tool_calls
from engine.config import ServerConfig
from engine.server import build_app, start_http
from engine.server.testing import FakeEngine
from engine.server.zmq_frontend import ZmqFrontend

pytestmark = pytest.mark.timeout(60)

MODEL = "fake-model"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL_TEXT = (
    'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
)


@contextlib.asynccontextmanager
async def running(
    script: str, parser: str = "hermes"
) -> AsyncIterator[tuple[FakeEngine, openai.AsyncOpenAI, str]]:
    engine = FakeEngine()
    engine.script = script
    config = ServerConfig(host="127.0.0.1", port=0, tool_call_parser=parser)
    runner, port = await start_http(build_app(engine, config, MODEL), "127.0.0.1", 0)
    front = ZmqFrontend(engine, "tcp://127.0.0.1:*", MODEL, tool_call_parser=parser)
    await front.start()
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=10
    )
    try:
        yield engine, client, front.address
    finally:
        await client.close()
        await front.stop()
        await runner.cleanup()


def prompt_text(engine: FakeEngine) -> str:
    return engine.tokenizer.decode(engine.requests[-1]["prompt_ids"])


async def test_auto_call_is_parsed_into_tool_calls() -> None:
    async with running(CALL_TEXT) as (engine, client, _):
        r = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=200
        )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The fake template takes no tools: the offer is written into a system message.
    prompt = prompt_text(engine)
    assert prompt.startswith("<|system|>") and '"name": "get_weather"' in prompt
    assert "<tool_call>" in prompt


async def test_auto_call_streams_as_openai_sends_it() -> None:
    async with running(CALL_TEXT) as (_, client, _):
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=200, stream=True
        )
        chunks = [c async for c in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    assert content == "Let me look."
    with_calls = [i for i, d in enumerate(deltas) if d.tool_calls]
    first = deltas[with_calls[0]].tool_calls[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert not any(d.content for d in deltas[with_calls[0]:])  # no text inside the call
    rest = [deltas[i].tool_calls[0] for i in with_calls[1:]]
    assert all(t.id is None and t.function.name is None for t in rest)
    assert json.loads("".join(t.function.arguments for t in rest)) == {"city": "Paris"}
    assert len(rest) > 1  # fragments, as the model writes them
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_text_that_is_not_a_call_stays_content() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>'
    async with running(text) as (_, client, _):
        r = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=200
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=200, stream=True,
            tool_choice="auto",
        )
        chunks = [c async for c in stream]
    assert r.choices[0].message.content == text and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    # Streamed, the call was committed before its arguments broke; the header went out.
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_choice_none_offers_no_tools() -> None:
    async with running(CALL_TEXT) as (engine, client, _):
        r = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=200
        )
    assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls
    assert "get_weather" not in prompt_text(engine)


async def test_parallel_tool_calls_false_keeps_one_call() -> None:
    two = CALL_TEXT + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    async with running(two) as (_, client, _):
        both = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=300
        )
        one = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=300,
            parallel_tool_calls=False,
        )
    assert [c.function.name for c in both.choices[0].message.tool_calls] == [
        "get_weather", "get_time"]
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]


async def test_a_conversation_with_calls_and_results_is_rendered() -> None:
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 C and sunny"},
    ]
    async with running("It is 18 C and sunny.") as (engine, client, _):
        r = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], max_tokens=200
        )
    assert r.choices[0].message.content == "It is 18 C and sunny."
    assert r.choices[0].finish_reason == "stop"
    prompt = prompt_text(engine)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<|user|><tool_response>\n18 C and sunny\n</tool_response>" in prompt


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function",
                     "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters.type"),
    ],
)
async def test_bad_tools_are_400_naming_the_field_and_nothing_is_queued(extra, param) -> None:
    async with running(CALL_TEXT) as (engine, client, _):
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert engine.requests == []


async def test_sdk_gets_tool_call_pieces_and_joins_them() -> None:
    async with running(CALL_TEXT, parser="hermes") as (_, _, address), AsyncClient(
        address, timeout=10
    ) as c:
        outs = [o async for o in c.generate(messages=ASK, tools=[WEATHER], max_tokens=200)]
        with pytest.raises(InvalidRequest) as e:
            async for _ in c.generate(
                messages=ASK, tools=[WEATHER], tool_choice="always", max_tokens=8
            ):
                pass
    assert "".join(o.text for o in outs) == "Let me look."
    assert outs[-1].finish_reason == "tool_calls"
    [call] = join_tool_calls(outs)
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert e.value.param == "tool_choice"


async def test_sdk_refuses_tools_without_messages() -> None:
    async with running(CALL_TEXT) as (engine, _, address), AsyncClient(address, timeout=10) as c:
        with pytest.raises(InvalidRequest) as e:
            async for _ in c.generate("Weather?", tools=[WEATHER], max_tokens=8):
                pass
    assert e.value.param == "tools" and engine.requests == []


async def test_each_choice_is_read_on_its_own() -> None:
    async with running(CALL_TEXT) as (_, client, _):
        r = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=200, n=2
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=200, n=2, stream=True,
            logprobs=True,
        )
        chunks = [c async for c in stream]
    ids = [c.message.tool_calls[0].id for c in r.choices]
    assert len(set(ids)) == 2 and all(c.finish_reason == "tool_calls" for c in r.choices)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[-1].finish_reason == "tool_calls"
        headers = [t for ch in mine for t in ch.delta.tool_calls or [] if t.id]
        assert [t.function.name for t in headers] == ["get_weather"]
        # Every generated token's logprob arrives once, calls or not.
        assert sum(len(ch.logprobs.content) for ch in mine if ch.logprobs) == len(CALL_TEXT)


async def test_named_function_is_forced_by_its_schema_and_becomes_the_call() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    async with running('{"city": "Paris"}') as (engine, client, _):
        r = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=50
        )
    assert engine.requests[-1]["params"].structured == {
        "type": "json_schema", "schema": WEATHER["function"]["parameters"], "strict": True}
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')


async def test_required_streams_the_forced_list_as_calls() -> None:
    script = (
        '[{"name": "get_time", "arguments": {}}, '
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    )
    async with running(script) as (engine, client, _):
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            max_tokens=200, stream=True,
        )
        chunks = [c async for c in stream]
    spec = engine.requests[-1]["params"].structured
    assert spec["schema"]["type"] == "array" and spec["schema"]["minItems"] == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)
    names = [t.function.name for d in deltas for t in d.tool_calls or [] if t.id]
    assert names == ["get_time", "get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_forcing_a_call_and_a_response_format_together_is_refused() -> None:
    async with running("{}") as (engine, client, _):
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(
                model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                response_format={"type": "json_object"}, max_tokens=8,
            )
    assert e.value.body["param"] == "tool_choice" and engine.requests == []


async def test_tokenize_counts_the_prompt_the_chat_route_renders() -> None:
    import aiohttp

    async with running("Fine.") as (engine, client, _):
        await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=8
        )
        base = str(client.base_url).removesuffix("/v1/")
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/tokenize", json={"messages": ASK, "tools": [WEATHER]}) as r:
                with_tools = await r.json()
            async with s.post(base + "/tokenize", json={"messages": ASK}) as r:
                without = await r.json()
            async with s.post(base + "/tokenize", json={"prompt": "x", "tools": [WEATHER]}) as r:
                refused = (r.status, (await r.json())["error"]["param"])
    assert with_tools["tokens"] == engine.requests[-1]["prompt_ids"]
    assert with_tools["count"] > without["count"]
    assert refused == (400, "tools")
