"""One choice's generated text -> OpenAI content and ``tool_calls`` (engine/server/tools.py
explains the whole feature). Pure, no I/O.

``auto`` output is read by the parser's format; ``required`` output is a bare JSON list of
``{name, arguments}`` (forced by its schema) read by the same machine; a named function's
output is its arguments object itself; ``none`` passes text through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.tool_parsers import CallDelta, CallFormat, CallStream, Delta, ToolCall, ToolParser
from engine.tool_parsers.base import parse_text

if TYPE_CHECKING:
    from engine.server.tools import ToolRequest

__all__ = ["ToolOutput", "finish_response", "stream_choices", "wire_output"]

# ``required`` decodes a bare JSON list of calls; it is read by the same machine.
_REQUIRED_FORMAT = CallFormat(bare_start="[", end=None)


class ToolOutput:
    """One choice's text -> content and tool calls. Feed every text increment (``feed``),
    then ``finish`` once; or hand the whole text to ``final``."""

    def __init__(self, req: ToolRequest, parser: ToolParser) -> None:
        self.req = req
        self.parser = parser
        self.mode = "parse" if req.choice == "auto" else req.choice  # parse|none|required|function
        max_calls = None if req.parallel else 1
        self._stream: CallStream | None = None
        if self.mode == "parse":
            self._stream = parser.stream(req.names, max_calls)
        elif self.mode == "required":
            self._stream = CallStream(_REQUIRED_FORMAT, req.names, max_calls)
        self._call: ToolCall | None = None  # the named function's call, once started
        self._final_calls: int | None = None  # set by final()

    @property
    def num_calls(self) -> int:
        if self._final_calls is not None:
            return self._final_calls
        if self._stream is not None:
            return self._stream.num_calls
        return int(self._call is not None)

    def feed(self, text: str) -> Delta:
        if self._stream is not None:
            return self._stream.feed(text)
        if self.mode == "none":
            return Delta(content=text)
        return self._named(text)

    def finish(self) -> Delta:
        if self._stream is not None:
            return self._stream.finish()
        if self.mode == "function" and self._call is None:
            return self._named("", force=True)
        return Delta()

    def _named(self, text: str, force: bool = False) -> Delta:
        """The output is the arguments object itself (leading whitespace dropped)."""
        out = Delta()
        if self._call is None:
            text = text.lstrip()
            if not text and not force:
                return out
            assert self.req.function is not None
            self._call = ToolCall(self.req.function, "")
            out.calls.append(CallDelta(0, self._call.id, self._call.name, ""))
        if text:
            self._call.arguments += text
            out.calls.append(CallDelta(0, arguments=text))
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        """``tool_calls`` for a natural end with calls made (a cut-off keeps ``length``)."""
        if reason == "stop" and self.num_calls:
            return "tool_calls"
        return reason

    def final(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, tool_calls) of the whole text."""
        if self.mode == "none":
            return text, None
        if self.mode == "function":
            assert self.req.function is not None
            call = ToolCall(self.req.function, text.strip())
            self._call = call
            return None, [call.to_openai()]
        fmt = self.parser.format if self.mode == "parse" else _REQUIRED_FORMAT
        parsed = parse_text(fmt, text, self.req.names, None if self.req.parallel else 1)
        self._final_calls = len(parsed.calls)
        if not parsed.calls:
            return parsed.content if parsed.content is not None else "", None
        return parsed.content, [c.to_openai() for c in parsed.calls]


# -- response shapes ------------------------------------------------------------------------
def stream_choices(
    tool_out: ToolOutput,
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: Any,
    stop_reason: int | str | None = None,
) -> list[dict]:
    """The chat chunk choices for one engine output (``finish_reason`` set on the last
    output): content and each call piece in its own chunk, as OpenAI sends them, and the
    finish reason in a last chunk with an empty delta."""
    delta = tool_out.feed(text)
    if finish_reason is not None:
        delta.extend(tool_out.finish())
    pieces: list[dict] = []
    if delta.content:
        pieces.append({"content": delta.content})
    pieces.extend({"tool_calls": [c.to_openai()]} for c in delta.calls)
    if logprobs is not None and not pieces:
        pieces.append({})
    choices = [
        {
            "index": index,
            "delta": d,
            "logprobs": logprobs if i == 0 else None,
            "finish_reason": None,
            "stop_reason": None,
        }
        for i, d in enumerate(pieces)
    ]
    if finish_reason is not None:
        choices.append(
            {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": tool_out.finish_reason(finish_reason),
                "stop_reason": stop_reason,
            }
        )
    return choices


def finish_response(body: dict, outs: dict[int, ToolOutput]) -> dict:
    """A non-streamed chat response with each choice's text read for calls."""
    for choice in body["choices"]:
        tool_out = outs.get(choice["index"])
        if tool_out is None:
            continue
        message = choice["message"]
        content, calls = tool_out.final(message.get("content") or "")
        message["content"] = content
        if calls:
            message["tool_calls"] = calls
        choice["finish_reason"] = tool_out.finish_reason(choice["finish_reason"])
    return body


def wire_output(msg: dict, tool_out: ToolOutput) -> dict:
    """A ZeroMQ ``output`` message with its text read for calls: ``text`` is content only,
    ``tool_calls`` the call deltas (OpenAI's streaming shape) or None."""
    delta = tool_out.feed(msg.get("text") or "")
    if msg.get("finished"):
        delta.extend(tool_out.finish())
        msg["finish_reason"] = tool_out.finish_reason(msg.get("finish_reason"))
    msg["text"] = delta.content
    msg["tool_calls"] = [c.to_openai() for c in delta.calls] or None
    return msg
