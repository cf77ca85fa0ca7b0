"""OpenAI tool calling for /v1/chat/completions and the ZeroMQ SDK: request fields, the
prompt, and the output. Pure (no I/O); the routes call it through a few hooks.

* **Request** (:func:`parse_tool_request`, :func:`check_message_tool_calls`): ``tools``,
  ``tool_choice``, ``parallel_tool_calls`` and the tool turns of ``messages`` are checked
  before anything is queued; a mistake is an ``InvalidRequestError`` naming the field.
* **Prompt** (:func:`render_prompt`): a chat template that takes ``tools`` gets them (and
  the tool turns) as they are; any other template gets plain messages, the tools offered
  in the system message by the parser's own text and earlier calls / results written in
  the parser's format. ``tool_choice: "none"`` offers no tools.
* **Generation**: ``auto`` generates freely and the parser finds calls in the text;
  ``required`` and a named function constrain decoding with a ``structured`` JSON schema
  (a list of ``{name, arguments}``, or the function's arguments) so the calls always parse.
* **Output** (``tool_output.py``, :class:`ToolOutput`): one per choice; turns text
  increments into content and ``tool_calls`` deltas as OpenAI streams them, or the whole
  text into a message.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from engine.sampling import InvalidRequestError, SamplingParams
from engine.server.tool_output import ToolOutput, finish_response, stream_choices, wire_output
from engine.tool_parsers import ToolParser, default_parser_name, get_parser

__all__ = [  # the output side is re-exported: the routes import everything from here
    "TOOL_FIELDS",
    "ToolOutput",
    "ToolRequest",
    "chat_prompt_ids",
    "check_message_tool_calls",
    "finish_response",
    "parse_tool_request",
    "prepare_choices",
    "prepare_wire",
    "render_prompt",
    "stream_choices",
    "wire_output",
]

# Fields of a chat request this module owns (``engine.server.openai_api`` type checks).
TOOL_FIELDS = {"tools": "list", "tool_choice": "any", "parallel_tool_calls": "bool"}
MAX_TOOLS = 128  # OpenAI's limit on functions per request
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_CALL_KEYS = {"id", "type", "function", "index"}  # index: a call joined from stream deltas
_EMPTY_PARAMETERS: dict = {"type": "object", "properties": {}}


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param)


@dataclass(frozen=True)
class ToolRequest:
    """The tool fields of one request, checked. ``choice``: auto | none | required |
    function (then ``function`` names it)."""

    functions: tuple[dict, ...]  # {name, description?, parameters, strict?}
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> bool:
        """Whether the model is told about the tools (not for ``none``)."""
        return self.choice != "none" and bool(self.functions)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.functions)

    def parameters(self, name: str) -> dict:
        return next(f["parameters"] for f in self.functions if f["name"] == name)

    def structured(self) -> dict | None:
        """The ``SamplingParams.structured`` spec that forces the calls, or None."""
        if self.choice == "function":
            assert self.function is not None
            return {"type": "json_schema", "schema": self.parameters(self.function), "strict": True}
        if self.choice != "required":
            return None
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [f["name"]]},
                    "arguments": f["parameters"],
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in self.functions
        ]
        schema: dict[str, Any] = {
            "type": "array",
            "items": items[0] if len(items) == 1 else {"anyOf": items},
            "minItems": 1,
        }
        if not self.parallel:
            schema["maxItems"] = 1
        return {"type": "json_schema", "schema": schema, "strict": True}


# -- request --------------------------------------------------------------------------------
def parse_tool_request(
    tools: object, tool_choice: object = None, parallel_tool_calls: object = None
) -> ToolRequest | None:
    """The checked tool fields; None when the request has no tools (a ``tool_choice`` of
    "none" or "auto" is then a no-op; any other is refused, as OpenAI does)."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad("parallel_tool_calls", "must be a boolean")
    if tools is None or tools == []:
        if tool_choice is None or tool_choice in ("none", "auto"):
            return None
        raise _bad("tool_choice", "only allowed when tools are given")
    if not isinstance(tools, list):
        raise _bad("tools", "must be an array of tools")
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    functions = [_function(t, i) for i, t in enumerate(tools)]
    seen: set[str] = set()
    for i, f in enumerate(functions):
        if f["name"] in seen:
            raise _bad(f"tools[{i}].function.name", f"{f['name']!r} is given twice")
        seen.add(f["name"])
    choice, name = _choice(tool_choice, seen)
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    return ToolRequest(tuple(functions), choice, name, parallel)


def _function(tool: object, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise _bad(where, "must be an object")
    unknown = set(tool) - {"type", "function"}
    if unknown:
        raise _bad(f"{where}.{min(unknown)}", "unknown field")
    if tool.get("type") != "function":
        raise _bad(f"{where}.type", f"must be 'function', got {tool.get('type')!r}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _bad(f"{where}.function", "must be an object")
    where += ".function"
    unknown = set(fn) - _FUNCTION_KEYS
    if unknown:
        raise _bad(f"{where}.{min(unknown)}", "unknown field")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(f"{where}.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
    out: dict[str, Any] = {"name": name}
    description = fn.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise _bad(f"{where}.description", "must be a string")
        out["description"] = description
    out["parameters"] = _parameters(fn.get("parameters"), f"{where}.parameters")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(f"{where}.strict", "must be a boolean")
    return out


def _parameters(schema: object, where: str) -> dict:
    """A JSON schema of an object (the arguments). Omitted: no arguments."""
    if schema is None:
        return dict(_EMPTY_PARAMETERS)
    if not isinstance(schema, dict):
        raise _bad(where, "must be a JSON schema object")
    if schema.get("type", "object") != "object":
        raise _bad(
            f"{where}.type", f"arguments are an object: must be 'object', got {schema['type']!r}"
        )
    for key, kind, what in (
        ("properties", dict, "an object"),
        ("required", list, "an array"),
    ):
        if key in schema and not isinstance(schema[key], kind):
            raise _bad(f"{where}.{key}", f"must be {what}")
    required = schema.get("required", [])
    if not all(isinstance(r, str) for r in required):
        raise _bad(f"{where}.required", "must be an array of strings")
    return {"type": "object", **schema} if "type" not in schema else schema


def _choice(value: object, names: set[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise _bad(
                "tool_choice", f"must be 'auto', 'none', 'required' or a function, got {value!r}"
            )
        return value, None
    if not isinstance(value, dict):
        raise _bad("tool_choice", "must be a string or {type: 'function', function: {name}}")
    unknown = set(value) - {"type", "function"}
    if unknown:
        raise _bad(f"tool_choice.{min(unknown)}", "unknown field")
    if value.get("type") != "function":
        raise _bad("tool_choice.type", f"must be 'function', got {value.get('type')!r}")
    fn = value.get("function")
    if not isinstance(fn, dict) or set(fn) != {"name"}:
        raise _bad("tool_choice.function", "must be {name: <one of the tools>}")
    name = fn["name"]
    if name not in names:
        raise _bad("tool_choice.function.name", f"{name!r} is not one of the tools given")
    return "function", name


def check_message_tool_calls(value: object, where: str) -> list[dict]:
    """An assistant message's ``tool_calls`` -> ``[{id, type, function: {name, arguments}}]``
    (arguments kept as sent: JSON text, or an object some clients send)."""
    if not isinstance(value, list):
        raise _bad(where, "must be an array of tool calls")
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise _bad(at, "must be an object")
        unknown = set(call) - _CALL_KEYS
        if unknown:
            raise _bad(f"{at}.{min(unknown)}", "unknown field")
        if call.get("type", "function") != "function":
            raise _bad(f"{at}.type", "must be 'function'")
        cid = call.get("id")
        if cid is not None and not isinstance(cid, str):
            raise _bad(f"{at}.id", "must be a string")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{at}.function", "must be an object with name and arguments")
        unknown = set(fn) - {"name", "arguments"}
        if unknown:
            raise _bad(f"{at}.function.{min(unknown)}", "unknown field")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"{at}.function.name", "must be a non-empty string")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise _bad(f"{at}.function.arguments", "must be a JSON string")
        out.append(
            {"id": cid or "", "type": "function",
             "function": {"name": fn["name"], "arguments": arguments}}
        )
    return out


def has_tool_turns(messages: list[dict] | None) -> bool:
    return bool(messages) and any(
        m.get("role") == "tool" or m.get("tool_calls") for m in messages or []
    )


# -- prompt ---------------------------------------------------------------------------------
def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template reads a ``tools`` variable (Tokenizer.supports_tools)."""
    return bool(getattr(tokenizer, "supports_tools", False))


def render_prompt(
    tokenizer: Any,
    messages: list[dict],
    req: ToolRequest | None,
    parser: ToolParser,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Prompt ids for a chat with tools offered (``req.offered``) and/or tool turns.
    Raises ``InvalidRequestError`` (param ``messages``) if the template refuses them."""
    functions = list(req.functions) if req is not None and req.offered else []
    if template_takes_tools(tokenizer):
        tools = [{"type": "function", "function": f} for f in functions] or None
        return tokenizer.apply_chat_template(
            [_native(m) for m in messages], add_generation_prompt=add_generation_prompt,
            tools=tools,
        )
    return tokenizer.apply_chat_template(
        plain_messages(messages, functions, parser), add_generation_prompt=add_generation_prompt
    )


def chat_prompt_ids(
    tokenizer: Any,
    messages: list[dict],
    tools: object,
    parser_name: str | None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """The ids a chat request's messages (and ``tools``, offered as with ``tool_choice``
    auto) render to, as the chat route renders them (``POST /tokenize``)."""
    req = parse_tool_request(tools)
    if req is None and not has_tool_turns(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    parser = resolve_parser(parser_name, tokenizer)
    return render_prompt(tokenizer, messages, req, parser, add_generation_prompt)


def _native(m: dict) -> dict:
    """A message as tool-aware templates expect it: arguments as objects (they ``tojson``)."""
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        args = c["function"]["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        calls.append({**c, "function": {"name": c["function"]["name"], "arguments": args}})
    return {**m, "tool_calls": calls}


def plain_messages(messages: list[dict], functions: list[dict], parser: ToolParser) -> list[dict]:
    """Messages any template accepts: the tool offer joined to the system message (or a
    new one first), calls written into the assistant's text, consecutive tool results
    merged into one message of ``parser.result_role``."""
    out: list[dict] = []
    rest = messages
    if functions:
        offer = parser.system_prompt(functions)
        first = messages[0]
        if first["role"] in ("system", "developer") and first.get("content"):
            out.append({**first, "content": f"{first['content']}\n\n{offer}"})
            rest = messages[1:]
        elif first["role"] in ("system", "developer"):
            out.append({**first, "content": offer})
            rest = messages[1:]
        else:
            out.append({"role": "system", "content": offer})
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
    results_open = False
    for m in rest:
        role = m["role"]
        if role == "tool":
            body = parser.render_result(m.get("content", ""), names.get(m.get("tool_call_id", "")))
            if results_open:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + body}
            else:
                out.append({"role": parser.result_role, "content": body})
            results_open = True
            continue
        results_open = False
        msg = {k: v for k, v in m.items() if k in ("role", "content", "name")}
        if m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in m["tool_calls"]
            ]
            text = parser.render_calls(calls)
            msg["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        out.append(msg)
    return out


def resolve_parser(name: str | None, tokenizer: Any) -> ToolParser:
    """``name`` (``--tool-call-parser``), or the default for the model's family."""
    if name is None:
        name = default_parser_name(
            str(getattr(tokenizer, "source", "")), getattr(tokenizer, "chat_template", None)
        )
    return get_parser(name)


def constrain(params: SamplingParams, req: ToolRequest) -> SamplingParams:
    """``params`` with the structured spec that forces ``required`` / a named function."""
    spec = req.structured()
    if spec is None:
        return params
    if getattr(params, "structured", None) is not None:
        raise _bad(
            "tool_choice",
            f"{req.choice!r} constrains the output itself: it cannot be combined with "
            "response_format or guided_* fields",
        )
    try:
        return dataclasses.replace(params, structured=spec)  # type: ignore[call-arg]
    except TypeError:  # an engine without structured output
        raise _bad("tool_choice", "this server cannot constrain decoding") from None
    except InvalidRequestError as e:
        raise _bad("tools", f"a function's parameters cannot be enforced: {e}") from None


def prepare_choices(req: Any, tokenizer: Any, parser_name: str | None) -> dict[int, ToolOutput]:
    """The HTTP hook: a chat request (``openai_api.GenerationRequest``) with tools or tool
    turns gets its prompt rendered here (every choice shares it) and, for ``required`` / a
    named function, constrained params. Returns each choice's :class:`ToolOutput` (empty
    when the request has no tools: its output is plain text)."""
    if not req.chat or not req.choices:
        return {}
    tool_req: ToolRequest | None = req.tools
    messages = req.choices[0].messages
    if tool_req is None and not has_tool_turns(messages):
        return {}
    parser = resolve_parser(parser_name, tokenizer)
    ids = render_prompt(tokenizer, messages, tool_req, parser)
    outs: dict[int, ToolOutput] = {}
    for c in req.choices:
        c.prompt, c.messages = ids, None
        if tool_req is not None:
            c.params = constrain(c.params, tool_req)
            outs[c.index] = ToolOutput(tool_req, parser)
    if tool_req is not None and tool_req.structured() is not None:
        req.structured_field = "tools"  # a schema that does not compile is a tool's parameters
    return outs


def prepare_wire(
    msg: dict,
    messages: list[dict] | None,
    params: SamplingParams,
    tokenizer: Any,
    parser_name: str | None,
) -> tuple[list[int] | None, SamplingParams, ToolOutput | None]:
    """The ZeroMQ hook: a ``generate`` message's ``tools`` / ``tool_choice`` /
    ``parallel_tool_calls`` (same meaning as over HTTP). Returns (rendered prompt ids or
    None to keep the request as it is, params, the output reader or None)."""
    tool_req = parse_tool_request(
        msg.get("tools"), msg.get("tool_choice"), msg.get("parallel_tool_calls")
    )
    if tool_req is None and not has_tool_turns(messages):
        return None, params, None
    if messages is None:
        raise _bad("tools", "tools need a chat request (messages), not a prompt")
    parser = resolve_parser(parser_name, tokenizer)
    ids = render_prompt(tokenizer, messages, tool_req, parser)
    if tool_req is None:
        return ids, params, None
    return ids, constrain(params, tool_req), ToolOutput(tool_req, parser)
