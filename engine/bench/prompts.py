"""Prompt text of an exact token length for a target's tokenizer.

A prompt is a run of common English words, each of which the tokenizer encodes as one
token after a space (checked once per tokenizer); the run starts at a different word for
each prompt so no two prompts of one length share a long prefix. Each prompt is encoded
once more to confirm its length and trimmed or extended by the difference, so the count
is exact for any tokenizer whose pre-tokenizer splits on spaces (byte-level BPE,
SentencePiece) and within a token or two otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "by", "at", "from", "his", "that", "this", "it", "be", "or", "an", "have", "had", "not", "but", "what", "all", "were", "when", "we", "there", "can", "more", "if", "no", "out", "so", "said", "time", "up", "about", "many", "then", "them", "these", "some", "her", "would", "make", "like", "him", "into", "has", "two", "look", "way", "could", "people", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "over", "new", "sound", "take", "only", "little", "work", "know", "place", "year", "live", "me", "back", "give", "most", "very", "after", "thing", "our", "just", "name", "good", "sentence", "man", "think", "say", "great", "where", "help", "through", "much", "before", "line", "right", "too", "mean", "old", "any", "same", "tell", "boy", "follow", "came", "want", "show", "also", "around", "form", "three", "small", "set", "put", "end", "does", "another", "well", "large", "must", "big", "even", "such", "because", "turn", "here", "why", "ask", "went", "men", "read", "need", "land", "different", "home", "us", "move", "try", "kind", "hand", "picture", "again", "change", "off", "play", "spell", "air", "away", "animal", "house", "point", "page", "letter", "mother", "answer", "found", "study", "still", "learn", "should", "world", "high", "every", "near", "add", "food", "between", "own", "below", "country", "plant", "last", "school", "father", "keep", "tree", "never", "start", "city", "earth", "eye", "light", "thought", "head", "under", "story", "saw", "left", "few", "while", "along", "might", "close", "something", "seem", "next", "hard", "open", "example", "begin", "life", "always", "those", "both", "paper", "together", "got", "group", "often", "run"]

Encode = Callable[[str], list[int]]
MIN_WORDS = 20


class PromptBuilder:
    """``text(n, index)``: a prompt that ``encode`` turns into ``n`` tokens (special tokens
    the encoder adds, such as BOS, included, since the server counts them too)."""

    def __init__(self, encode: Encode, max_fix_rounds: int = 4) -> None:
        self.encode = encode
        self.max_fix_rounds = max_fix_rounds
        self.overhead = len(encode(""))  # special tokens (BOS) the encoder adds
        one = 1 + self.overhead

        def single(w: str) -> bool:
            return len(encode(w)) == one and len(encode(" " + w)) == one

        words = [w for w in WORDS if single(w)]
        if len(words) < MIN_WORDS:  # a tiny vocabulary: single letters still are one token
            words += [c for c in "abcdefghijklmnopqrstuvwxyz" if single(c)]
        self.words = words or list(WORDS)

    def _run(self, start: int, count: int) -> str:
        w = self.words
        return " ".join(w[(start + i) % len(w)] for i in range(max(1, count)))

    def text(self, n: int, index: int = 0) -> str:
        """A prompt of ``n`` tokens (at least one word even if ``n`` is below the
        encoder's own overhead)."""
        if n < 1:
            raise ValueError(f"a prompt needs >= 1 token, got {n}")
        start = (index * 7919) % len(self.words)
        count = n - self.overhead
        text = self._run(start, count)
        for _ in range(self.max_fix_rounds):
            got = len(self.encode(text))
            if got == n or count <= 1 and got > n:
                break
            count = max(1, count + n - got)
            text = self._run(start, count)
        return text
