"""The ``structured`` spec of a request: its shape, and how OpenAI / vLLM fields map onto it.

A spec is one msgpack-able dict (the shared interface, see docs/serving.md):

    {"type": "json_object"}
    {"type": "json_schema", "schema": {...}, "strict": bool}
    {"type": "regex", "pattern": "..."}
    {"type": "choice", "choices": ["a", "b", ...]}
    {"type": "grammar", "grammar": "<EBNF / GBNF text>"}

This module checks shapes only (cheap, no grammar library): whether a schema, regex or
grammar means anything is decided by compiling it (``engine.structured.compiler``), before
the request is queued. Pure Python: the client SDK imports it too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.sampling import InvalidRequestError

SPEC_TYPES = ("json_object", "json_schema", "regex", "choice", "grammar")
_KEYS = {
    "json_object": {"type"},
    "json_schema": {"type", "schema", "strict"},
    "regex": {"type", "pattern"},
    "choice": {"type", "choices"},
    "grammar": {"type", "grammar"},
}
_REQUIRED = {
    "json_object": set(),
    "json_schema": {"schema"},
    "regex": {"pattern"},
    "choice": {"choices"},
    "grammar": {"grammar"},
}
MAX_CHOICES = 1024  # guided_choice alternatives: each becomes a branch of the grammar
# OpenAI's response_format, vLLM's guided_* extras and their successor structured_outputs,
# in the order a refusal names them.
OPENAI_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar", "structured_outputs")
# OpenAI's rule for json_schema.name.
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_spec(spec: object, param: str = "structured") -> None:
    """Raise ``InvalidRequestError(param=param)`` unless ``spec`` has one of the shapes."""

    def bad(msg: str) -> InvalidRequestError:
        return InvalidRequestError(f"{param}: {msg}", param=param)

    if not isinstance(spec, dict):
        raise bad("must be an object with a 'type'")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise bad(f"type must be one of {list(SPEC_TYPES)}, got {kind!r:.80}")
    unknown = sorted(str(k) for k in spec if k not in _KEYS[kind])
    if unknown:
        raise bad(f"unknown key {unknown[0]!r:.80} for type {kind!r}")
    missing = sorted(_REQUIRED[kind] - set(spec))
    if missing:
        raise bad(f"type {kind!r} needs {missing[0]!r}")
    if kind == "json_schema":
        if not isinstance(spec["schema"], dict):
            raise bad("schema must be a JSON schema object")
        if not isinstance(spec.get("strict", False), bool):
            raise bad("strict must be a boolean")
    elif kind == "regex":
        if not isinstance(spec["pattern"], str) or not spec["pattern"]:
            raise bad("pattern must be a non-empty string")
    elif kind == "choice":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise bad("choices must be a non-empty array of strings")
        if len(choices) > MAX_CHOICES:
            raise bad(f"at most {MAX_CHOICES} choices")
        if any(not isinstance(c, str) or not c for c in choices):
            raise bad("choices must be non-empty strings")
    elif kind == "grammar" and (not isinstance(spec["grammar"], str)
                                or not spec["grammar"].strip()):
        raise bad("grammar must be a non-empty string")


def spec_key(spec: dict) -> str:
    """A canonical text of ``spec``: equal specs compile to the same grammar (cache key)."""
    return json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def spec_from_openai(fields: dict[str, Any], prefix: str = "") -> tuple[dict | None, str | None]:
    """The spec the request's ``response_format`` / ``guided_*`` fields ask for, and the
    field it came from (so a later refusal, e.g. a schema that does not compile, names it);
    ``(None, None)`` when no constraint is asked (``response_format`` ``text``). More than
    one constraint is refused. Fields that are absent or null are not given. ``prefix`` is
    put before field names in errors (the ZeroMQ protocol's ``params.``)."""
    given: list[tuple[str, dict]] = []
    for name in OPENAI_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        spec = _FROM_FIELD[name](value, prefix + name)
        if spec is not None:
            given.append((name, spec))
    if len(given) > 1:
        names = " and ".join(n for n, _ in given)
        raise InvalidRequestError(
            f"{prefix}{given[1][0]}: give one output constraint, not {names}",
            param=prefix + given[1][0])
    if not given:
        return None, None
    name, spec = given[0]
    validate_spec(spec, prefix + name)
    return spec, prefix + name


def _bad(param: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {msg}", param=param)


def _response_format(value: object, param: str) -> dict | None:
    if not isinstance(value, dict):
        raise _bad(param, "must be an object with a 'type'")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if not isinstance(kind, str) or kind not in allowed:
        raise _bad(f"{param}.type", f"must be one of {sorted(allowed)}, got {kind!r:.80}")
    unknown = sorted(str(k) for k in value if k not in allowed[kind])
    if unknown:
        raise _bad(f"{param}.{unknown[0]:.80}", f"unknown field for type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    js = value.get("json_schema")
    where = f"{param}.json_schema"
    if not isinstance(js, dict):
        raise _bad(where, "required: an object {name, schema, strict, description}")
    unknown = sorted(str(k) for k in js if k not in ("name", "schema", "strict", "description"))
    if unknown:
        raise _bad(f"{where}.{unknown[0]:.80}", "unknown field")
    name = js.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise _bad(f"{where}.name", "required: 1-64 letters, digits, '_' or '-'")
    if js.get("description") is not None and not isinstance(js["description"], str):
        raise _bad(f"{where}.description", "must be a string")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(f"{where}.strict", "must be a boolean")
    schema = js.get("schema")
    if schema is None:  # OpenAI allows it absent: then any JSON object
        return {"type": "json_object"}
    if not isinstance(schema, dict):
        raise _bad(f"{where}.schema", "must be a JSON schema object")
    return {"type": "json_schema", "schema": schema, "strict": bool(strict)}


def _guided_json(value: object, param: str) -> dict:
    if isinstance(value, str):  # vLLM accepts the schema as JSON text too
        try:
            value = json.loads(value)
        except ValueError as e:
            raise _bad(param, f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _bad(param, "must be a JSON schema object (or its JSON text)")
    return {"type": "json_schema", "schema": value, "strict": True}


def _guided_regex(value: object, param: str) -> dict:
    if not isinstance(value, str) or not value:
        raise _bad(param, "must be a non-empty string")
    return {"type": "regex", "pattern": value}


def _guided_choice(value: object, param: str) -> dict:
    if not isinstance(value, list) or not value:
        raise _bad(param, "must be a non-empty array of strings")
    return {"type": "choice", "choices": value}


def _guided_grammar(value: object, param: str) -> dict:
    if not isinstance(value, str) or not value.strip():
        raise _bad(param, "must be a non-empty string (EBNF / GBNF with a 'root' rule)")
    return {"type": "grammar", "grammar": value}


def _structured_outputs(value: object, param: str) -> dict:
    """vLLM's newer form: ``{"json" | "regex" | "choice" | "grammar" | "json_object": …}``,
    exactly one of them."""
    if not isinstance(value, dict):
        raise _bad(param, "must be an object with one of json, regex, choice, grammar, "
                          "json_object")
    kinds = {"json": _guided_json, "regex": _guided_regex, "choice": _guided_choice,
             "grammar": _guided_grammar, "json_object": None}
    unknown = sorted(str(k) for k in value if k not in kinds)
    if unknown:
        raise _bad(f"{param}.{unknown[0]:.80}", f"unknown field (one of {sorted(kinds)})")
    given = [k for k in kinds if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise _bad(param, f"give exactly one of {sorted(kinds)}, got {given or 'none'}")
    kind = given[0]
    if kind == "json_object":
        if value[kind] is not True:
            raise _bad(f"{param}.json_object", "must be true")
        return {"type": "json_object"}
    return kinds[kind](value[kind], f"{param}.{kind}")  # type: ignore[misc]


_FROM_FIELD = {
    "response_format": _response_format,
    "guided_json": _guided_json,
    "guided_regex": _guided_regex,
    "guided_choice": _guided_choice,
    "guided_grammar": _guided_grammar,
    "structured_outputs": _structured_outputs,
}
