"""What a tool-call parser produces: whole calls, and the pieces a stream sends."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

__all__ = ["CallDelta", "Delta", "ParsedOutput", "ToolCall", "new_call_id"]


def new_call_id() -> str:
    """``call_`` and 24 random hex digits, as OpenAI's ids look."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class CallDelta:
    """One streamed piece of call ``index``: the first carries ``id`` and ``name`` (and
    ``arguments == ""``), later ones arguments fragments only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        if self.id is not None:
            return {
                "index": self.index,
                "id": self.id,
                "type": "function",
                "function": {"name": self.name, "arguments": self.arguments},
            }
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class Delta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)

    def extend(self, other: Delta) -> None:
        self.content += other.content
        self.calls.extend(other.calls)


@dataclass
class ParsedOutput:
    content: str | None  # None when calls were made and no other text was written
    calls: list[ToolCall]
