"""Hostile requests and what the server must answer: data for test_hostile_input.py.

Each HTTP case is ``Case(path, body, status, param)``. ``body`` is a dict (sent as JSON),
or ``bytes`` sent as they are (for what ``json.dumps`` will not write: NaN, lone
surrogates, broken UTF-8, deep nesting); ``content_type`` overrides the header. ``param``
is the field OpenAI's error shape must name (None: the body as a whole). The fake
engine's context is ``CONTEXT`` tokens, one token per character; the body limit is
``MAX_BODY`` bytes.

Each ZeroMQ case is ``ZCase(name, frames, reply_type, param)``: ``frames`` are sent by a
DEALER as they are; ``reply_type`` None means no reply is due (the message is dropped with
a log line).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from typing import Any

import msgpack

CONTEXT = 4096
MAX_BODY = 64 * 1024
CHAT = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Case:
    path: str
    body: dict | bytes
    status: int
    param: str | None
    content_type: str | None = "application/json"
    id: str = ""

    def data(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def c(path: str, body: dict | bytes, status: int, param: str | None, id: str, **kw: Any) -> Case:
    return Case(path, body, status, param, id=id, **kw)


CMPL, CHATP, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
P = {"prompt": "x"}
M = {"messages": CHAT}


def user(content: Any, **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": content, **extra}]}


HTTP_CASES: list[Case] = [
    # -- numbers: types, ranges, finiteness (JSON parsers accept NaN / Infinity literals)
    c(CMPL, b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "temperature-nan"),
    c(CMPL, b'{"prompt": "x", "temperature": Infinity}', 400, "temperature", "temperature-inf"),
    c(CMPL, b'{"prompt": "x", "temperature": -Infinity}', 400, "temperature", "temperature-ninf"),
    c(CMPL, b'{"prompt": "x", "temperature": 1e400}', 400, "temperature", "temperature-overflow"),
    c(CMPL, {**P, "temperature": -1}, 400, "temperature", "temperature-negative"),
    c(CMPL, {**P, "temperature": "hot"}, 400, "temperature", "temperature-string"),
    c(CMPL, b'{"prompt": "x", "top_p": NaN}', 400, "top_p", "top-p-nan"),
    c(CMPL, {**P, "top_p": 0}, 400, "top_p", "top-p-zero"),
    c(CMPL, {**P, "top_p": 1.5}, 400, "top_p", "top-p-above-one"),
    c(CMPL, {**P, "top_k": -2}, 400, "top_k", "top-k-below-minus-one"),
    c(CMPL, {**P, "top_k": 2**70}, 400, "top_k", "top-k-past-int64"),
    c(CMPL, {**P, "top_k": 1.5}, 400, "top_k", "top-k-float"),
    c(CMPL, {**P, "max_tokens": 0}, 400, "max_tokens", "max-tokens-zero"),
    c(CMPL, {**P, "max_tokens": -5}, 400, "max_tokens", "max-tokens-negative"),
    c(CMPL, {**P, "max_tokens": 1.5}, 400, "max_tokens", "max-tokens-float"),
    c(CMPL, {**P, "max_tokens": True}, 400, "max_tokens", "max-tokens-bool"),
    c(CMPL, {**P, "max_tokens": "5"}, 400, "max_tokens", "max-tokens-string"),
    c(CMPL, {**P, "max_tokens": CONTEXT + 1}, 400, "max_tokens", "max-tokens-past-context"),
    c(CMPL, {**P, "max_tokens": 10**30}, 400, "max_tokens", "max-tokens-huge"),
    c(CMPL, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, None,
      "integer-past-digit-limit"),
    c(CMPL, {**P, "n": 0}, 400, "n", "n-zero"),
    c(CMPL, {**P, "n": 1000}, 400, "n", "n-huge"),
    c(CMPL, {"prompt": ["x"] * 20, "n": 16}, 400, "n", "prompts-times-n"),
    c(CMPL, {**P, "seed": 2**64}, 400, "seed", "seed-past-int64"),
    c(CMPL, {**P, "seed": 1.5}, 400, "seed", "seed-float"),
    c(CMPL, {**P, "priority": 2**64}, 400, "priority", "priority-past-int64"),
    c(CMPL, {**P, "logprobs": 21}, 400, "logprobs", "logprobs-too-many"),
    c(CMPL, {**P, "logprobs": -1}, 400, "logprobs", "logprobs-negative"),
    c(CMPL, b'{"prompt": "x", "frequency_penalty": NaN}', 400, "frequency_penalty",
      "penalty-nan"),
    # -- logit processors (the fake engine's vocabulary is every code point)
    c(CMPL, {**P, "logit_bias": {"1": 500}}, 400, "logit_bias", "logit-bias-out-of-range"),
    c(CMPL, b'{"prompt": "x", "logit_bias": {"1": NaN}}', 400, "logit_bias", "logit-bias-nan"),
    c(CMPL, {**P, "logit_bias": {"1": True}}, 400, "logit_bias", "logit-bias-bool"),
    c(CMPL, {**P, "logit_bias": {"one": 1}}, 400, "logit_bias", "logit-bias-key-word"),
    c(CMPL, {**P, "logit_bias": {"-5": 1}}, 400, "logit_bias", "logit-bias-key-negative"),
    c(CMPL, {**P, "logit_bias": {"\u0661": 1}}, 400, "logit_bias", "logit-bias-key-arabic-digit"),
    c(CMPL, {**P, "logit_bias": {"9" * 400: 1}}, 400, "logit_bias", "logit-bias-key-huge"),
    c(CMPL, {**P, "logit_bias": {"1114112": 1}}, 400, "logit_bias", "logit-bias-past-vocab"),
    c(CMPL, {**P, "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias",
      "logit-bias-too-many"),
    c(CMPL, {**P, "logit_bias": [1, 2]}, 400, "logit_bias", "logit-bias-array"),
    c(CHATP, {**M, "logit_bias": {"1": -101}}, 400, "logit_bias", "chat-logit-bias-range"),
    c(CMPL, {**P, "presence_penalty": 2.5}, 400, "presence_penalty", "presence-penalty-high"),
    c(CMPL, {**P, "presence_penalty": "1"}, 400, "presence_penalty", "presence-penalty-string"),
    c(CMPL, b'{"prompt": "x", "repetition_penalty": Infinity}', 400, "repetition_penalty",
      "repetition-penalty-inf"),
    c(CMPL, {**P, "repetition_penalty": 0}, 400, "repetition_penalty", "repetition-penalty-zero"),
    c(CMPL, {**P, "min_p": 1.01}, 400, "min_p", "min-p-above-one"),
    c(CMPL, b'{"prompt": "x", "min_p": NaN}', 400, "min_p", "min-p-nan"),
    c(CMPL, {**P, "min_tokens": -1}, 400, "min_tokens", "min-tokens-negative"),
    c(CMPL, {**P, "min_tokens": 5, "max_tokens": 4}, 400, "min_tokens", "min-tokens-past-max"),
    c(CMPL, {**P, "min_tokens": CONTEXT}, 400, "min_tokens", "min-tokens-past-context"),
    c(CHATP, {**M, "min_tokens": CONTEXT}, 400, "min_tokens", "chat-min-tokens-past-context"),
    c(CMPL, {**P, "min_tokens": 2.5}, 400, "min_tokens", "min-tokens-float"),
    # -- stop conditions
    c(CMPL, {**P, "stop": [1, 2]}, 400, "stop", "stop-numbers"),
    c(CMPL, {**P, "stop": [""]}, 400, "stop", "stop-empty-string"),
    c(CMPL, {**P, "stop": [str(i) for i in range(17)]}, 400, "stop", "stop-too-many"),
    c(CMPL, {**P, "stop": "s" * 2000}, 400, "stop", "stop-too-long"),
    c(CMPL, {**P, "stop_token_ids": [-1]}, 400, "stop_token_ids", "stop-ids-negative"),
    c(CMPL, {**P, "stop_token_ids": ["a"]}, 400, "stop_token_ids", "stop-ids-strings"),
    c(CMPL, {**P, "stop_token_ids": list(range(2000))}, 400, "stop_token_ids",
      "stop-ids-too-many"),
    # -- prompts
    c(CMPL, {"max_tokens": 1}, 400, "prompt", "prompt-missing"),
    c(CMPL, {"prompt": ""}, 400, "prompt", "prompt-empty"),
    c(CMPL, {"prompt": []}, 400, "prompt", "prompt-empty-array"),
    c(CMPL, {"prompt": [[]]}, 400, "prompt", "prompt-empty-token-array"),
    c(CMPL, {"prompt": [1, "a"]}, 400, "prompt", "prompt-mixed"),
    c(CMPL, {"prompt": 12}, 400, "prompt", "prompt-number"),
    c(CMPL, {"prompt": {"a": 1}}, 400, "prompt", "prompt-object"),
    c(CMPL, {"prompt": [-1]}, 400, "prompt", "prompt-negative-token"),
    c(CMPL, {"prompt": [2**40]}, 400, "prompt", "prompt-token-past-vocab"),
    c(CMPL, {"prompt": "x" * (CONTEXT + 10)}, 400, "prompt", "prompt-past-context"),
    c(CMPL, b'{"prompt": "\\ud800"}', 400, "prompt", "prompt-lone-surrogate"),
    c(CMPL, b'{"prompt": ["ok", "a\\udfffb"]}', 400, "prompt[1]", "prompt-surrogate-in-list"),
    c(CMPL, b'{"\\ud800": 1}', 400, None, "key-lone-surrogate"),
    # -- fields
    c(CMPL, {**P, "foo": 1}, 400, "foo", "unknown-field"),
    c(CMPL, {**P, "echo": True, "logprobs": 21}, 400, "logprobs", "echo-with-logprobs-past-cap"),
    c(CMPL, {**P, "echo": 1}, 400, "echo", "echo-number"),
    c(CHATP, {**M, "echo": True}, 400, "echo", "chat-echo"),
    c(CMPL, {**P, "best_of": 3}, 400, "best_of", "best-of"),
    c(CMPL, {**P, "stream": "yes"}, 400, "stream", "stream-string"),
    c(CMPL, {**P, "stream_options": {"include_usage": True}}, 400, "stream_options",
      "stream-options-without-stream"),
    c(CMPL, {**P, "stream": True, "stream_options": {"include_usage": "y"}}, 400,
      "stream_options.include_usage", "stream-options-include-usage-string"),
    c(CMPL, {**P, "model": "other"}, 404, "model", "model-unknown"),
    c(CMPL, {**P, "model": 5}, 400, "model", "model-number"),
    c(CMPL, {**P, "user": 5}, 400, "user", "user-number"),
    # -- the body itself
    c(CMPL, b"{not json", 400, None, "not-json"),
    c(CMPL, b"[1, 2]", 400, None, "json-array"),
    c(CMPL, b'"just a string"', 400, None, "json-string"),
    c(CMPL, b'{"prompt": "\xff\xfe"}', 400, None, "not-utf8"),
    c(CMPL, b"[" * 30_000 + b"]" * 30_000, 400, None, "nested-30000"),
    c(CMPL, b'{"prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}", 400, "prompt" + "[0]" * 32,
      "nested-40-in-a-field"),
    c(CMPL, json.dumps(P).encode(), 415, None, "content-type-text", content_type="text/plain"),
    c(CMPL, json.dumps(P).encode(), 415, None, "content-type-missing", content_type=None),
    c(CMPL, b"prompt=x", 415, None, "content-type-form",
      content_type="application/x-www-form-urlencoded"),
    c(CMPL, {"prompt": "x" * (MAX_BODY + 1)}, 413, None, "body-too-large"),
    # -- chat messages
    c(CHATP, {"max_tokens": 1}, 400, "messages", "messages-missing"),
    c(CHATP, {"messages": []}, 400, "messages", "messages-empty"),
    c(CHATP, {"messages": "hi"}, 400, "messages", "messages-string"),
    c(CHATP, {"messages": [1]}, 400, "messages[0]", "message-number"),
    c(CHATP, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
      "role-unknown"),
    c(CHATP, {"messages": [{"content": "x"}]}, 400, "messages[0].role", "role-missing"),
    c(CHATP, {"messages": [{"role": [], "content": "x"}]}, 400, "messages[0].role",
      "role-array"),  # found by the fuzzer: an unhashable role was a 500
    c(CHATP, {"messages": [{"role": {"a": 1}, "content": "x"}]}, 400, "messages[0].role",
      "role-object"),
    c(CHATP, {"messages": [{"role": "user"}]}, 400, "messages[0].content", "content-missing"),
    c(CHATP, user(None), 400, "messages[0].content", "content-null"),
    c(CHATP, {"messages": [{"role": "system", "content": 5}]}, 400, "messages[0].content",
      "content-number"),
    c(CHATP, user([{"type": "image_url", "image_url": {"url": "http://x"}}]), 400,
      "messages[0].content[0].type", "content-part-image"),
    c(CHATP, user([{"text": "x"}]), 400, "messages[0].content[0].type", "content-part-no-type"),
    c(CHATP, user([{"type": "text", "text": 5}]), 400, "messages[0].content[0].text",
      "content-part-text-number"),
    c(CHATP, user([{"type": "text", "text": "x", "foo": 1}]), 400,
      "messages[0].content[0].foo", "content-part-extra-key"),
    c(CHATP, user("x", foo=1), 400, "messages[0].foo", "message-unknown-key"),
    c(CHATP, {"messages": [{"role": "assistant", "content": None,
                            "tool_calls": [{"id": "1"}]}, *CHAT]}, 400,
      "messages[0].tool_calls[0].function", "tool-calls"),
    c(CHATP, user("x", name=5), 400, "messages[0].name", "name-number"),
    c(CHATP, b'{"messages": [{"role": "user", "content": "\\udc80"}]}', 400,
      "messages[0].content", "content-lone-surrogate"),
    c(CHATP, user("x" * CONTEXT), 400, "messages", "messages-past-context"),
    c(CHATP, {**M, "max_completion_tokens": CONTEXT}, 400, "max_completion_tokens",
      "max-completion-tokens-past-context"),
    c(CHATP, {**M, "max_tokens": CONTEXT}, 400, "max_tokens", "chat-max-tokens-past-context"),
    c(CHATP, {**M, "max_completion_tokens": 0}, 400, "max_completion_tokens",
      "max-completion-tokens-zero"),
    c(CHATP, {**M, "top_logprobs": 2}, 400, "top_logprobs", "top-logprobs-without-logprobs"),
    c(CHATP, {**M, "logprobs": True, "top_logprobs": 25}, 400, "top_logprobs",
      "top-logprobs-too-many"),
    c(CHATP, {**M, "logprobs": 3}, 400, "logprobs", "chat-logprobs-number"),
    c(CHATP, {**M, "tools": [{"type": "function"}]}, 400, "tools[0].function", "tools"),
    c(CHATP, {**M, "response_format": {"type": "yaml"}}, 400, "response_format.type",
      "response-format-type-unknown"),
    c(CHATP, {**M, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
      400, "response_format.json_schema.name", "response-format-schema-without-name"),
    c(CHATP, {**M, "response_format": {"type": "json_object"}, "guided_regex": "a"}, 400,
      "guided_regex", "two-output-constraints"),
    c(CHATP, {**M, "guided_json": "{not json"}, 400, "guided_json", "guided-json-not-json"),
    c(CHATP, {**M, "guided_choice": "a"}, 400, "guided_choice", "guided-choice-string"),
    c(CHATP, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
      "temperature", "chat-temperature-nan"),
    c(CHATP, {**M, "n": 17}, 400, "n", "chat-n-17"),
    # -- /tokenize and /detokenize
    c(TOK, {}, 400, "prompt", "tokenize-nothing"),
    c(TOK, {"prompt": "x", **M}, 400, "prompt", "tokenize-both"),
    c(TOK, {"prompt": 5}, 400, "prompt", "tokenize-prompt-number"),
    c(TOK, b'{"prompt": "\\ud800"}', 400, "prompt", "tokenize-lone-surrogate"),
    c(TOK, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role",
      "tokenize-role-unknown"),
    c(TOK, {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens",
      "tokenize-flag-string"),
    c(TOK, {"prompt": "x", "foo": 1}, 400, "foo", "tokenize-unknown-field"),
    c(TOK, b'{"prompt": "x"}', 415, None, "tokenize-content-type", content_type="text/plain"),
    c(TOK, {"prompt": "x", "model": "other"}, 404, "model", "tokenize-model-unknown"),
    c(DETOK, {}, 400, "tokens", "detokenize-nothing"),
    c(DETOK, {"tokens": [-1]}, 400, "tokens", "detokenize-negative"),
    c(DETOK, {"tokens": ["a"]}, 400, "tokens", "detokenize-strings"),
    c(DETOK, {"tokens": [1.5]}, 400, "tokens", "detokenize-float"),
    c(DETOK, {"tokens": 5}, 400, "tokens", "detokenize-number"),
    c(DETOK, {"tokens": [2**70]}, 400, "tokens", "detokenize-past-vocab"),
    c(DETOK, b'{"tokens": [1], "model": NaN}', 400, "model", "detokenize-model-nan"),
    c("/v1/nothing-here", {}, 404, None, "route-unknown"),
]


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def gen(**fields: Any) -> dict:
    return {"kind": "generate", "id": "z", "prompt": "x", **fields}


@dataclass(frozen=True)
class ZCase:
    name: str
    frames: list[bytes]
    reply_type: str | None
    param: str | None = None


ZMQ_LIMIT = 16 * 1024  # the frontend's max_message_bytes in the test

ZMQ_CASES: list[ZCase] = [
    ZCase("not-msgpack", [b"\xc1 garbage"], "BadMessage"),
    ZCase("pickle-is-never-unpickled", [pickle.dumps({"kind": "generate", "id": "p"})],
          "BadMessage"),
    ZCase("array-not-map", [_pack([1, 2, 3])], "BadMessage"),
    ZCase("kind-not-string", [_pack({"kind": 5, "id": "a"})], "BadMessage"),
    ZCase("id-missing", [_pack({"kind": "generate", "prompt": "x"})], "BadMessage"),
    ZCase("id-too-long", [_pack(gen(id="i" * 1000))], "BadMessage"),
    ZCase("kind-unknown", [_pack({"kind": "nope", "id": "a"})], "BadMessage"),
    ZCase("invalid-utf8-string", [b"\x81\xa4kind\xa2\xff\xfe"], "BadMessage"),
    ZCase("too-large", [_pack(gen(prompt="x" * (ZMQ_LIMIT + 100)))], "BadMessage"),
    ZCase("three-frames", [b"a", b"b"], None),
    ZCase("prompt-and-messages", [_pack(gen(messages=CHAT))], "InvalidRequest", "prompt"),
    ZCase("prompt-bytes", [_pack(gen(prompt=b"x"))], "InvalidRequest", "prompt"),
    ZCase("token-ids-string", [_pack({"kind": "generate", "id": "z",
                                      "prompt_token_ids": "abc"})],
          "InvalidRequest", "prompt_token_ids"),
    ZCase("token-id-negative", [_pack({"kind": "generate", "id": "z",
                                       "prompt_token_ids": [-1]})],
          "InvalidRequest", "prompt"),
    ZCase("role-unknown", [_pack({"kind": "generate", "id": "z",
                                  "messages": [{"role": "wizard", "content": "x"}]})],
          "InvalidRequest", "messages[0].role"),
    ZCase("unknown-field", [_pack(gen(bogus=1))], "InvalidRequest", "bogus"),
    ZCase("param-unknown", [_pack(gen(params={"bogus": 1}))], "InvalidRequest",
          "params.bogus"),
    ZCase("params-not-map", [_pack(gen(params=[1]))], "InvalidRequest", "params"),
    ZCase("temperature-nan", [_pack(gen(params={"temperature": float("nan")}))],
          "InvalidRequest", "temperature"),
    ZCase("temperature-inf", [_pack(gen(params={"temperature": float("inf")}))],
          "InvalidRequest", "temperature"),
    ZCase("seed-past-int64", [_pack(gen(params={"seed": 2**64 - 1}))], "InvalidRequest",
          "seed"),
    ZCase("n-two", [_pack(gen(params={"n": 2}))], "InvalidRequest", "params.n"),
    ZCase("stop-number", [_pack(gen(params={"stop": 5}))], "InvalidRequest", "params"),
    ZCase("max-tokens-past-context", [_pack(gen(params={"max_tokens": CONTEXT}))],
          "InvalidRequest", "max_tokens"),
    ZCase("logit-bias-int-keys", [_pack(gen(params={"logit_bias": {1: 2}}))], "BadMessage"),
    ZCase("logit-bias-out-of-range", [_pack(gen(params={"logit_bias": {"1": 500}}))],
          "InvalidRequest", "logit_bias"),
    ZCase("logit-bias-past-vocab", [_pack(gen(params={"logit_bias": {"1114112": 1}}))],
          "InvalidRequest", "logit_bias"),
    ZCase("logit-bias-not-map", [_pack(gen(params={"logit_bias": "x"}))],
          "InvalidRequest", "logit_bias"),
    ZCase("frequency-penalty-nan", [_pack(gen(params={"frequency_penalty": float("nan")}))],
          "InvalidRequest", "frequency_penalty"),
    ZCase("min-p-string", [_pack(gen(params={"min_p": "0.1"}))], "InvalidRequest", "min_p"),
    ZCase("prompt-logprobs-past-cap", [_pack(gen(params={"prompt_logprobs": 21}))],
          "InvalidRequest", "prompt_logprobs"),
    ZCase("prompt-logprobs-bool", [_pack(gen(params={"prompt_logprobs": True}))],
          "InvalidRequest", "prompt_logprobs"),
    ZCase("min-tokens-past-max", [_pack(gen(params={"min_tokens": 9, "max_tokens": 3}))],
          "InvalidRequest", "min_tokens"),
]
