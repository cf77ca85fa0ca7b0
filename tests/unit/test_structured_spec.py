"""The ``structured`` spec: its shapes, and how OpenAI's ``response_format`` and vLLM's
``guided_*`` fields map onto it on the HTTP routes and the ZeroMQ protocol (no engine)."""

from __future__ import annotations

import pytest

from engine.sampling import InvalidRequestError, SamplingParams
from engine.server.openai_api import ApiError, parse_chat, parse_completion
from engine.server.zmq_frontend import _params
from engine.structured.spec import spec_from_openai, spec_key, validate_spec

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("spec", [
    {"type": "json_object"},
    {"type": "json_schema", "schema": SCHEMA, "strict": True},
    {"type": "json_schema", "schema": {}},
    {"type": "regex", "pattern": r"\d+"},
    {"type": "choice", "choices": ["yes", "no"]},
    {"type": "grammar", "grammar": 'root ::= "a"'},
])
def test_every_interface_shape_is_accepted(spec):
    validate_spec(spec)
    assert SamplingParams(structured=spec).structured == spec


@pytest.mark.parametrize("spec,fragment", [
    ("json", "must be an object"),
    ({"type": "xml"}, "type must be one of"),
    ({"type": "json_schema"}, "needs 'schema'"),
    ({"type": "json_schema", "schema": []}, "schema must be a JSON schema object"),
    ({"type": "json_schema", "schema": {}, "strict": "yes"}, "strict must be a boolean"),
    ({"type": "regex", "pattern": ""}, "non-empty"),
    ({"type": "regex", "pattern": "a", "flags": "i"}, "unknown key 'flags'"),
    ({"type": "choice", "choices": []}, "non-empty array"),
    ({"type": "choice", "choices": ["a", 1]}, "non-empty strings"),
    ({"type": "choice", "choices": ["x"] * 1025}, "at most 1024"),
    ({"type": "grammar", "grammar": "  "}, "non-empty string"),
])
def test_malformed_specs_are_refused_naming_structured(spec, fragment):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured=spec)
    assert e.value.param == "structured"
    assert fragment in str(e.value)


def test_spec_key_is_canonical():
    a = {"type": "json_schema", "schema": {"b": 1, "a": 2}, "strict": False}
    b = {"strict": False, "schema": {"a": 2, "b": 1}, "type": "json_schema"}
    assert spec_key(a) == spec_key(b)
    assert spec_key(a) != spec_key({**a, "strict": True})


# -- OpenAI / vLLM fields -> spec --------------------------------------------------------------
@pytest.mark.parametrize("fields,spec,field", [
    ({}, None, None),
    ({"response_format": {"type": "text"}}, None, None),
    ({"response_format": {"type": "json_object"}}, {"type": "json_object"}, "response_format"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}},
     {"type": "json_schema", "schema": SCHEMA, "strict": True}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}},
     {"type": "json_schema", "schema": SCHEMA, "strict": False}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t"}}},
     {"type": "json_object"}, "response_format"),
    ({"guided_json": SCHEMA}, {"type": "json_schema", "schema": SCHEMA, "strict": True},
     "guided_json"),
    ({"guided_json": '{"type": "object"}'},
     {"type": "json_schema", "schema": {"type": "object"}, "strict": True}, "guided_json"),
    ({"guided_regex": "[a-z]+"}, {"type": "regex", "pattern": "[a-z]+"}, "guided_regex"),
    ({"guided_choice": ["a", "b"]}, {"type": "choice", "choices": ["a", "b"]}, "guided_choice"),
    ({"guided_grammar": 'root ::= "x"'}, {"type": "grammar", "grammar": 'root ::= "x"'},
     "guided_grammar"),
    ({"structured_outputs": {"json": SCHEMA}},
     {"type": "json_schema", "schema": SCHEMA, "strict": True}, "structured_outputs"),
    ({"structured_outputs": {"regex": "b+", "choice": None}}, {"type": "regex", "pattern": "b+"},
     "structured_outputs"),
    ({"structured_outputs": {"choice": ["x"]}}, {"type": "choice", "choices": ["x"]},
     "structured_outputs"),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}},
     {"type": "grammar", "grammar": 'root ::= "x"'}, "structured_outputs"),
    ({"structured_outputs": {"json_object": True}}, {"type": "json_object"},
     "structured_outputs"),
    # text is "no constraint", so it may accompany a guided_* field
    ({"response_format": {"type": "text"}, "guided_regex": "a"},
     {"type": "regex", "pattern": "a"}, "guided_regex"),
])
def test_openai_fields_map_to_the_spec(fields, spec, field):
    assert spec_from_openai(fields) == (spec, field)


@pytest.mark.parametrize("fields,param", [
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "a", "schema": {}, "strict": 1}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": [1]}, "guided_json"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_grammar": " "}, "guided_grammar"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ({"structured_outputs": {"json_object": 1}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml"),
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "structured_outputs"),
])
def test_bad_openai_fields_are_refused_naming_the_field(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        spec_from_openai(fields)
    assert e.value.param == param
    assert str(e.value).startswith(param)


def test_http_routes_carry_the_spec_and_its_field():
    chat = parse_chat({"messages": CHAT, "response_format": {"type": "json_object"}}, "m", 64)
    assert chat.choices[0].params.structured == {"type": "json_object"}
    assert chat.structured_field == "response_format"
    comp = parse_completion({"prompt": "x", "guided_choice": ["a", "b"], "n": 2}, "m")
    assert [c.params.structured for c in comp.choices] == [
        {"type": "choice", "choices": ["a", "b"]}] * 2
    assert comp.structured_field == "guided_choice"
    plain = parse_chat({"messages": CHAT, "response_format": {"type": "text"}}, "m", 64)
    assert plain.choices[0].params.structured is None and plain.structured_field is None


@pytest.mark.parametrize("body,param", [
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x y"}}},
     "response_format.json_schema.name"),
    ({"guided_choice": "a"}, "guided_choice"),  # a string, not an array: the type check
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),  # not offered
])
def test_http_refusals_are_400_naming_the_field(body, param):
    for parse in (lambda b: parse_chat({"messages": CHAT, **b}, "m", 64),
                  lambda b: parse_completion({"prompt": "x", **b}, "m")):
        with pytest.raises(ApiError) as e:
            parse(body)
        assert (e.value.status, e.value.param) == (400, param)


def test_zmq_params_accept_structured_or_the_openai_fields():
    params, field = _params({"max_tokens": 4, "structured": {"type": "regex", "pattern": "a+"}})
    assert params.structured == {"type": "regex", "pattern": "a+"}
    assert field == "params.structured"
    params, field = _params({"guided_json": SCHEMA})
    assert params.structured == {"type": "json_schema", "schema": SCHEMA, "strict": True}
    assert field == "params.guided_json"
    with pytest.raises(InvalidRequestError) as e:
        _params({"guided_regex": "a", "structured": {"type": "json_object"}})
    assert e.value.param == "params.guided_regex"
    with pytest.raises(InvalidRequestError) as e:
        _params({"structured": {"type": "regex"}})
    assert e.value.param == "params.structured"
    with pytest.raises(InvalidRequestError) as e:
        _params({"response_format": {"type": "nope"}})
    assert e.value.param == "params.response_format.type"
