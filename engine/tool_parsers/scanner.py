"""Model text -> OpenAI tool calls, whole or streamed token by token.

Every parser here is one scanning machine (:class:`CallStream`) configured by a
:class:`CallFormat`: which markers open and close a block of calls, whether a block may
open with a bare ``{`` / ``[`` at the very start of the output, and what separates calls
inside a block. Inside a block, calls are JSON objects ``{"name": ..., "arguments": {...}}``
(``"parameters"`` is read as ``"arguments"``), alone, several in a row, or in a JSON list.

The machine reads characters once, in order, so feeding a whole text and feeding it token
by token produce the same calls and the same content: the non-streamed response is the
streamed one joined. What a client sees:

* content outside blocks streams as it arrives, except a tail that might be the start of
  a marker, and whitespace next to a block (held back until it turns out to be inside
  content; dropped around a block, and at the end when calls were made);
* a call is *committed* (its id, name and ``arguments: ""`` are sent) once its name is
  known to be one of the offered tools and its arguments are a JSON object (or, for any
  other shape, once the whole call has been read); then the arguments text follows in
  fragments exactly as the model writes it;
* a block that turns out not to be calls before anything in it was committed (no name,
  an unknown tool, broken JSON) is content after all, markers included;
* a block that breaks after a call was committed (cut off by ``max_tokens``, broken JSON)
  cannot be taken back in a stream; :attr:`CallStream.broken` says so, and the whole-text
  parse then returns the text as plain content with no calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.tool_parsers.calls import CallDelta, Delta, ToolCall

__all__ = ["CallFormat", "CallStream"]

_WS = " \t\r\n"
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class CallFormat:
    start: tuple[str, ...] = ()  # markers that open a block anywhere in the text
    end: str | None = None  # marker that closes a block; None: a block runs to its last call
    bare_start: str = ""  # characters that open a block without a marker at the output's start
    separators: str = ","  # between calls of a block that is not a JSON list


class _Malformed(Exception):
    """The text of a block is not calls (raised inside the machine only)."""


class _Reread(_Malformed):
    """The block ended before this character (no end marker): read it again as content."""


class _Value:
    """One JSON value read character by character; ``done`` once it is complete.

    Containers and strings end on their closing character; a number or literal ends at
    the first character that cannot continue it, which it does not consume."""

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.kind = ""  # its first character
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def push(self, ch: str) -> bool:
        """Consume ``ch``; False (and ``done``) if the value ended just before it."""
        if not self.kind:
            self.kind = ch
            if ch in "{[":
                self.depth = 1
            elif ch == '"':
                self.in_string = True
            elif ch in _WS + ",}]:":
                raise _Malformed()
            self.chars.append(ch)
            return True
        if self.kind not in '{["':  # number / true / false / null
            if ch in _WS + ",}]":
                self.done = True
                return False
            self.chars.append(ch)
            return True
        self.chars.append(ch)
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.kind == '"':
                    self.done = True
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                self.done = True
        return True

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def finish(self) -> None:
        """End of text: a number or literal still open is complete."""
        if self.kind and self.kind not in '{["':
            self.done = True


class _CallObject:
    """The top level of one call object ``{"name": ..., "arguments": ...}``, after its
    ``{``. Other keys are read and ignored."""

    def __init__(self) -> None:
        self.state = "key"  # key | key_string | colon | value | after
        self.after_comma = False
        self.key: _Value | None = None
        self.key_name = ""
        self.value: _Value | None = None
        self.name: str | None = None
        self.args: _Value | None = None
        self.done = False

    def push(self, ch: str) -> bool:
        """Consume ``ch`` (False: not consumed, push it again). Raises ``_Malformed``."""
        if self.state == "value":
            assert self.value is not None
            if not self.value.kind and ch in _WS:
                return True
            consumed = self.value.push(ch)
            if self.value.done:
                self._value_done()
            return consumed
        if self.state == "key_string":
            assert self.key is not None
            self.key.push(ch)
            if self.key.done:
                try:
                    self.key_name = json.loads(self.key.text)
                except ValueError:  # a bad escape
                    raise _Malformed() from None
                self.state = "colon"
            return True
        if ch in _WS:
            return True
        if self.state == "key":
            if ch == '"':
                self.key = _Value()
                self.key.push(ch)
                self.state = "key_string"
            elif ch == "}" and not self.after_comma:
                self.done = True
            else:
                raise _Malformed()
        elif self.state == "colon":
            if ch != ":":
                raise _Malformed()
            self.value = _Value()
            self.state = "value"
            if self.key_name in _ARGUMENT_KEYS:
                if self.args is not None:
                    raise _Malformed()  # two argument objects
                self.args = self.value
        elif self.state == "after":
            if ch == ",":
                self.after_comma = True
                self.state = "key"
            elif ch == "}":
                self.done = True
            else:
                raise _Malformed()
        return True

    def _value_done(self) -> None:
        assert self.value is not None
        if self.key_name == "name":
            try:
                name = json.loads(self.value.text)
            except (ValueError, RecursionError):
                raise _Malformed() from None
            if not isinstance(name, str) or self.name is not None:
                raise _Malformed()
            self.name = name
        self.state = "after"
        self.after_comma = False

    def finish(self) -> None:
        if self.state == "value" and self.value is not None:
            self.value.finish()
            if self.value.done:
                self._value_done()

    def arguments(self) -> str:
        """Final arguments as JSON text of an object; raises ``_Malformed`` otherwise."""
        if self.args is None:
            return "{}"
        text = self.args.text
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # nesting deeper than json can read
            raise _Malformed() from None
        if value is None:
            return "{}"
        if isinstance(value, str):  # arguments sent as a JSON string holding the object
            try:
                inner = json.loads(value)
            except (ValueError, RecursionError):
                raise _Malformed() from None
            if not isinstance(inner, dict):
                raise _Malformed()
            return value
        if not isinstance(value, dict):
            raise _Malformed()
        return text


class CallStream:
    """The scanning machine for one output. ``feed`` each new piece of text, then
    ``finish`` once; each returns the :class:`Delta` to send. ``tool_names``: the offered
    tools (a call naming another is not a call); ``max_calls``: calls past it are read
    and dropped (``parallel_tool_calls: false`` keeps the first)."""

    def __init__(
        self,
        fmt: CallFormat,
        tool_names: frozenset[str] | None = None,
        max_calls: int | None = None,
    ) -> None:
        self.fmt = fmt
        self.tool_names = tool_names
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []  # committed calls (arguments final once complete)
        self.content: list[str] = []  # all content sent
        self.broken = False  # a committed call did not complete
        self._pending = ""  # content-mode text not yet decided
        self._held_ws = ""  # whitespace at the end of content, held back
        self._seen_text = False  # any non-whitespace content or block so far
        self._skip_ws = False  # drop whitespace right after a block
        self._finished = False
        # block state
        self._in_block = False
        self._block_raw: list[str] = []  # the block's text, for giving it back as content
        self._block_ws = ""  # whitespace held before the block started
        self._block_committed = False
        self._bstate = ""  # open | item | object | after_object | after_list | end_marker | next
        self._is_list = False
        self._end_matched = 0
        self._obj: _CallObject | None = None
        self._call_index: int | None = None  # index in self.calls of the object being read
        self._args_sent = 0
        self._dropping = False  # reading a call past max_calls

    # -- public -------------------------------------------------------------------------------
    def feed(self, text: str) -> Delta:
        out = Delta()
        if self._finished:
            raise RuntimeError("feed after finish")
        self._pending += text
        self._run(out, final=False)
        return out

    def finish(self) -> Delta:
        out = Delta()
        if self._finished:
            return out
        self._run(out, final=True)
        if self._in_block:
            self._end_of_text_in_block(out)
        if self._pending:
            self._content(out, self._pending)
            self._pending = ""
        if not self.calls and self._held_ws:  # no calls: the text is kept exactly
            self._emit(out, self._held_ws)
        self._held_ws = ""
        self._finished = True
        return out

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    # -- content mode -------------------------------------------------------------------------
    def _run(self, out: Delta, final: bool) -> None:
        while self._pending:
            if self._in_block:
                if not self._block_step(out):
                    return
                continue
            text = self._pending
            if self.fmt.bare_start and not self._seen_text:
                stripped = text.lstrip(_WS)
                if not stripped:
                    self._held_ws += text
                    self._pending = ""
                    return
                lead = text[: len(text) - len(stripped)]
                if stripped[0] in self.fmt.bare_start:
                    self._held_ws += lead
                    self._pending = stripped
                    self._open_block(bare=True)
                    continue
            at, marker = self._find_marker(text)
            if marker:
                self._content(out, text[:at])
                self._pending = text[at + len(marker) :]
                self._open_block(bare=False, marker=marker)
                continue
            keep = 0 if final else self._partial_marker(text)
            self._content(out, text[: len(text) - keep])
            self._pending = text[len(text) - keep :]
            return

    def _find_marker(self, text: str) -> tuple[int, str]:
        best, found = -1, ""
        for m in self.fmt.start:
            i = text.find(m)
            if i >= 0 and (best < 0 or i < best):
                best, found = i, m
        return best, found

    def _partial_marker(self, text: str) -> int:
        """Length of the longest tail of ``text`` that could begin a start marker."""
        keep = 0
        for m in self.fmt.start:
            for n in range(min(len(m) - 1, len(text)), keep, -1):
                if text.endswith(m[:n]):
                    keep = n
                    break
        return keep

    def _content(self, out: Delta, text: str) -> None:
        if not text:
            return
        if self._skip_ws:
            text = text.lstrip(_WS)
            if not text:
                return
            self._skip_ws = False
        body = text.rstrip(_WS)
        if body:
            self._emit(out, self._held_ws + body)
            self._held_ws = text[len(body) :]
            self._seen_text = True
        else:
            self._held_ws += text

    def _emit(self, out: Delta, text: str) -> None:
        out.content += text
        self.content.append(text)

    # -- blocks -------------------------------------------------------------------------------
    def _open_block(self, bare: bool, marker: str = "") -> None:
        self._in_block = True
        self._seen_text = True
        self._block_raw = [marker]
        self._block_ws, self._held_ws = self._held_ws, ""
        self._block_committed = False
        self._bstate = "open"
        self._is_list = False
        self._end_matched = 0
        self._obj = None

    def _block_step(self, out: Delta) -> bool:
        """Read the pending text into the block; False when it is all consumed."""
        i = 0
        text = self._pending
        try:
            while i < len(text):
                ch = text[i]
                if self._block_char(ch, out):
                    self._block_raw.append(ch)
                    i += 1
                if not self._in_block:  # the block ended (its end marker was read)
                    self._pending = text[i:]
                    self._skip_ws = True
                    return True
        except _Reread:
            self._pending = text[i:]
            self._skip_ws = True
            return True
        except _Malformed:
            self._give_back(out, text, i)
            return True
        self._pending = ""
        self._send_arguments(out)
        return False

    def _block_char(self, ch: str, out: Delta) -> bool:
        """One character inside a block; False if it was not consumed (push it again)."""
        st = self._bstate
        if st == "object":
            assert self._obj is not None
            consumed = self._obj.push(ch)
            if self._obj.name is not None and self._call_index is None and not self._dropping:
                self._maybe_commit(out, complete=False)
            if self._obj.done:
                self._object_done(out)
            return consumed
        if st == "end_marker":
            end = self.fmt.end
            assert end is not None
            if ch != end[self._end_matched]:
                raise _Malformed()
            self._end_matched += 1
            if self._end_matched == len(end):
                self._close_block()
            return True
        if ch in _WS:
            return True
        if st == "open":
            if ch == "[":
                self._is_list = True
                self._bstate = "item_or_close"
            elif ch == "{":
                self._start_object()
            else:
                raise _Malformed()
        elif st in ("item_or_close", "item"):
            if ch == "{":
                self._start_object()
            elif ch == "]" and st == "item_or_close":
                self._bstate = "after_list"
            else:
                raise _Malformed()
        elif st == "after_object":
            if self._is_list:
                if ch == ",":
                    self._bstate = "item"
                elif ch == "]":
                    self._bstate = "after_list"
                else:
                    raise _Malformed()
            elif ch in self.fmt.separators:
                self._bstate = "next"
            elif ch == "{":
                self._start_object()
            else:
                self._end_or_stop(ch)
        elif st == "next":
            if ch != "{":
                raise _Malformed()
            self._start_object()
        elif st == "after_list":
            self._end_or_stop(ch)
        return True

    def _end_or_stop(self, ch: str) -> None:
        end = self.fmt.end
        if end is not None:
            if ch != end[0]:
                raise _Malformed()
            self._bstate = "end_marker"
            self._end_matched = 1
            if len(end) == 1:
                self._close_block()
            return
        # No end marker: the block ended with its last call; the rest is content.
        self._close_block()
        raise _Reread()

    def _start_object(self) -> None:
        self._obj = _CallObject()
        self._bstate = "object"
        self._call_index = None
        self._args_sent = 0
        self._dropping = self.max_calls is not None and len(self.calls) >= self.max_calls

    def _maybe_commit(self, out: Delta, complete: bool) -> None:
        obj = self._obj
        assert obj is not None and obj.name is not None
        if self.tool_names is not None and obj.name not in self.tool_names:
            raise _Malformed()
        streamable = obj.args is not None and obj.args.kind == "{"
        if not (streamable or complete):
            return
        call = ToolCall(obj.name, "")
        self._call_index = len(self.calls)
        self.calls.append(call)
        self._block_committed = True
        out.calls.append(CallDelta(self._call_index, call.id, call.name, ""))

    def _send_arguments(self, out: Delta) -> None:
        obj = self._obj
        if obj is None or self._call_index is None or obj.args is None or obj.args.kind != "{":
            return
        chars = obj.args.chars
        if len(chars) > self._args_sent:
            piece = "".join(chars[self._args_sent :])
            self._args_sent = len(chars)
            self._args_delta(out, piece)

    def _args_delta(self, out: Delta, piece: str) -> None:
        assert self._call_index is not None
        self.calls[self._call_index].arguments += piece
        last = out.calls[-1] if out.calls else None
        if last is not None and last.index == self._call_index and last.id is None:
            last.arguments += piece  # an earlier fragment of this feed
        else:
            out.calls.append(CallDelta(self._call_index, arguments=piece))

    def _object_done(self, out: Delta) -> None:
        obj = self._obj
        assert obj is not None
        if self._dropping:
            self._bstate = "after_object"
            return
        if obj.name is None:
            raise _Malformed()
        arguments = obj.arguments()  # raises _Malformed: before commit, it was not a call
        if self._call_index is None:
            self._maybe_commit(out, complete=True)
            self._args_delta(out, arguments)
        else:
            self._send_arguments(out)
        self._bstate = "after_object"

    def _close_block(self) -> None:
        self._in_block = False
        self._obj = None

    def _give_back(self, out: Delta, text: str, i: int) -> None:
        """The block is not calls from character ``i`` of ``text`` on."""
        self._in_block = False
        self._obj = None
        if self._block_committed:
            # Calls already sent stand; what follows is shown as it was written.
            self.broken = True
            self._pending = text[i:]
            return
        raw = "".join(self._block_raw) + text[i : i + 1]
        self._emit(out, self._held_ws_for_give_back() + raw)
        self._seen_text = True
        self._pending = text[i + 1 :]

    def _held_ws_for_give_back(self) -> str:
        ws, self._block_ws = self._block_ws, ""
        return ws

    def _end_of_text_in_block(self, out: Delta) -> None:
        obj = self._obj
        complete_states = ("after_object", "after_list", "end_marker")
        try:
            if self._bstate == "object" and obj is not None:
                obj.finish()
                if not obj.done:
                    raise _Malformed()
                self._object_done(out)
            elif self._bstate not in complete_states:
                raise _Malformed()
        except _Malformed:
            if self._block_committed:
                self.broken = True
            else:
                self._emit(out, self._held_ws_for_give_back() + "".join(self._block_raw))
        self._in_block = False
        self._obj = None
