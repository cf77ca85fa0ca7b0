"""Tool calling with the bundled SmolLM2-135M-Instruct, over HTTP with the unmodified
``openai`` package and over the ZeroMQ SDK: a named ``tool_choice`` and ``required``
produce ``tool_calls`` whose arguments parse as JSON and validate against the tool's
``parameters`` schema, streamed (joined from the deltas) and not. ``auto`` leaves the
model free: whatever it writes comes back as content or as valid calls, never an error.

One engine and one server (HTTP + ZeroMQ on 127.0.0.1, free ports) serve the module.
"""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest
import pytest_asyncio

from engine.api import Engine
from engine.client import AsyncClient, join_tool_calls
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from engine.server import build_app, start_http
from engine.server.tools import resolve_parser
from engine.server.zmq_frontend import ZmqFrontend
from tests.integration.engine_utils import assert_pools_whole, wait_all_blocks_free

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

MODEL = "smollm2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {
                "timezone": {"type": "string", "enum": ["UTC", "CET", "JST"]},
                "seconds": {"type": "boolean"},
            },
            "required": ["timezone", "seconds"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MAX_TOKENS = 48  # a forced call of these schemas is about 15 tokens; room to spare


def assert_valid_calls(calls: list[tuple[str, str]]) -> None:
    """(name, arguments) pairs: offered tools, arguments valid for their schemas."""
    assert calls
    for name, arguments in calls:
        assert name in SCHEMAS
        jsonschema_rs.validate(SCHEMAS[name], json.loads(arguments))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served():
    engine = await Engine.create(EngineConfig(
        model=ModelConfig(dtype="float32", quantization="none"),
        cache=CacheConfig(kv_cache_memory=64 * 1024**2),
        scheduler=SchedulerConfig(measure_profile=False),
    ))
    runner, port = await start_http(
        build_app(engine, ServerConfig(port=0), MODEL), "127.0.0.1", 0
    )
    front = ZmqFrontend(engine, "tcp://127.0.0.1:*", MODEL)
    await front.start()
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120
    )
    try:
        yield client, front.address, engine
    finally:
        await client.close()
        await front.stop()
        await runner.cleanup()
        assert_pools_whole(await wait_all_blocks_free(engine))
        await engine.shutdown()


async def collect_stream(client: openai.AsyncOpenAI, **kw) -> tuple[str, list[dict], str]:
    """(content, calls joined from the deltas, finish_reason) of a streamed chat."""
    stream = await client.chat.completions.create(model=MODEL, stream=True, **kw)
    content, calls, reason = "", {}, None
    async for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                calls[d.index]["arguments"] += d.function.arguments
        reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


async def test_bundled_model_gets_the_smollm2_format_in_its_system_message(served):
    *_, engine = served
    assert not engine.tokenizer.supports_tools  # plain ChatML: the server writes the offer
    assert resolve_parser(None, engine.tokenizer).name == "smollm2"


async def test_named_tool_choice_gives_a_valid_call(served):
    client, _, _ = served
    r = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
        max_tokens=MAX_TOKENS, temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert_valid_calls([(call.function.name, call.function.arguments)])


async def test_named_tool_choice_streamed_equals_the_response(served):
    client, _, _ = served
    r = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
        max_tokens=MAX_TOKENS, temperature=0,
    )
    content, calls, reason = await collect_stream(
        client, messages=ASK, tools=TOOLS, tool_choice=NAMED,
        max_tokens=MAX_TOKENS, temperature=0,
    )
    assert content == "" and reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", r.choices[0].message.tool_calls[0].function.arguments)
    ]
    assert_valid_calls([(c["name"], c["arguments"]) for c in calls])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_required_gives_valid_calls_of_offered_tools(served, temperature):
    client, _, _ = served
    r = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=temperature, seed=7,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls: false
    assert_valid_calls([(c.function.name, c.function.arguments) for c in choice.message.tool_calls])


async def test_required_streamed(served):
    client, _, _ = served
    content, calls, reason = await collect_stream(
        client, messages=ASK, tools=TOOLS, tool_choice="required",
        max_tokens=2 * MAX_TOKENS, temperature=0,
    )
    assert content == "" and reason == "tool_calls"
    assert_valid_calls([(c["name"], c["arguments"]) for c in calls])
    assert len({c["id"] for c in calls}) == len(calls)


async def test_auto_is_content_or_valid_calls(served):
    client, _, _ = served
    r = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, max_tokens=16, temperature=0,
    )
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason in ("tool_calls", "length")
        assert_valid_calls([(c.function.name, c.function.arguments) for c in message.tool_calls])
    else:
        assert isinstance(message.content, str) and message.content
        assert r.choices[0].finish_reason in ("stop", "length")


async def test_sdk_named_call(served):
    _, address, _ = served
    async with AsyncClient(address, timeout=120) as c:
        outs = [o async for o in c.generate(
            messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=MAX_TOKENS, temperature=0,
        )]
    assert outs[-1].finish_reason == "tool_calls"
    assert "".join(o.text for o in outs) == ""
    calls = join_tool_calls(outs)
    assert_valid_calls([(c["function"]["name"], c["function"]["arguments"]) for c in calls])


async def test_parameters_that_cannot_be_enforced_are_400_naming_tools(served):
    client, _, _ = served
    bad = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "pattern": "(unclosed"}},
        "required": ["q"]}}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(
                model=MODEL, messages=ASK, tools=[bad], tool_choice="required",
                max_tokens=8, stream=stream,
            )
        assert e.value.body["param"] == "tools", e.value.body
