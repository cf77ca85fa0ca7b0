"""The OpenAPI 3.1 document served at ``GET /openapi.json``.

Request bodies are built from the same field tables the validators use
(``openai_api.COMPLETION_FIELDS`` ...), so the document cannot drift from what the server
accepts by type; ranges are stated here next to where ``SamplingParams.validate`` and the
route handlers enforce them. Every status a route can answer is listed, so a fuzzer can
hold the server to it (``tests/integration/test_openapi_fuzz.py``).
"""

from __future__ import annotations

from typing import Any

from engine.sampling import (
    MAX_BIAS,
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
)
from engine.server.openai_api import (
    CHAT_FIELDS,
    CHAT_NEUTRAL,
    COMPLETION_FIELDS,
    COMPLETION_NEUTRAL,
    MAX_CHOICES,
)
from engine.structured.spec import MAX_CHOICES as MAX_GUIDED_CHOICES

INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
_TYPES: dict[str, dict] = {
    "int": {"type": "integer"},
    "num": {"type": "number"},
    "bool": {"type": "boolean"},
    "str": {"type": "string"},
    "dict": {"type": "object"},
    "list": {"type": "array"},
    "any": {},
}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        {
            "type": "array",
            "maxItems": 16,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        },
    ]
}
_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}
# Tool calling (engine/server/tools.py).
_FUNCTION_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
_TOOL = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "properties": {
                "name": _FUNCTION_NAME,
                "description": {"type": "string"},
                "parameters": {"type": "object"},  # a JSON schema whose type is "object"
                "strict": {"type": "boolean"},
            },
            "required": ["name"],
            "additionalProperties": False,
        },
    },
    "required": ["type", "function"],
    "additionalProperties": False,
}
_TOOL_CHOICE = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "properties": {
                "type": {"const": "function"},
                "function": {
                    "type": "object",
                    "properties": {"name": _FUNCTION_NAME},
                    "required": ["name"],
                    "additionalProperties": False,
                },
            },
            "required": ["type", "function"],
            "additionalProperties": False,
        },
    ]
}
_TOOL_CALLS = {  # an assistant message's earlier calls
    "anyOf": [
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "type": {"const": "function"},
                    "index": {"type": "integer"},
                    "function": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "arguments": {"anyOf": [{"type": "string"}, {"type": "object"}]},
                        },
                        "required": ["name"],
                        "additionalProperties": False,
                    },
                },
                "required": ["function"],
                "additionalProperties": False,
            },
        },
        {"type": "null"},
    ]
}
_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]
        },
        "name": {"type": "string", "minLength": 1},
        "tool_call_id": {"type": "string"},  # tool messages
        "tool_calls": _TOOL_CALLS,  # assistant messages
        "refusal": {"type": "null"},
    },
    "required": ["role", "content"],
    "additionalProperties": False,
}
_MESSAGES = {"type": "array", "minItems": 1, "items": _MESSAGE}


# OpenAPI 3.1 has a text/event-stream ``schema`` describe each event (3.2 moved that to
# ``itemSchema``): an event with a ``data`` line, a JSON chunk or the final ``[DONE]``.
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}


def _ranges(max_model_len: int) -> dict[str, dict]:
    """Field schemas beyond their JSON type (SamplingParams.validate, route handlers)."""
    return {
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": max_model_len},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": max_model_len},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": 2**63 - 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "seed": INT64,
        "priority": INT64,
        "stop": _STOP,
        "stop_token_ids": {
            "type": "array",
            "maxItems": MAX_STOP_TOKEN_IDS,
            "items": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        },
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
            "additionalProperties": False,
        },
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        **_STRUCTURED,
        "presence_penalty": {"type": "number", "minimum": -MAX_PENALTY, "maximum": MAX_PENALTY},
        "frequency_penalty": {"type": "number", "minimum": -MAX_PENALTY, "maximum": MAX_PENALTY},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        # Keys are token ids in decimal; ids past the vocabulary are refused by the engine.
        "logit_bias": {
            "type": "object",
            "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": "^[0-9]{1,19}$"},
            "additionalProperties": {"type": "number", "minimum": -MAX_BIAS,
                                     "maximum": MAX_BIAS},
        },
        # At most max_tokens (a cross-field rule the schema cannot state).
        "min_tokens": {"type": "integer", "minimum": 0, "maximum": max_model_len},
    }


# Output constraints (engine.structured.spec); at most one per request. Whether a schema,
# regex or grammar compiles is only known to the engine (400 when it does not).
_JSON_SCHEMA_FORMAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "schema": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        "description": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def _format(kind: str, **props: dict) -> dict:
    return {"type": "object", "properties": {"type": {"const": kind}, **props},
            "required": ["type", *props], "additionalProperties": False}


_STRUCTURED: dict[str, dict] = {
    "response_format": {"anyOf": [_format("text"), _format("json_object"),
                                  _format("json_schema", json_schema=_JSON_SCHEMA_FORMAT)]},
    "guided_json": {"anyOf": [{"type": "object"}, {"type": "string"}]},
    "guided_regex": {"type": "string", "minLength": 1},
    "guided_choice": {"type": "array", "minItems": 1, "maxItems": MAX_GUIDED_CHOICES,
                      "items": {"type": "string", "minLength": 1}},
    "guided_grammar": {"type": "string", "minLength": 1},
    "structured_outputs": {"type": "object", "minProperties": 1, "maxProperties": 1,
                           "properties": {"json": {"anyOf": [{"type": "object"},
                                                             {"type": "string"}]},
                                          "regex": {"type": "string", "minLength": 1},
                                          "choice": {"type": "array", "minItems": 1,
                                                     "items": {"type": "string",
                                                               "minLength": 1}},
                                          "grammar": {"type": "string", "minLength": 1},
                                          "json_object": {"const": True}},
                           "additionalProperties": False},
}


def _request(
    fields: dict[str, str], neutral: dict[str, tuple], extra: dict[str, dict], required: list
) -> dict:
    props: dict[str, Any] = {}
    for name, kind in fields.items():
        schema = extra.get(name, _TYPES[kind])
        props[name] = {"anyOf": [schema, {"type": "null"}]} if name not in required else schema
    for name, allowed in neutral.items():  # accepted only at their no-op value
        props[name] = {"enum": [*allowed, None]}
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": _nullable({"type": "string"}),
                "code": _nullable({"type": "string"}),
            },
        }
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer", "minimum": 0}
                   for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_FINISH = _nullable({"enum": ["stop", "length", "abort"]})
_CHAT_FINISH = _nullable({"enum": ["stop", "length", "abort", "tool_calls"]})
_OUT_TOOL_CALLS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["id", "type", "function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            },
        },
    },
}
# The stop string or stop token id that ended a choice (vLLM's); null for EOS / length.
_STOP_REASON = {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}


def _completion_response(chat: bool) -> dict:
    if chat:
        choice = {
            "type": "object",
            "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "message": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"const": "assistant"},
                        "content": _nullable({"type": "string"}),  # null: only tool calls
                        "tool_calls": _OUT_TOOL_CALLS,
                    },
                },
                "logprobs": _nullable({"type": "object"}),
                "finish_reason": _CHAT_FINISH,
                "stop_reason": _STOP_REASON,
            },
        }
    else:
        choice = {
            "type": "object",
            "required": ["index", "text", "finish_reason"],
            "properties": {
                "index": {"type": "integer"},
                "text": {"type": "string"},
                "logprobs": _nullable({"type": "object"}),
                "finish_reason": _FINISH,
                "stop_reason": _STOP_REASON,
            },
        }
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion" if chat else "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _USAGE,
        },
    }


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    what = {
        400: "invalid request (``param`` names the field)",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "body larger than the server's limit",
        415: "body is not application/json",
        503: "overloaded, shutting down, or the engine cannot serve (see Retry-After)",
    }
    return {str(s): _json({"$ref": "#/components/schemas/Error"}, what[s]) for s in statuses}


def openapi_document(model_name: str, max_model_len: int, version: str) -> dict:
    ranges = _ranges(max_model_len)
    prompt = {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES, "items": {"type": "string"}},
            _TOKEN_IDS,
            {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES, "items": _TOKEN_IDS},
        ]
    }
    completion_req = _request(
        COMPLETION_FIELDS, COMPLETION_NEUTRAL,
        {**ranges, "prompt": prompt, "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}},
        ["prompt"],
    )
    tools = {"type": "array", "maxItems": 128, "items": _TOOL}
    chat_req = _request(CHAT_FIELDS, CHAT_NEUTRAL,
                        {**ranges, "messages": _MESSAGES, "tools": tools,
                         "tool_choice": _TOOL_CHOICE}, ["messages"])
    tokenize_req = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "model": _nullable({"type": "string"}),
            "prompt": _nullable({"type": "string"}),
            "messages": _nullable(_MESSAGES),
            "add_special_tokens": _nullable({"type": "boolean"}),
            "add_generation_prompt": _nullable({"type": "boolean"}),
            "return_token_strs": _nullable({"type": "boolean"}),
            "tools": _nullable(tools),
        },
    }
    detokenize_req = {
        "type": "object",
        "additionalProperties": False,
        "required": ["tokens"],
        "properties": {
            "model": _nullable({"type": "string"}),
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        },
    }
    generation = {
        "200": {
            "description": "the completion, or with ``stream: true`` server-sent events "
                           "ending in ``data: [DONE]``",
            "content": {
                "application/json": {"schema": {}},
                "text/event-stream": {"schema": _SSE_EVENT},
            },
        },
        **_errors(400, 401, 404, 413, 415, 503),
    }

    def post(summary: str, body: dict, responses: dict) -> dict:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": body}}},
                "responses": responses,
            }
        }

    def get(summary: str, responses: dict) -> dict:
        return {"get": {"summary": summary, "responses": responses}}

    completions = dict(generation)
    completions["200"] = {**generation["200"], "content": {
        "application/json": {"schema": _completion_response(chat=False)},
        "text/event-stream": {"schema": _SSE_EVENT},
    }}
    chat = dict(generation)
    chat["200"] = {**generation["200"], "content": {
        "application/json": {"schema": _completion_response(chat=True)},
        "text/event-stream": {"schema": _SSE_EVENT},
    }}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "FastServe",
            "version": version,
            "description": f"OpenAI-compatible API serving `{model_name}` "
                           f"({max_model_len}-token context). Errors: docs/serving.md.",
        },
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/completions": post("Text completion", completion_req, completions),
            "/v1/chat/completions": post("Chat completion", chat_req, chat),
            "/tokenize": post("Prompt or messages to token ids", tokenize_req, {
                "200": _json({
                    "type": "object",
                    "required": ["count", "max_model_len", "tokens"],
                    "properties": {
                        "count": {"type": "integer"},
                        "max_model_len": {"type": "integer"},
                        "tokens": {"type": "array", "items": {"type": "integer"}},
                        "token_strs": _nullable({"type": "array", "items": {"type": "string"}}),
                    },
                }, "token ids"),
                **_errors(400, 401, 404, 413, 415),
            }),
            "/detokenize": post("Token ids to text", detokenize_req, {
                "200": _json({"type": "object", "required": ["prompt"],
                              "properties": {"prompt": {"type": "string"}}}, "the text"),
                **_errors(400, 401, 404, 413, 415),
            }),
            "/v1/models": get("The served model", {
                "200": _json({"type": "object", "required": ["object", "data"],
                              "properties": {"object": {"const": "list"},
                                             "data": {"type": "array"}}}, "model cards"),
                **_errors(401),
            }),
            "/v1/models/{model_id}": {"get": {
                "summary": "The served model's card; 404 for any other id",
                "parameters": [{"name": "model_id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": _json({"type": "object", "required": ["id", "object"],
                                  "properties": {"id": {"type": "string"},
                                                 "object": {"const": "model"}}}, "model card"),
                    **_errors(401, 404),
                },
            }},
            "/health": get("Liveness (never needs the API key)", {
                "200": {"description": "the engine serves"},
                **_errors(503),
            }),
            "/version": get("Server version", {
                "200": _json({"type": "object", "required": ["version"],
                              "properties": {"version": {"type": "string"}}}, "version"),
                **_errors(401),
            }),
            "/metrics": get("Prometheus metrics", {
                "200": {"description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(401),
            }),
            "/v1/scheduler": get("Scheduler introspection", {
                "200": _json({"type": "object", "required": ["object", "jobs"],
                              "properties": {"object": {"const": "scheduler.stats"},
                                             "jobs": {"type": "array"}}}, "queues and jobs"),
                **_errors(401, 503),
            }),
            "/openapi.json": get("This document", {
                "200": _json({"type": "object"}, "OpenAPI 3.1"),
                **_errors(401),
            }),
        },
    }
