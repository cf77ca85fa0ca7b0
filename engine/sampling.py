"""Sampling parameters, validated at the API edge (the worker's batched sampler is
``engine.sampler``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field


class InvalidRequestError(ValueError):
    """A request field is invalid. ``param`` names the field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


MAX_STOP_CHARS = 1024  # per stop string: the detokenizer scans for each after every token
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit)
MAX_PENALTY = 2.0  # presence / frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI)
MAX_BIAS = 100.0  # a logit bias lies in [-MAX_BIAS, MAX_BIAS] (OpenAI)
MAX_LOGPROBS = 20  # top alternatives per token, for logprobs and prompt_logprobs (OpenAI's cap)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's plus the top k
    # vLLM's: None: none; k >= 0: every prompt token's logprob given the tokens before it
    # (from the second on), plus the top k there. Scored once per job, by the worker.
    prompt_logprobs: int | None = None
    priority: int = 0  # lower runs first under the priority policy (vLLM's convention)
    n: int = 1
    skip_special_tokens: bool = True
    # max_tokens beyond the context left after the prompt: refused (False, the serving
    # edge's rule, as vLLM's) or cut to what is left (True: "generate until the context is
    # full", e.g. a chat request without max_tokens).
    clamp_max_tokens: bool = False
    # Output constraint (engine.structured.spec): {"type": "json_object" | "json_schema" |
    # "regex" | "choice" | "grammar", ...}; None: free text. Its shape is checked here; what
    # it means (a schema, regex or grammar that compiles) before the job is queued.
    structured: dict | None = field(default=None, hash=False)
    # -- logit processors (OpenAI / vLLM semantics; docs/serving.md). At their neutral
    # values the worker skips them entirely.
    presence_penalty: float = 0.0  # minus this once for every token already generated
    frequency_penalty: float = 0.0  # minus this times the token's count among generated ones
    repetition_penalty: float = 1.0  # tokens in prompt or output: logit / r if > 0, else * r
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely (after temperature)
    # (token id, bias) pairs, sorted by id; a {token id (int or decimal str): bias} map is
    # accepted and normalised. Ids are checked against the vocabulary by the frontend.
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings are not honoured before this
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        self.validate()

    def validate(self) -> None:
        def bad(param: str, msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param}: {msg}", param=param)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise bad("max_tokens", "must be an integer")
        if self.max_tokens <= 0:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int64(self.top_k) or self.top_k < -1:
            raise bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not _is_int64(self.seed):
            raise bad("seed", f"must be an integer in [-2**63, 2**63), got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (
                not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS
            ):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= 16:
            raise bad("n", f"must be an integer in [1, 16], got {self.n!r}")
        if not _is_int64(self.priority):
            raise bad("priority", f"must be an integer in [-2**63, 2**63), got {self.priority!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if len(self.stop) > 16:
            raise bad("stop", "at most 16 stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise bad("stop", f"each stop string at most {MAX_STOP_CHARS} characters")
        if any(not _is_int64(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids")
        if not isinstance(self.clamp_max_tokens, bool):
            raise bad("clamp_max_tokens", "must be a boolean")
        if self.structured is not None:
            from engine.structured.spec import validate_spec  # imports this module

            validate_spec(self.structured)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise bad(name, f"must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty",
                      f"must be a finite number > 0, got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be a number in [0, 1], got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens",
                      f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def worker_view(self, eos_token_ids: Iterable[int] = ()) -> dict:
        """The fields the worker's sampler needs, as a msgpack-able dict. Logit processors
        at their neutral values are left out. ``eos_token_ids``: the model's, which
        ``min_tokens`` keeps from being sampled (unless ``ignore_eos``)."""
        view: dict = {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": int(self.top_k),
            "seed": self.seed,
            "logprobs": self.logprobs,
        }
        if self.prompt_logprobs is not None:
            view["prompt_logprobs"] = self.prompt_logprobs
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("repetition_penalty", 1.0), ("min_p", 0.0)):
            if getattr(self, name) != neutral:
                view[name] = float(getattr(self, name))
        if self.logit_bias:
            view["logit_bias"] = [[t, b] for t, b in self.logit_bias]
        if self.min_tokens:
            banned = set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))
            if banned:
                view["min_tokens"] = self.min_tokens
                view["min_tokens_ids"] = sorted(int(t) for t in banned)
        return view

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = {str(t): b for t, b in self.logit_bias}  # JSON / msgpack: string keys
        return d


# ASCII digits only: int() also takes " 1" and other scripts' digits.
_DECIMAL_ID = re.compile(r"[0-9]{1,19}")


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs, from a map (OpenAI's JSON shape, keys
    the ids as decimal strings; integer keys too) or from pairs; refused naming the field."""
    def bad(msg: str) -> InvalidRequestError:
        return InvalidRequestError(f"logit_bias: {msg}", param="logit_bias")

    if value is None:
        return ()
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in value
    ):
        items = [tuple(p) for p in value]
    else:
        raise bad("must be a map of token id to bias")
    if len(items) > MAX_LOGIT_BIAS:
        raise bad(f"at most {MAX_LOGIT_BIAS} entries, got {len(items)}")
    out: dict[int, float] = {}
    for key, bias in items:
        if isinstance(key, str) and _DECIMAL_ID.fullmatch(key):
            tid = int(key)
        elif isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            tid = key
        else:
            raise bad(f"keys must be token ids (non-negative integers), got {str(key)[:32]!r}")
        if not _is_number(bias) or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise bad(f"bias for token {tid} must be a number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                      f"got {bias!r}")
        if tid in out:
            raise bad(f"token {tid} is given twice")
        out[tid] = float(bias)
    return tuple(sorted(out.items()))


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """Token ids in ``logit_bias`` must be in the model's vocabulary (the frontend knows it)."""
    for tid, _ in params.logit_bias:
        if tid >= vocab_size:
            raise InvalidRequestError(
                f"logit_bias: token id {tid} is not in the vocabulary [0, {vocab_size})",
                param="logit_bias",
            )


def _is_number(x: object) -> bool:
    """A finite number: NaN and +-infinity are refused wherever a number is expected."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int64(x: object) -> bool:
    # Seeds and priorities cross msgpack and torch, which take 64-bit integers only.
    return isinstance(x, int) and not isinstance(x, bool) and -(2**63) <= x < 2**63
