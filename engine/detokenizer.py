"""Incremental detokenization with stop strings, for streaming output text.

Technique (as in vLLM and TGI): decoding one token alone is wrong for many tokenizers (a
SentencePiece token loses its leading space, a byte-level token may hold half a
character), and decoding the whole output every step is O(n^2). So each step decodes a
short window that starts a few tokens back, at ``prefix`` — once with and once without the
tokens not yet turned into text (from ``read`` on) — and emits the difference. The window
then moves up. Text ending in U+FFFD means the window ends inside a multi-byte character
(byte-level BPE or byte-fallback tokens), so it is held back until the character completes.

Stop strings are matched on the text, OpenAI-style: output ends just before the first
occurrence, which is not included. Text that could be the start of a stop string is held
back until the next tokens settle it; since emitted text can never be the start of a stop
string, only the held-back text plus the new delta ever needs searching.

Invariant: the deltas (and the final ``flush``) concatenate to ``decode(output ids)`` up to
the first stop string — exactly so for byte-level tokenizers. The window is primed with the
prompt's last tokens (so a SentencePiece first token keeps its leading space, as vLLM does);
for such tokenizers the text is ``decode(prompt_tail + output)`` minus the prompt tail's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

# Prompt tokens that prime the window; enough for any decoder's look-back (vLLM uses 5).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 min_tokens: int = 0) -> None:
        self._tok = tokenizer
        # Stop strings count only once this many ids are generated (vLLM's min_tokens): a
        # match that ends earlier stays in the text.
        self._min_tokens = min_tokens
        self._num_ids = 0
        self._skip = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        context = [int(t) for t in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        # A prompt ending mid-character (prompts may be raw ids) would make the primed text
        # end in U+FFFD, which the next token then replaces: the length-based diff below
        # would lose a character. Drop those tokens from the context instead.
        while context and self._decode(context).endswith(_REPLACEMENT):
            context.pop()
        self._window: list[int] = context  # ids from the prefix offset on
        self._read = len(context)  # window index of the first id not yet turned into text
        self._held = ""  # text decoded but held back: it may be the start of a stop string
        self.text = ""  # all text emitted so far
        self.stopped = False  # a stop string was found; later steps emit nothing
        self.stop_reason: str | None = None  # the stop string that ended the text

    def step(self, new_ids: Sequence[int]) -> tuple[str, bool]:
        """Feed newly generated ids; returns (new text, whether a stop string ended it)."""
        if self.stopped:
            return "", True
        self._window.extend(int(t) for t in new_ids)
        self._num_ids += len(new_ids)
        return self._emit(self._advance(final=False))

    def flush(self) -> str:
        """Release everything held back, at the end of generation (length or EOS).

        If the output truly ends inside a multi-byte character, the U+FFFD that ``decode``
        gives for it is emitted, so the text still equals ``decode(output ids)``.
        """
        if self.stopped:
            return ""
        text, self.stopped = self._emit(self._advance(final=True), final=True)
        return text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _advance(self, final: bool) -> str:
        """New text from the unread ids, moving the window; "" while it is incomplete."""
        if self._read == len(self._window):
            return ""
        prefix_text = self._decode(self._window[: self._read])
        full_text = self._decode(self._window)
        # Shorter or equal: the new ids decoded to nothing yet (a skipped special token, or
        # bytes merging into the previous U+FFFD); wait for more.
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT) and not final):
            return ""
        self._window = self._window[self._read:]
        self._read = len(self._window)
        return full_text[len(prefix_text):]

    def _emit(self, delta: str, final: bool = False) -> tuple[str, bool]:
        text = self._held + delta
        self._held = ""
        if self._stop and text:
            cut, match = -1, None
            if self._num_ids >= self._min_tokens:  # earliest match; the first listed on a tie
                found = [(i, n) for n, i in enumerate(text.find(s) for s in self._stop) if i >= 0]
                if found:
                    cut, n = min(found)
                    match = self._stop[n]
            if cut >= 0:
                self.stopped = True
                self.stop_reason = match
                self.text += text[:cut]
                return text[:cut], True
            if not final:
                hold = self._stop_prefix_len(text)
                if hold:
                    text, self._held = text[:-hold], text[-hold:]
        self.text += text
        return text, False

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that some stop string starts with."""
        for n in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
