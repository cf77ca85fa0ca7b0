"""The tool-call parser interface: one object per format, shared by all requests.

A parser has two sides:

* **output**: :meth:`ToolParser.stream` gives a fresh :class:`CallStream` for one
  generation (stream deltas); :meth:`ToolParser.parse` reads a whole text. Both read the
  format in :attr:`ToolParser.format`.
* **prompt**, used only when the model's chat template cannot take ``tools`` itself:
  the system text that offers the tools and teaches the call format, and how earlier
  calls and their results are written back into the conversation in that format.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import ClassVar

from engine.tool_parsers.calls import ParsedOutput
from engine.tool_parsers.scanner import CallFormat, CallStream

__all__ = ["ToolParser", "arguments_json", "functions_json", "parse_text"]


class ToolParser(ABC):
    """Subclasses set ``name`` and ``format`` and write the prompt side."""

    name: ClassVar[str]
    format: ClassVar[CallFormat]

    # -- output -------------------------------------------------------------------------------
    def stream(
        self, tool_names: frozenset[str] | None = None, max_calls: int | None = None
    ) -> CallStream:
        return CallStream(self.format, tool_names, max_calls)

    def parse(
        self, text: str, tool_names: frozenset[str] | None = None, max_calls: int | None = None
    ) -> ParsedOutput:
        """Calls in a whole output (see :func:`parse_text`)."""
        return parse_text(self.format, text, tool_names, max_calls)

    # -- prompt -------------------------------------------------------------------------------
    @abstractmethod
    def system_prompt(self, functions: list[dict]) -> str:
        """Text added to the system message offering ``functions`` (OpenAI function
        objects: name, description, parameters) and the format to call them in."""

    @abstractmethod
    def render_calls(self, calls: list[dict]) -> str:
        """An assistant turn's calls (``[{name, arguments: dict | str}]``) as the model
        writes them."""

    def render_result(self, content: str, name: str | None) -> str:
        """A tool's result as the text of the message that carries it back."""
        return f"<tool_response>\n{content}\n</tool_response>"

    # Role of the message carrying results back: "user" is accepted by every template
    # (a template without tool support may refuse a "tool" role).
    result_role: ClassVar[str] = "user"


def parse_text(
    fmt: CallFormat,
    text: str,
    tool_names: frozenset[str] | None = None,
    max_calls: int | None = None,
) -> ParsedOutput:
    """Calls in a whole output. Text that is not calls is content; if a call starts but
    never completes (cut off, broken JSON) the whole text is content, with no calls."""
    s = CallStream(fmt, tool_names, max_calls)
    content = s.feed(text).content + s.finish().content
    if s.broken:
        return ParsedOutput(text, [])
    if s.calls and not content:
        return ParsedOutput(None, s.calls)
    return ParsedOutput(content, s.calls)


def arguments_json(arguments: object) -> str:
    """Arguments as JSON text: a dict is dumped; a string holding JSON is kept as is; any
    other string is dumped as a JSON string (a client may echo back what it got)."""
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return json.dumps(arguments, ensure_ascii=False)
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def functions_json(functions: list[dict]) -> str:
    """One function signature per line, as JSON."""
    return "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
