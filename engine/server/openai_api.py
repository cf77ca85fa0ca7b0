"""OpenAI request bodies -> engine requests (responses: ``openai_responses.py``).

Pure functions and dataclasses, no I/O: ``http.py`` / ``openai_routes.py`` do the serving.
Validation is strict in the way vLLM's pydantic models are: an unknown field, a field of
the wrong type, or an OpenAI field this server cannot honour (e.g. ``best_of: 3``) is a
400 that names the field, instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.sampling import InvalidRequestError, SamplingParams
from engine.server.tools import (
    TOOL_FIELDS,
    ToolRequest,
    check_message_tool_calls,
    parse_tool_request,
)
from engine.structured.spec import spec_from_openai

# Upper bound on engine requests one HTTP request may fan out to (prompts x n), so a
# single body cannot flood the waiting queue.
MAX_CHOICES = 128
# OpenAI's documented default for /v1/completions. Chat has no small default: it generates
# until EOS or the context is full (the engine finishes with "length" there).
DEFAULT_COMPLETION_MAX_TOKENS = 16


class ApiError(Exception):
    """An error rendered as OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


@dataclass
class ChoiceSpec:
    """One engine request: choice ``index`` of the response."""

    index: int
    prompt_index: int
    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams


@dataclass
class GenerationRequest:
    chat: bool
    model: str
    choices: list[ChoiceSpec]
    stream: bool
    include_usage: bool
    # completions: ``logprobs`` (top-k count); chat: ``top_logprobs`` (0 if only
    # ``logprobs: true``). None: no logprobs in the response.
    logprobs: int | None
    # The field the client sent for the output cap, so an engine refusal of ``max_tokens``
    # names it (chat: ``max_completion_tokens`` when given).
    max_tokens_field: str = "max_tokens"
    tools: ToolRequest | None = None  # chat: the checked tools / tool_choice (server/tools.py)
    # The field the output constraint came from (``response_format``, ``guided_json``...),
    # so the engine's refusal of ``structured`` (a schema that does not compile) names it.
    structured_field: str | None = None
    echo: bool = False  # completions: the prompt's text goes before each choice's text
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex


# -- field checkers -------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    # JSON parsers accept NaN and Infinity literals; no field of this API means them.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "int": (_is_int, "an integer"),
    "num": (_is_num, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "an array"),
    "any": (lambda v: True, "any value"),
}

_COMMON = {
    "model": "str",
    "max_tokens": "int",
    "temperature": "num",
    "top_p": "num",
    "top_k": "int",
    "n": "int",
    "stop": "any",
    "stop_token_ids": "list",
    "seed": "int",
    "stream": "bool",
    "stream_options": "dict",
    "ignore_eos": "bool",
    "priority": "int",
    "user": "str",
    "skip_special_tokens": "bool",
    # Logit processors (SamplingParams validates the ranges; the frontend the token ids).
    "presence_penalty": "num",
    "frequency_penalty": "num",
    "repetition_penalty": "num",
    "min_p": "num",
    "logit_bias": "dict",
    "min_tokens": "int",
}
# Output constraints (engine.structured.spec): OpenAI's response_format and vLLM's extras,
# on both routes. At most one may be given.
STRUCTURED_FIELDS = {
    "response_format": "dict",
    "guided_json": "any",  # a schema object, or its JSON text
    "guided_regex": "str",
    "guided_choice": "list",
    "guided_grammar": "str",
    "structured_outputs": "dict",  # vLLM's successor of guided_*: {json|regex|choice|...}
}
COMPLETION_FIELDS = {**_COMMON, **STRUCTURED_FIELDS, "prompt": "any", "logprobs": "int",
                     "echo": "bool"}
CHAT_FIELDS = {
    **_COMMON,
    **STRUCTURED_FIELDS,
    "messages": "list",
    "max_completion_tokens": "int",
    "logprobs": "bool",
    "top_logprobs": "int",
    **TOOL_FIELDS,
}

# OpenAI fields this server does not implement, accepted only at their no-op value so
# clients that send defaults explicitly keep working.
_NEUTRAL_COMMON: dict[str, tuple] = {}
COMPLETION_NEUTRAL = {**_NEUTRAL_COMMON, "best_of": (1,), "suffix": ("",)}
CHAT_NEUTRAL = {
    **_NEUTRAL_COMMON,
    "store": (False,),
    "metadata": ({},),
    "modalities": (["text"],),
}


def check_fields(body: dict, fields: dict[str, str], neutral: dict[str, tuple]) -> dict:
    """Type-check ``body``; returns the known fields with nulls dropped (null = default)."""
    out: dict = {}
    for name, value in body.items():
        if name in neutral:
            if value is not None and value not in neutral[name]:
                raise bad(
                    name, f"not supported by this server (allowed: null or {list(neutral[name])!r})"
                )
            continue
        if name not in fields:
            raise bad(name, "unknown field")
        if value is None:
            continue
        ok, what = _TYPES[fields[name]]
        if not ok(value):
            got = repr(value) if isinstance(value, float) else type(value).__name__
            raise bad(name, f"must be {what}, got {got}")
        out[name] = value
    return out


def check_model(f: dict, model_name: str) -> str:
    model = f.get("model", model_name)
    if model != model_name:
        raise ApiError(
            404,
            f"The model `{model}` does not exist (this server serves `{model_name}`).",
            param="model",
            code="model_not_found",
        )
    return model


def _stop(f: dict) -> tuple[str, ...]:
    stop = f.get("stop", [])
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise bad("stop", "must be a string or an array of strings")


def _stream_opts(f: dict) -> tuple[bool, bool]:
    stream = f.get("stream", False)
    opts = f.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad("stream_options", "only allowed when stream is true")
    unknown = set(opts) - {"include_usage"}
    if unknown:
        raise bad("stream_options", f"unknown key {min(unknown)!r}")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options.include_usage", "must be a boolean")
    return stream, include


def _base_params(
    f: dict, max_tokens: int, logprobs: int | None, *, clamp: bool = False
) -> SamplingParams:
    if "stop_token_ids" in f and not all(_is_int(t) for t in f["stop_token_ids"]):
        raise bad("stop_token_ids", "must be an array of integers")
    kw: dict[str, Any] = {
        "max_tokens": max_tokens,
        "stop": _stop(f),
        "logprobs": logprobs,
        "clamp_max_tokens": clamp,
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "n",
        "seed",
        "stop_token_ids",
        "ignore_eos",
        "priority",
        "skip_special_tokens",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_p",
        "logit_bias",
        "min_tokens",
    ):
        if name in f:
            kw[name] = f[name]
    return SamplingParams(**kw)  # range checks live in SamplingParams (InvalidRequestError)


def _fan_out(prompts: list, messages: list[dict] | None, base: SamplingParams) -> list[ChoiceSpec]:
    """n choices per prompt, each its own engine request. Choice ``index`` = prompt * n + i
    (vLLM's numbering); with a seed, choice ``index`` samples with ``seed + index`` so the
    choices differ from each other yet the whole response is reproducible."""
    n = base.n
    if len(prompts) * n > MAX_CHOICES:
        raise bad("n", f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts) * n}")
    choices = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            seed = None if base.seed is None else _wrap_int64(base.seed + index)
            params = dataclasses.replace(base, n=1, seed=seed)
            choices.append(ChoiceSpec(index, p, prompt, messages, params))
    return choices


def _wrap_int64(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def _prompts(value: object) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_is_int(t) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return [list(p) for p in value]
    raise bad(
        "prompt",
        "must be a non-empty string, array of strings, array of token ids, "
        "or array of token-id arrays",
    )


# Chat roles this server renders, and the keys each message may carry besides role/content.
# ``content`` is required except for an assistant turn (OpenAI allows null there).
_MESSAGE_KEYS = {
    "system": {"name"},
    "developer": {"name"},
    "user": {"name"},
    "assistant": {"name", "refusal", "tool_calls"},
    "tool": {"tool_call_id"},
}
_CONTENT_OPTIONAL = {"assistant"}


def parse_messages(value: list) -> list[dict]:
    """OpenAI chat messages -> ``[{role, content[, name]}]``. Unknown roles, unknown keys,
    missing content and content parts other than text are refused, naming the exact field
    (``messages[2].content[0].type``)."""
    if not value:
        raise bad("messages", "must not be empty")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in _MESSAGE_KEYS:  # a list is not hashable
            raise bad(f"{where}.role", f"must be one of {sorted(_MESSAGE_KEYS)}, got {role!r}")
        for key in m:
            if key not in ("role", "content") and key not in _MESSAGE_KEYS[role]:
                raise bad(f"{where}.{key}", f"unknown field for a {role} message")
        if m.get("refusal"):
            raise bad(f"{where}.refusal", "not supported by this server (allowed: null or empty)")
        content = _content(m.get("content"), f"{where}.content", role)
        msg: dict = {"role": role, "content": content}
        if m.get("tool_calls"):
            try:
                msg["tool_calls"] = check_message_tool_calls(m["tool_calls"], f"{where}.tool_calls")
            except InvalidRequestError as e:
                raise _params_error(e, {}) from None
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str) or not name:
                raise bad(f"{where}.name", "must be a non-empty string")
            msg["name"] = name
        if role == "tool" and not isinstance(m.get("tool_call_id"), (str, type(None))):
            raise bad(f"{where}.tool_call_id", "must be a string")
        if role == "tool" and m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _content(content: object, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role in _CONTENT_OPTIONAL:
            return ""
        raise bad(where, f"required for a {role} message")
    if not isinstance(content, list):
        raise bad(where, "must be a string or an array of content parts")
    texts = []  # content parts: only text can reach a text model
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad(at, "must be an object")
        kind = part.get("type")
        if kind != "text":
            raise bad(f"{at}.type", f"only 'text' content parts are supported, got {kind!r}")
        unknown = set(part) - {"type", "text"}
        if unknown:
            raise bad(f"{at}.{min(unknown)}", "unknown field for a text part")
        if not isinstance(part.get("text"), str):
            raise bad(f"{at}.text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _params_error(e: InvalidRequestError, renames: dict[str, str]) -> ApiError:
    """Name the field the client sent (``max_completion_tokens``, ``top_logprobs``)."""
    param = renames.get(e.param or "", e.param)
    msg = str(e)
    if param != e.param and e.param:
        msg = msg.replace(e.param, param, 1)
    return ApiError(400, msg, param=param)


def _structured(f: dict) -> tuple[dict | None, str | None]:
    try:
        return spec_from_openai(f)
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param=e.param) from None


def parse_completion(body: dict, model_name: str) -> GenerationRequest:
    f = check_fields(body, COMPLETION_FIELDS, COMPLETION_NEUTRAL)
    model = check_model(f, model_name)
    if "prompt" not in f:
        raise bad("prompt", "required")
    prompts = _prompts(f["prompt"])
    stream, include_usage = _stream_opts(f)
    structured, structured_field = _structured(f)
    echo = f.get("echo", False)
    try:
        # Without max_tokens, OpenAI's default of 16, cut to what the context leaves.
        base = _base_params(
            f,
            f.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS),
            f.get("logprobs"),
            clamp="max_tokens" not in f,
        )
        # echo with logprobs: the echoed prompt's tokens carry logprobs too (the worker
        # scores the prompt), with the same top-k as the generated ones.
        prompt_logprobs = base.logprobs if echo else None
        base = dataclasses.replace(base, structured=structured, prompt_logprobs=prompt_logprobs)
    except InvalidRequestError as e:
        raise _params_error(e, {}) from None
    return GenerationRequest(
        False, model, _fan_out(prompts, None, base), stream, include_usage, f.get("logprobs"),
        structured_field=structured_field,
        echo=echo,
    )


def parse_chat(body: dict, model_name: str, max_model_len: int) -> GenerationRequest:
    f = check_fields(body, CHAT_FIELDS, CHAT_NEUTRAL)
    model = check_model(f, model_name)
    if "messages" not in f:
        raise bad("messages", "required")
    messages = parse_messages(f["messages"])
    try:
        tools = parse_tool_request(
            f.get("tools"), f.get("tool_choice"), f.get("parallel_tool_calls")
        )
    except InvalidRequestError as e:
        raise _params_error(e, {}) from None
    stream, include_usage = _stream_opts(f)
    structured, structured_field = _structured(f)
    top = f.get("top_logprobs")
    if top is not None and not f.get("logprobs", False):
        raise bad("top_logprobs", "requires logprobs to be true")
    logprobs = (top or 0) if f.get("logprobs", False) else None
    renames = {"logprobs": "top_logprobs"}
    if "max_completion_tokens" in f:  # OpenAI's newer name wins over the deprecated one
        max_tokens, renames["max_tokens"] = f["max_completion_tokens"], "max_completion_tokens"
    else:
        max_tokens = f.get("max_tokens", max_model_len)
    # Without a cap, chat generates until EOS or the context is full.
    clamp = "max_completion_tokens" not in f and "max_tokens" not in f
    try:
        base = _base_params(f, max_tokens, logprobs, clamp=clamp)
        base = dataclasses.replace(base, structured=structured)
    except InvalidRequestError as e:
        raise _params_error(e, renames) from None
    return GenerationRequest(
        True,
        model,
        _fan_out([None], messages, base),
        stream,
        include_usage,
        logprobs,
        max_tokens_field=renames.get("max_tokens", "max_tokens"),
        tools=tools,
        structured_field=structured_field,
    )
