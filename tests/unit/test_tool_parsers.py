"""Tool-call parsers (engine/tool_parsers): whole texts, several calls, malformed output,
and the same texts streamed in pieces (token by token, character by character, random
cuts), which must give exactly the whole-text result."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tool_parsers import (
    CallStream,
    UnknownToolParserError,
    available,
    default_parser_name,
    get_parser,
)

TOOLS = frozenset({"get_weather", "get_time"})
HERMES = get_parser("hermes")
LLAMA = get_parser("llama3_json")
SMOL = get_parser("smollm2")


def stream_pieces(stream: CallStream, pieces: list[str]) -> tuple[str, list[dict], list[dict]]:
    """Feed ``pieces``; returns (content, calls joined from deltas, every call delta)."""
    deltas = []
    content = ""
    for piece in [*pieces, None]:
        d = stream.finish() if piece is None else stream.feed(piece)
        content += d.content
        deltas.extend(c.to_openai() for c in d.calls)
    calls: dict[int, dict] = {}
    for d in deltas:
        if "id" in d:
            assert d["index"] not in calls, "a call's header is sent once"
            assert d["function"]["arguments"] == ""
            calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)], deltas


def whole(parser, text: str, names=TOOLS, max_calls=None):
    out = parser.parse(text, names, max_calls)
    return out.content, [(c.name, json.loads(c.arguments)) for c in out.calls]


# -- hermes ---------------------------------------------------------------------------------
def test_hermes_single_call_has_no_content():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert whole(HERMES, text) == (None, [("get_weather", {"city": "Paris"})])


def test_hermes_several_blocks_with_text_before():
    text = (
        "Let me check. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"
        "</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}"
        "</tool_call>"
    )
    content, calls = whole(HERMES, text)
    assert content == "Let me check."
    assert calls == [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]


def test_call_ids_are_unique_and_look_like_openai():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>' * 3
    ids = [c.id for c in HERMES.parse(text, TOOLS).calls]
    assert len(set(ids)) == 3
    assert all(i.startswith("call_") and len(i) == 29 for i in ids)


def test_arguments_are_the_models_json_text():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris", "n": [1, 2]}}'
    [call] = HERMES.parse(text, TOOLS).calls  # no end tag: the model stopped after the JSON
    assert call.arguments == '{"city":"Paris", "n": [1, 2]}'


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>',  # bad JSON
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',  # not offered
        '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',  # no name
        "<tool_call>get_weather(city='Paris')</tool_call>",  # not JSON at all
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # not an object
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}} trailing',
    ],
)
def test_malformed_calls_are_plain_content(text):
    assert whole(HERMES, text) == (text, [])


def test_call_cut_off_mid_arguments_gives_back_the_whole_text():
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Par'
    assert whole(HERMES, text) == (text, [])
    s = HERMES.stream(TOOLS)
    content, calls, _ = stream_pieces(s, [text])
    assert s.broken  # a stream cannot take back the header it sent
    assert content == "Sure." and calls[0]["name"] == "get_weather"


def test_arguments_given_as_a_json_string_or_before_the_name():
    text = (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'
        '<tool_call>{"arguments": {"tz": "UTC"}, "name": "get_time"}</tool_call>'
    )
    want = [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "UTC"})]
    assert whole(HERMES, text) == (None, want)


def test_call_without_arguments_gets_an_empty_object():
    text = '<tool_call>{"name": "get_time"}</tool_call>'
    assert whole(HERMES, text) == (None, [("get_time", {})])


def test_text_without_calls_is_kept_exactly():
    for text in ["", "Hello!\n\n", "  spaced  ", "a < b and <tool", "<tool_c", "{not json}"]:
        assert whole(HERMES, text) == (text, [])


def test_parallel_off_keeps_the_first_call():
    text = (
        '<tool_call>{"name": "get_time", "arguments": {"tz": "A"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {"tz": "B"}}</tool_call>'
    )
    assert whole(HERMES, text, max_calls=1) == (None, [("get_time", {"tz": "A"})])


# -- smollm2 --------------------------------------------------------------------------------
def test_smollm2_list_of_calls_in_one_block():
    text = (
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}},\n'
        '{"name": "get_time", "arguments": {"tz": "CET"}}\n]</tool_call>'
    )
    assert whole(SMOL, text) == (
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    )


def test_smollm2_empty_list_means_no_call():
    content, calls = whole(SMOL, "<tool_call>[]</tool_call>")
    assert calls == [] and content == ""
    assert whole(SMOL, "I cannot help. <tool_call>[]</tool_call>") == ("I cannot help.", [])


def test_smollm2_broken_list_is_content():
    text = '<tool_call>[{"name": "get_time", "arguments": {}} {"name": "x"}]</tool_call>'
    assert whole(SMOL, text) == (text, [])


# -- llama3_json ----------------------------------------------------------------------------
def test_llama3_bare_object_with_parameters():
    text = '{"name": "get_weather", "parameters": {"city": "Lima"}}'
    assert whole(LLAMA, text) == (None, [("get_weather", {"city": "Lima"})])


def test_llama3_python_tag_and_semicolons():
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; '
        '{"name": "get_time", "parameters": {"tz": "PET"}}'
    )
    assert whole(LLAMA, text) == (
        None,
        [("get_weather", {"city": "Lima"}), ("get_time", {"tz": "PET"})],
    )


def test_llama3_json_later_in_an_answer_is_content():
    text = 'The call would be {"name": "get_time", "parameters": {}}'
    assert whole(LLAMA, text) == (text, [])


def test_llama3_object_that_is_not_a_call_is_content():
    assert whole(LLAMA, '{"answer": 42}') == ('{"answer": 42}', [])


# -- streaming ------------------------------------------------------------------------------
CASES = [
    (HERMES, ('Checking the weather for you.\n<tool_call>\n{"name": "get_weather", '
              '"arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n<tool_call>\n'
              '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>')),
    (SMOL, ('One moment. <tool_call>[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
            '{"name": "get_time", "arguments": {"tz": "CET"}}]</tool_call>')),
    (LLAMA, ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima", '
             '"note": "a \\"quoted\\" }"}}; {"name": "get_time", "parameters": {}}')),
    (HERMES, 'No tools needed: 2 < 3 and <b>bold</b>.\n'),
    (HERMES, '<tool_call>{"name": "nope", "arguments": {}}</tool_call> then text'),
]


def _tokens(text: str) -> list[str]:
    """Pieces the way a BPE detokenizer hands them out: words with their leading space,
    punctuation alone."""
    out, cur = [], ""
    for ch in text:
        if ch.isalnum() and cur and cur[-1].isalnum():
            cur += ch
        else:
            if cur:
                out.append(cur)
            cur = ch
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_streamed_token_by_token_equals_the_whole_text(case):
    parser, text = CASES[case]
    want = parser.parse(text, TOOLS)
    for pieces in (_tokens(text), list(text), [text]):
        content, calls, _ = stream_pieces(parser.stream(TOOLS), pieces)
        assert content == (want.content or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.name, c.arguments) for c in want.calls
        ]


def test_stream_sends_text_before_the_call_then_header_then_argument_fragments():
    _, text = CASES[0]
    s = HERMES.stream(TOOLS)
    events = []
    for piece in _tokens(text):
        d = s.feed(piece)
        if d.content:
            events.append(("content", d.content))
        events.extend(("call", c.to_openai()) for c in d.calls)
    d = s.finish()
    events.extend(("call", c.to_openai()) for c in d.calls)
    kinds = [k for k, _ in events]
    assert kinds[0] == "content"
    assert "".join(v for k, v in events if k == "content") == "Checking the weather for you."
    assert all(k == "call" for k in kinds[kinds.index("call"):])  # no content inside calls
    first = events[kinds.index("call")][1]
    assert first["index"] == 0 and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [v for k, v in events if k == "call" and "id" not in v and v["index"] == 0]
    assert len(fragments) > 3  # the arguments arrive as the model writes them
    assert json.loads("".join(f["function"]["arguments"] for f in fragments)) == {
        "city": "Paris", "days": 3}


@settings(max_examples=60, deadline=None)
@given(case=st.integers(0, len(CASES) - 1), cuts=st.lists(st.integers(0, 400), max_size=30))
def test_any_split_streams_like_the_whole_text(case, cuts):
    parser, text = CASES[case]
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    want = parser.parse(text, TOOLS)
    content, calls, _ = stream_pieces(parser.stream(TOOLS), pieces)
    assert content == (want.content or "")
    assert [c["arguments"] for c in calls] == [c.arguments for c in want.calls]


# -- prompt side ----------------------------------------------------------------------------
@pytest.mark.parametrize("parser", [HERMES, SMOL, LLAMA], ids=lambda p: p.name)
def test_rendered_calls_parse_back(parser):
    calls = [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"name": "get_time", "arguments": {"tz": "UTC"}},
    ]
    got = parser.parse(parser.render_calls(calls), TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("parser", [HERMES, SMOL, LLAMA], ids=lambda p: p.name)
def test_system_prompt_lists_every_function(parser):
    functions = [
        {"name": "get_weather", "description": "Weather now",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    ]
    text = parser.system_prompt(functions)
    for f in functions:
        assert json.dumps(f) in text


# -- registry -------------------------------------------------------------------------------
def test_registry_names_and_unknown_parser():
    assert {"hermes", "llama3_json", "smollm2"} <= set(available())
    with pytest.raises(UnknownToolParserError, match="hermes"):
        get_parser("nonesuch")


def test_default_parser_follows_the_model_family():
    chatml = "{% for message in messages %}<|im_start|>...{% endfor %}"
    assert default_parser_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf", chatml) == "smollm2"
    assert default_parser_name("/m/llama", "<|start_header_id|>{{ tools }}") == "llama3_json"
    assert default_parser_name("/m/qwen2.5", chatml) == "hermes"


PIECES = ['<tool_call>', '</tool_call>', '<|python_tag|>', '{', '}', '[', ']', '"name"',
          '"arguments"', '"parameters"', '"get_time"', '"nope"', ':', ',', ';', ' ', '\n',
          '"x"', '1', 'null', '"', '\\', 'text', '<', '"{}"']


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from(PIECES), max_size=40),
       parser=st.sampled_from([HERMES, SMOL, LLAMA]))
def test_any_text_parses_without_error_and_streams_like_the_whole(tokens, parser):
    text = "".join(tokens)
    want = parser.parse(text, TOOLS)  # never raises, whatever the model wrote
    if not re.search(r"\[\s*\]", text):  # (an empty list of calls is consumed: "no call")
        assert want.calls or want.content == text  # no calls: the text comes back untouched
    stream = parser.stream(TOOLS)
    content, calls, _ = stream_pieces(stream, tokens)
    if not stream.broken:
        assert content == (want.content or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.name, c.arguments) for c in want.calls]
    for c in want.calls:
        assert isinstance(json.loads(c.arguments), dict)


def test_arguments_nested_deeper_than_json_reads_are_content():
    text = '<tool_call>{"name": "get_time", "arguments": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
    assert whole(HERMES, text) == (text, [])
