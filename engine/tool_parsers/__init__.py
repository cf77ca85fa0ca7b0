"""Tool-call parsers, chosen by name (``fastserve serve --tool-call-parser NAME``).

Built in: ``hermes``, ``llama3_json``, ``smollm2``. Others install as plugins under the
``fastserve.tool_parsers`` entry-point group (a :class:`ToolParser` subclass).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from engine.tool_parsers.base import ToolParser
from engine.tool_parsers.calls import CallDelta, Delta, ParsedOutput, ToolCall, new_call_id
from engine.tool_parsers.hermes import HermesParser
from engine.tool_parsers.llama3_json import Llama3JsonParser
from engine.tool_parsers.scanner import CallFormat, CallStream
from engine.tool_parsers.smollm2 import SmolLM2Parser

__all__ = [
    "CallDelta",
    "CallFormat",
    "CallStream",
    "Delta",
    "ParsedOutput",
    "ToolCall",
    "ToolParser",
    "UnknownToolParserError",
    "available",
    "default_parser_name",
    "get_parser",
    "new_call_id",
]

GROUP = "fastserve.tool_parsers"
BUILTIN: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, SmolLM2Parser)
}


class UnknownToolParserError(ValueError):
    pass


def available() -> list[str]:
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group=GROUP)})


def get_parser(name: str) -> ToolParser:
    cls = BUILTIN.get(name)
    if cls is None:
        matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
        if not matches:
            raise UnknownToolParserError(
                f"no tool-call parser named {name!r}; available: {', '.join(available())}"
            )
        cls = matches[0].load()
    return cls()


def default_parser_name(source: str, chat_template: str | None) -> str:
    """The parser for a model's family, from its path and chat template: SmolLM2's list
    format for SmolLM2, Llama-3 JSON for Llama 3 templates, Hermes otherwise (the format
    most ChatML tool fine-tunes use)."""
    src = source.lower()
    template = chat_template or ""
    if "smollm2" in src or ("SmolLM" in template and "smollm3" not in src):
        return "smollm2"
    if "<|python_tag|>" in template or "<|start_header_id|>" in template or "llama-3" in src:
        return "llama3_json"
    return "hermes"
