"""The request side of tool calling (engine/server/tools.py): what is refused and how it is
named, the structured specs that force calls, how tools and tool turns reach a template
without tool support, and how one choice's output becomes content and ``tool_calls``."""

from __future__ import annotations

import json

import pytest

from engine.sampling import InvalidRequestError
from engine.server.openai_api import ApiError, parse_chat, parse_messages
from engine.server.tools import (
    ToolOutput,
    check_message_tool_calls,
    finish_response,
    parse_tool_request,
    plain_messages,
    stream_choices,
)
from engine.tool_parsers import get_parser

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
TIME = {"type": "function", "function": {"name": "get_time"}}
HERMES = get_parser("hermes")


def refused(param: str, **fields) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        parse_tool_request(
            fields.get("tools"), fields.get("tool_choice"), fields.get("parallel_tool_calls")
        )
    assert e.value.param == param, str(e.value)
    return e.value


def with_function(**fn) -> dict:
    return {"type": "function", "function": fn}


# -- validation -----------------------------------------------------------------------------
def test_defaults_auto_and_parallel():
    req = parse_tool_request([WEATHER, TIME])
    assert req.choice == "auto" and req.parallel and req.offered
    assert req.names == {"get_weather", "get_time"}
    assert req.parameters("get_time") == {"type": "object", "properties": {}}


def test_no_tools_means_no_tool_request():
    assert parse_tool_request(None) is None
    assert parse_tool_request([], "none") is None
    assert parse_tool_request(None, "auto", False) is None


@pytest.mark.parametrize(
    ("param", "fields"),
    [
        ("tool_choice", {"tool_choice": "required"}),
        ("tool_choice", {"tools": [WEATHER], "tool_choice": "always"}),
        ("tool_choice.function.name",
         {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}),
        ("tool_choice.type",
         {"tools": [WEATHER], "tool_choice": {"type": "tool", "function": {"name": "get_time"}}}),
        ("tools", {"tools": {"get_weather": {}}}),
        ("tools[0].type", {"tools": [{"type": "retrieval", "function": {"name": "a"}}]}),
        ("tools[1].function.name", {"tools": [WEATHER, with_function(name="has space")]}),
        ("tools[0].function.name", {"tools": [with_function(name="x" * 65)]}),
        ("tools[0].function.name", {"tools": [with_function(name="")]}),
        ("tools[1].function.name", {"tools": [WEATHER, WEATHER]}),
        ("tools[0].function.parameters.type",
         {"tools": [with_function(name="f", parameters={"type": "array"})]}),
        ("tools[0].function.parameters",
         {"tools": [with_function(name="f", parameters="{}")]}),
        ("tools[0].function.parameters.properties",
         {"tools": [with_function(name="f", parameters={"properties": []})]}),
        ("tools[0].function.colour", {"tools": [with_function(name="f", colour="red")]}),
        ("tools[0].function.description", {"tools": [with_function(name="f", description=3)]}),
        ("parallel_tool_calls", {"tools": [WEATHER], "parallel_tool_calls": "yes"}),
    ],
)
def test_bad_tool_fields_are_refused_naming_the_field(param, fields):
    refused(param, **fields)


def test_named_choice_must_name_a_given_tool():
    req = parse_tool_request(
        [WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}
    )
    assert req.choice == "function" and req.function == "get_time"


def test_chat_request_refusals_are_400_with_param():
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    with pytest.raises(ApiError) as e:
        parse_chat(body, "m", 2048)
    assert e.value.status == 400 and e.value.param == "tool_choice.function.name"


def test_assistant_tool_calls_and_tool_results_are_accepted():
    msgs = parse_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ])
    assert msgs[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert msgs[2] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("calls", "param"),
    [
        ("call", "m.tool_calls"),
        ([{"id": "c", "type": "function", "function": {"arguments": "{}"}}],
         "m.tool_calls[0].function.name"),
        ([{"id": "c", "type": "code", "function": {"name": "f"}}], "m.tool_calls[0].type"),
        ([{"id": "c", "function": {"name": "f", "arguments": 3}}],
         "m.tool_calls[0].function.arguments"),
        ([{"id": "c", "function": {"name": "f"}, "extra": 1}], "m.tool_calls[0].extra"),
    ],
)
def test_bad_message_tool_calls_are_refused(calls, param):
    with pytest.raises(InvalidRequestError) as e:
        check_message_tool_calls(calls, "m.tool_calls")
    assert e.value.param == param


# -- constrained decoding -------------------------------------------------------------------
def test_named_function_is_forced_by_its_parameters_schema():
    named = {"type": "function", "function": {"name": "get_weather"}}
    req = parse_tool_request([WEATHER, TIME], named)
    spec = req.structured()
    assert spec["type"] == "json_schema"
    assert spec["schema"] == WEATHER["function"]["parameters"]


def test_required_is_a_non_empty_list_of_any_tool():
    spec = parse_tool_request([WEATHER, TIME], "required").structured()
    schema = spec["schema"]
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    first = schema["items"]["anyOf"][0]
    assert first["properties"]["arguments"] == WEATHER["function"]["parameters"]
    one = parse_tool_request([WEATHER], "required", False).structured()["schema"]
    assert one["maxItems"] == 1 and one["items"]["properties"]["name"]["enum"] == ["get_weather"]


def test_auto_and_none_do_not_constrain():
    assert parse_tool_request([WEATHER]).structured() is None
    req = parse_tool_request([WEATHER], "none")
    assert req.structured() is None and not req.offered


# -- prompt for a template without tool support ---------------------------------------------
def test_offer_is_joined_to_the_system_message():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = plain_messages(msgs, [WEATHER["function"]], HERMES)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in out[0]["content"] and out[1] == msgs[1]


def test_offer_becomes_the_first_message_without_a_system_message():
    out = plain_messages([{"role": "user", "content": "hi"}], [WEATHER["function"]], HERMES)
    assert [m["role"] for m in out] == ["system", "user"]


def test_calls_and_results_are_written_in_the_parsers_format():
    msgs = parse_messages([
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    ])
    out = plain_messages(msgs, [], HERMES)
    assert [m["role"] for m in out] == ["user", "assistant", "user"]  # results merged
    calls = HERMES.parse(out[1]["content"], frozenset({"get_weather", "get_time"})).calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert out[2]["content"] == (
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    )


# -- output ---------------------------------------------------------------------------------
def test_named_output_streams_header_then_arguments():
    req = parse_tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    out = ToolOutput(req, HERMES)
    chunks = []
    for i, piece in enumerate([" ", '{"city"', ': "Oslo"}']):
        chunks += stream_choices(out, 0, piece, "stop" if i == 2 else None, None)
    deltas = [c["delta"] for c in chunks]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[0]["tool_calls"][0]["id"].startswith("call_")
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:-1])
    assert json.loads(args) == {"city": "Oslo"}
    assert chunks[-1]["delta"] == {} and chunks[-1]["finish_reason"] == "tool_calls"
    assert all("content" not in d for d in deltas)


def test_required_output_becomes_calls():
    req = parse_tool_request([WEATHER, TIME], "required")
    body = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant",
        "content": '[{"name": "get_time", "arguments": {}}, '
                   '{"name": "get_weather", "arguments": {"city": "Rome"}}]'}}]}
    finish_response(body, {0: ToolOutput(req, HERMES)})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome"}


def test_auto_output_without_calls_stays_text_and_stop():
    req = parse_tool_request([WEATHER])
    body = {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello there."}}]}
    finish_response(body, {0: ToolOutput(req, HERMES)})
    assert body["choices"][0] == {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Hello there."}}


def test_cut_off_call_keeps_length():
    req = parse_tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    out = ToolOutput(req, HERMES)
    chunks = stream_choices(out, 0, '{"city": "Os', "length", None)
    assert chunks[-1]["finish_reason"] == "length"


# -- a template that takes tools ------------------------------------------------------------
TOOL_TEMPLATE = (
    "{% if tools %}[tools]{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}:{{ c.function.arguments.city }}"
    "{% endfor %}{% if m.tool_call_id %}<id>{{ m.tool_call_id }}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_a_template_that_takes_tools_gets_them_and_the_tool_turns():
    from engine.server.tools import render_prompt
    from engine.tokenizer import Tokenizer
    from tests.unit.test_tokenizer import make_llama_style_tokenizer

    tok = Tokenizer(make_llama_style_tokenizer(TOOL_TEMPLATE), "tool-template")
    plain = Tokenizer(make_llama_style_tokenizer(), "plain-template")
    assert tok.supports_tools and not plain.supports_tools
    msgs = parse_messages([
        {"role": "user", "content": "weather"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])
    text = tok.decode(render_prompt(tok, msgs, parse_tool_request([WEATHER, TIME]), HERMES))
    assert text.startswith("[tools]get_weather;get_time;[user]weather")
    assert "<call>get_weather:Paris" in text and "[tool]sunny<id>c1" in text
    none = parse_tool_request([WEATHER], "none")
    assert "[tools]" not in tok.decode(render_prompt(tok, msgs, none, HERMES))
