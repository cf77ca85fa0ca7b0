"""Specs -> compiled xgrammar grammars, in the engine process, off the event loop, cached.

Compiling a JSON schema into a token-level automaton takes milliseconds to seconds (it
precomputes which vocabulary tokens each grammar position admits), so it never runs on
the event loop: requests await a small thread pool. Compiled grammars are immutable and
shared by every job with an equal spec (an LRU keyed by the spec's canonical text), and
concurrent requests for one spec wait on a single compilation.

xgrammar needs the model's vocabulary as the bytes each token stands for
(``TokenizerInfo``). It is built once per engine, lazily on the first constrained request,
from the engine's own tokenizer, sized to the model's logits (``vocab_size``: a padded
lm_head has more rows than the tokenizer has tokens; those ids are never allowed), with
the model's EOS ids as the tokens that end a grammar.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.sampling import InvalidRequestError
from engine.structured.spec import spec_key, validate_spec

log = logging.getLogger("fastserve.structured")


class GrammarCompiler:
    """Compiles ``structured`` specs for one model's tokenizer (see the module docstring).

    ``compile`` raises ``InvalidRequestError(param="structured")`` for a schema, regex or
    grammar that does not compile; nothing else about the engine changes.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        *,
        any_whitespace: bool = False,
        cache_size: int = 256,
        threads: int = 1,
    ) -> None:
        self.tokenizer = tokenizer  # engine.tokenizer.Tokenizer
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self.any_whitespace = any_whitespace
        self.cache_size = cache_size
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grammar")
        self._lock = threading.Lock()  # guards the lazily built xgrammar objects
        self._info: Any = None
        self._xgr_compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self.num_compiled = 0  # compilations run (cache misses), for tests and stats

    # -- the vocabulary ---------------------------------------------------------------------
    def tokenizer_info(self) -> Any:
        """xgrammar's view of the vocabulary, built once (thread-safe)."""
        with self._lock:
            if self._info is None:
                self._info = build_tokenizer_info(
                    self.tokenizer, self.vocab_size, self.stop_token_ids)
            return self._info

    def _compiler(self) -> Any:
        info = self.tokenizer_info()
        with self._lock:
            if self._xgr_compiler is None:
                import xgrammar as xgr

                # xgrammar's own cache is off: ours is bounded by entries and keyed by spec.
                self._xgr_compiler = xgr.GrammarCompiler(
                    info, max_threads=self.threads, cache_enabled=False)
            return self._xgr_compiler

    # -- compiling --------------------------------------------------------------------------
    async def compile(self, spec: dict) -> Any:
        """The compiled grammar of ``spec`` (cached); compiled in the thread pool."""
        validate_spec(spec)
        try:
            key = spec_key(spec)
        except (TypeError, ValueError) as e:  # e.g. bytes in a schema sent over msgpack
            raise InvalidRequestError(f"structured: not JSON data: {e}", "structured") from None
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        pending = self._pending.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._pool, self.compile_sync, spec)
            self._pending[key] = pending
            pending.add_done_callback(lambda fut, key=key: self._done(key, fut))
        # shield: one caller giving up (client gone) must not cancel the others' compilation.
        return await asyncio.shield(pending)

    def _done(self, key: str, fut: asyncio.Future) -> None:
        self._pending.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        self._cache[key] = fut.result()
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def compile_sync(self, spec: dict) -> Any:
        """Compile now, in this thread (no cache)."""
        compiler = self._compiler()
        kind = spec["type"]
        self.num_compiled += 1
        try:
            if kind == "json_object":  # an object with any keys and values, spaced as JSON schemas
                return compiler.compile_json_schema(
                    {"type": "object"}, any_whitespace=self.any_whitespace, strict_mode=False)
            if kind == "json_schema":
                return compiler.compile_json_schema(
                    spec["schema"], any_whitespace=self.any_whitespace, strict_mode=True)
            if kind == "regex":
                return compiler.compile_regex(spec["pattern"])
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec["choices"]))
            return compiler.compile_grammar(spec["grammar"])
        except Exception as e:  # noqa: BLE001 -- xgrammar's refusals are of several types
            what = {"json_schema": "JSON schema", "regex": "regex", "choice": "choices",
                    "grammar": "grammar", "json_object": "JSON grammar"}[kind]
            detail = " ".join(str(e).split())[:500]
            raise InvalidRequestError(f"structured: invalid {what}: {detail}",
                                      "structured") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable() and ch != "\x7f":
            out.append(ch)
        else:  # newlines, tabs, other control and unassigned characters
            out.append(f"\\U{ord(ch):08x}" if ord(ch) > 0xFFFF else f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


def build_tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's ``TokenizerInfo`` for the engine's tokenizer.

    xgrammar reads the vocabulary of the Hugging Face tokenizer and decides how its token
    strings encode bytes (byte-level BPE such as SmolLM2's ``Ġworld``, byte fallback such
    as Llama-2's ``<0x0A>``, or raw). ``tests/unit/test_structured_output.py`` checks the
    decoded bytes of every token against the engine's own ``Tokenizer.token_bytes``.
    """
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(
        tokenizer.hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None)
