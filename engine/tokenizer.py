"""Tokenizer: encode/decode and the chat template, for an HF model directory or a GGUF file.

A thin layer over ``transformers``' tokenizer that gives the engine one small surface:
token ids in and out, special-token ids, and chat messages → prompt ids (validated, so a
malformed request is a 400, never a 500).

A GGUF file embeds its tokenizer as metadata; ``transformers`` converts it to a fast
tokenizer, which takes seconds (it parses the whole file). The converted tokenizer is
saved to a cache keyed by the file's path, size and mtime, so later loads take ~0.1 s. Any
problem with the cache falls back to the full conversion.

Decoding goes straight to the Rust ``tokenizers`` backend with no "clean up tokenization
spaces" pass: that pass is not prefix-stable, and the incremental detokenizer relies on
``decode(a + b)`` starting with ``decode(a)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from engine.sampling import InvalidRequestError

log = logging.getLogger("fastserve.tokenizer")

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerLoadError", "default_cache_dir"]

# A template that mentions ``tools`` takes them (``{% if tools %}``, ``tools | tojson``).
_TOOLS_VAR = re.compile(r"\btools\b")

# Bumped when the cached layout or what we store changes; old entries are then ignored.
_CACHE_FORMAT = 1
_CACHE_MARKER = "fastserve-tokenizer.json"


class TokenizerLoadError(Exception):
    """The tokenizer files are missing, unreadable or corrupt."""


class Tokenizer:
    """Encode/decode and chat template of one model. Build with :meth:`load`."""

    def __init__(self, hf: Any, source: str) -> None:
        self.hf = hf
        self.source = source
        # The Rust tokenizer, when there is one: decoding through it skips Python-level
        # post-processing (see the module docstring) and is much cheaper per call.
        self._backend = getattr(hf, "backend_tokenizer", None)
        self.vocab_size: int = len(hf)
        eos = hf.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset() if eos is None else frozenset([int(eos)])
        self.bos_token_id: int | None = None if hf.bos_token_id is None else int(hf.bos_token_id)
        template = getattr(hf, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one is the chat one
            template = template.get("default")
        self.chat_template: str | None = template or None
        self._byte_decoder = _byte_level_decoder(self._backend)
        self._special_ids = frozenset(int(t) for t in hf.all_special_ids)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, *, cache_dir: str | None = None, use_cache: bool = True) -> Tokenizer:
        """Load from an HF model directory or a ``.gguf`` file.

        ``cache_dir`` (default: :func:`default_cache_dir`) holds tokenizers converted from
        GGUF files; ``use_cache=False`` always converts.
        """
        resolved = os.path.abspath(os.path.expanduser(path))
        if os.path.isdir(resolved):
            return cls(_from_pretrained(resolved, path), resolved)
        if not os.path.isfile(resolved):
            raise TokenizerLoadError(f"tokenizer path {path!r} does not exist")
        if not resolved.endswith(".gguf"):
            raise TokenizerLoadError(f"{path!r} is neither a model directory nor a .gguf file")
        if not use_cache:
            return cls(_from_gguf(resolved, path), resolved)
        entry = _cache_entry(resolved, cache_dir or default_cache_dir())
        hf = _load_cached(entry)
        if hf is None:
            hf = _from_gguf(resolved, path)
            _store_cached(hf, entry)
        return cls(hf, resolved)

    # -- ids <-> text -----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids the tokenizer does not know (model vocab padding) decode to ""."""
        ids = [int(t) for t in ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Raw vocabulary strings (e.g. ``'Ġworld'``), not text."""
        return list(self.hf.convert_ids_to_tokens([int(t) for t in ids]))

    def token_to_text(self, token_id: int) -> str:
        """Text of one token as a logprob entry shows it; a token holding part of a
        multi-byte character decodes to U+FFFD (use :meth:`token_bytes` for its bytes)."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token contributes (OpenAI's ``bytes`` field of a logprob).

        Exact for byte-level BPE and for ``<0xNN>`` byte-fallback tokens; otherwise the
        UTF-8 encoding of :meth:`token_to_text`.
        """
        token = self.hf.convert_ids_to_tokens(int(token_id))
        if isinstance(token, str):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                try:
                    return bytes([int(token[3:5], 16)])
                except ValueError:
                    pass
            if self._byte_decoder is not None and int(token_id) not in self._special_ids:
                try:
                    return bytes(self._byte_decoder[c] for c in token)
                except KeyError:  # an added token, stored as plain text
                    pass
        return self.token_to_text(token_id).encode("utf-8")

    # -- chat -------------------------------------------------------------------------------
    @property
    def supports_tools(self) -> bool:
        """Whether the chat template reads a ``tools`` variable (tool-calling templates do;
        for others the server writes the tools into the system message itself)."""
        return self.chat_template is not None and bool(_TOOLS_VAR.search(self.chat_template))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for chat ``messages`` ({role: str, content: str | [text parts]}, and
        ``tool_calls`` / ``tool_call_id`` passed through); ``tools`` go to the template."""
        if self.chat_template is None:
            raise InvalidRequestError(
                "messages: this model has no chat template; send a plain prompt instead",
                param="messages")
        normalized = _normalize_messages(messages)
        try:
            extra = {"tools": tools} if tools else {}
            text = self.hf.apply_chat_template(
                normalized, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
        except Exception as e:  # noqa: BLE001 -- the template's own raise_exception(), or a type it chokes on
            raise InvalidRequestError(f"messages: the chat template rejected them: {e}",
                                      param="messages") from None
        if not isinstance(text, str):  # some versions return a list for batched input
            raise InvalidRequestError("messages: the chat template did not render to text",
                                      param="messages")
        # The template writes BOS etc. itself; adding them again would double them.
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _normalize_messages(messages: object) -> list[dict]:
    def bad(msg: str) -> InvalidRequestError:
        return InvalidRequestError(f"messages: {msg}", param="messages")

    if not isinstance(messages, list) or not messages:
        raise bad("must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"item {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise bad(f"item {i}: role must be a non-empty string")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise bad(f"item {i}: only text content parts ({{type: 'text', text: str}}) "
                              "are supported")
                texts.append(part["text"])
            # Most templates expect a string; vLLM joins text parts the same way.
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise bad(f"item {i}: content must be a string or a list of text parts")
        item = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            item["name"] = m["name"]
        if isinstance(m.get("tool_calls"), list):
            item["tool_calls"] = m["tool_calls"]
        if isinstance(m.get("tool_call_id"), str):
            item["tool_call_id"] = m["tool_call_id"]
        out.append(item)
    return out


def _byte_level_decoder(backend: Any) -> dict[str, int] | None:
    """GPT-2's printable-char → byte table, when the tokenizer decodes byte-level BPE."""
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# -- loading helpers ------------------------------------------------------------------------
def _from_pretrained(directory: str, shown: str) -> Any:
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(directory, n)) for n in names):
        raise TokenizerLoadError(f"model directory {shown!r} has no tokenizer files "
                                 "(tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:
        raise TokenizerLoadError(f"cannot load the tokenizer in {shown!r}: {e}") from e


def _from_gguf(file: str, shown: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            os.path.dirname(file), gguf_file=os.path.basename(file), local_files_only=True)
    except Exception as e:
        raise TokenizerLoadError(f"cannot read a tokenizer from GGUF file {shown!r}: {e}") from e


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastserve", "tokenizers")


def _cache_key(file: str) -> dict:
    import tokenizers
    import transformers

    st = os.stat(file)
    # Library versions are part of the key: a newer converter may produce a different tokenizer.
    return {"format": _CACHE_FORMAT, "path": os.path.realpath(file), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}


def _cache_entry(file: str, cache_dir: str) -> tuple[str, dict]:
    key = _cache_key(file)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(cache_dir, digest), key


def _load_cached(entry: tuple[str, dict]) -> Any | None:
    directory, key = entry
    try:
        with open(os.path.join(directory, _CACHE_MARKER)) as f:
            if json.load(f) != key:
                return None
    except Exception:  # noqa: BLE001 -- absent, or not written by this code: convert again
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception:  # noqa: BLE001 -- a complete entry that does not load (damaged): drop it, convert again
        shutil.rmtree(directory, ignore_errors=True)
        return None


def _store_cached(hf: Any, entry: tuple[str, dict]) -> None:
    """Write the entry into a temp dir and rename it into place, so a reader (another
    process loading the same model) never sees half an entry. Failures are ignored."""
    directory, key = entry
    tmp = None
    try:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(directory))
        hf.save_pretrained(tmp)
        with open(os.path.join(tmp, _CACHE_MARKER), "w") as f:
            json.dump(key, f)  # written last: its presence means the entry is complete
        # Fails if another process has just stored the same entry: theirs is kept.
        os.rename(tmp, directory)
        tmp = None
    except Exception as e:  # noqa: BLE001 -- the cache is optional
        # read-only home, full disk, a concurrent writer won
        log.debug("tokenizer cache not written to %s: %s", directory, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# Re-exported here because callers think of detokenizing as part of the tokenizer; it lives
# in its own module to keep each file to one job.
from engine.detokenizer import IncrementalDetokenizer
