"""Sampling parameters (validated at the API edge) and the batched sampler (worker side)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from engine.logit_processors import BatchProcessors, JobProcessors

if TYPE_CHECKING:  # imported lazily: clients import SamplingParams without needing torch
    import torch


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


# -- the batched sampler (worker side) -----------------------------------------------------
# Temperatures below this are greedy: dividing by them would overflow (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5
# top-p without top-k first looks for the nucleus among this many most likely tokens (a
# partial top-k is far cheaper than sorting the vocabulary); a row whose nucleus is wider
# falls back to the full sort.
TOP_P_CANDIDATES = 1024


@dataclass
class SampleResult:
    """One sampled token per row. ``logprobs``/``top_logprobs`` are None when no row asked
    for logprobs; otherwise a row that did not ask has None in them. Logprobs are of the
    model's raw distribution (``log_softmax(logits)``, before temperature, top-k and top-p),
    vLLM's default convention; ``top_logprobs`` rows are sorted, most likely first."""

    token_ids: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class _JobSampling:
    temperature: float
    top_p: float
    top_k: int  # 0: disabled
    seed: int | None
    logprobs: int | None
    generator: torch.Generator | None = None  # made on first use, on the logits' device
    min_p: float = 0.0
    procs: JobProcessors | None = None  # logit_bias, min_tokens, penalties; None: none asked

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS


class Sampler:
    """Samples the next token of each row of a batch of logits, per job's parameters.

    First the logit processors (``engine.logit_processors``: ``logit_bias``, the
    ``min_tokens`` mask, repetition / frequency / presence penalties), each on the rows that
    ask for it, vectorised over them; a batch where no row asks skips them. Greedy rows take
    the argmax. The others get temperature, min-p, then top-k, then top-p over what top-k
    kept (vLLM's order), then one draw. A job with a seed is filtered and drawn on its own
    with its own generator, one draw per step, so its tokens depend on nothing else in the
    batch; jobs without one are handled together and share the sampler's generator (seeded
    by ``seed``, or randomly). Logprobs are of the raw logits, before any of this.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._jobs: dict[str, _JobSampling] = {}
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        self.processors = BatchProcessors()

    def add(self, job_id: str, params: dict, prompt_ids: Any = None) -> None:
        """Register a job; ``params`` is ``SamplingParams.worker_view()``. ``prompt_ids``
        (the prompt) matters only to a repetition penalty."""
        self._jobs[job_id] = _JobSampling(
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=max(int(params.get("top_k") or 0), 0),  # -1 and 0 both mean "off"
            seed=params.get("seed"),
            logprobs=params.get("logprobs"),
            min_p=float(params.get("min_p", 0.0)),
            procs=JobProcessors.from_view(params, prompt_ids),
        )

    def remove(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self.processors.release(job.procs)

    def sample(
        self, logits: torch.Tensor, job_ids: list[str],
        token_bitmask: tuple[list[int], torch.Tensor] | None = None,
    ) -> SampleResult:
        """``logits`` is [B, V] (float32); row i belongs to ``job_ids[i]``.

        ``token_bitmask`` (rows, int32 [len(rows), ceil(V / 32)]): the grammar's allowed
        next tokens of those rows (engine.structured); refused tokens get -inf before
        temperature and the filters, so greedy and random rows alike pick an allowed one.
        Logprobs stay those of the raw logits."""
        if logits.dim() != 2 or logits.shape[0] != len(job_ids):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(job_ids)} jobs")
        try:
            jobs = [self._jobs[j] for j in job_ids]
        except KeyError as e:
            raise KeyError(f"sampler has no parameters for job {e.args[0]!r} (never added?)") \
                from None
        procs = [j.procs for j in jobs]
        tracked = any(p is not None for p in procs)
        processed = self.processors.apply(logits, procs) if tracked else logits
        if token_bitmask is not None and len(token_bitmask[0]):  # grammars: after penalties
            import torch

            from engine.structured.bitmask import apply_token_bitmask

            rows, mask = token_bitmask
            processed = apply_token_bitmask(
                processed, torch.tensor(rows, device=logits.device), torch.as_tensor(mask),
                raw=logits)
        tokens = self._choose(processed, jobs)
        if tracked:
            self.processors.record(procs, tokens)
        result = SampleResult(token_ids=tokens.tolist())
        if any(j.logprobs is not None for j in jobs):  # of the raw logits
            result.logprobs, result.top_logprobs = _logprobs(logits, tokens, jobs)
        return result

    def process(self, logits: torch.Tensor, job_ids: list[str]) -> torch.Tensor:
        """The logits the next ``sample`` would draw from (before temperature): ``logits``
        itself when no row has an active processor, else a processed copy. Counts nothing
        (for inspection and tests)."""
        return self.processors.apply(logits, [self._jobs[j].procs for j in job_ids])

    def _choose(self, logits: torch.Tensor, jobs: list[_JobSampling]) -> torch.Tensor:
        import torch

        dev = logits.device
        random_rows = [i for i, j in enumerate(jobs) if not j.greedy]
        if not random_rows:
            return logits.argmax(dim=-1)
        tokens = torch.empty(len(jobs), dtype=torch.int64, device=dev)
        greedy_rows = [i for i, j in enumerate(jobs) if j.greedy]
        if greedy_rows:
            g = torch.tensor(greedy_rows, device=dev)
            tokens[g] = logits[g].argmax(dim=-1)
        r = torch.tensor(random_rows, device=dev)
        tokens[r] = self._sample_random(logits[r], [jobs[i] for i in random_rows])
        return tokens

    def _sample_random(self, logits: torch.Tensor, jobs: list[_JobSampling]) -> torch.Tensor:
        import torch

        dev = logits.device
        temps = torch.tensor([j.temperature for j in jobs], dtype=logits.dtype, device=dev)
        probs = torch.softmax(logits / temps.unsqueeze(1), dim=-1)
        if any(j.min_p > 0.0 for j in jobs):
            min_p = torch.tensor([j.min_p for j in jobs], dtype=probs.dtype, device=dev)
            floor = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        out = torch.empty(len(jobs), dtype=torch.int64, device=dev)
        shared = [i for i, j in enumerate(jobs) if j.seed is None]
        if shared:
            s = torch.tensor(shared, device=dev)
            out[s] = _draw(probs[s], [jobs[i] for i in shared], self._shared_generator(dev))
        for i, job in enumerate(jobs):
            if job.seed is not None:
                if job.generator is None or job.generator.device != dev:
                    job.generator = torch.Generator(device=dev)
                    job.generator.manual_seed(job.seed)
                out[i] = _draw(probs[i : i + 1], [job], job.generator)[0]
        return out

    def _shared_generator(self, dev: torch.device) -> torch.Generator:
        import torch

        gen = self._shared.get(dev)
        if gen is None:
            gen = torch.Generator(device=dev)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._shared[dev] = gen
        return gen


def _draw(probs: torch.Tensor, jobs: list[_JobSampling], gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` [m, V], after each job's top-k / top-p.

    The race's noise is drawn for the whole vocabulary, one value per token *id*, and the
    filtered candidates read theirs by id. So the token a draw goes to does not depend on
    where the candidates rank: two near-equal probabilities that swap places because of a
    last-bit difference in the logits (another batch composition, another kernel) keep their
    own noise, and only a change at the top-k / top-p boundary can change the sample.
    """
    import torch

    vocab = probs.shape[1]
    noise = race_noise(probs.shape, gen, probs.dtype, probs.device)
    is_filtered = [0 < j.top_k < vocab or j.top_p < 1.0 for j in jobs]
    if not any(is_filtered):
        return _race(probs, noise)
    out = torch.empty(len(jobs), dtype=torch.int64, device=probs.device)
    filtered = [i for i, f in enumerate(is_filtered) if f]
    plain = [i for i, f in enumerate(is_filtered) if not f]
    if plain:
        p = torch.tensor(plain, device=probs.device)
        out[p] = _race(probs[p], noise[p])
    f = torch.tensor(filtered, device=probs.device)
    weights, ids = top_k_top_p(
        probs[f], [jobs[i].top_k for i in filtered], [jobs[i].top_p for i in filtered])
    out[f] = ids.gather(1, _race(weights, noise[f].gather(1, ids)).unsqueeze(1)).squeeze(1)
    return out


def race_noise(
    shape: torch.Size | tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The exponential race's Exp(1) noise: one draw of ``shape`` [rows, vocab] from ``gen``.

    A seeded job consumes exactly one such [1, vocab] draw per sampled token, which is what
    makes its samples replayable (tests replay it to tell a floating-point tie from a bug).
    """
    import torch

    q = torch.empty(shape, dtype=dtype, device=device).exponential_(generator=gen)
    # An exact 0 draw would turn a zero weight into 0/0 = NaN, or any weight into inf.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _race(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Index drawn per row with probability proportional to ``weights`` (unnormalised).

    argmax(w / E) with E ~ Exp(1) picks i with probability w_i / sum(w) (the exponential
    race, as vLLM samples): no normalisation, and cheaper than ``torch.multinomial``.
    """
    return (weights / noise).argmax(dim=-1)


def top_k_top_p(
    probs: torch.Tensor, top_k: list[int], top_p: list[float], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``probs`` [m, V]: the candidates (``width`` most likely, most likely
    first) as (weights, token ids), weights zeroed for tokens top-k or top-p drop.

    top-k keeps the k most likely (0: all). top-p then keeps the smallest prefix whose mass
    reaches p — of top-k's renormalised distribution when top-k is on, else of the whole
    one — and always keeps the first token. Weights are not renormalised.
    """
    import torch

    vocab = probs.shape[1]
    dev = probs.device
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    if width is None:
        width = min(vocab, max(k or TOP_P_CANDIDATES for k in ks))
    vals, ids = probs.topk(width, dim=-1)  # sorted: most likely first
    has_k = torch.tensor([k > 0 for k in ks], device=dev)
    k = torch.tensor([k or width for k in ks], device=dev)
    vals = vals.masked_fill(torch.arange(width, device=dev).unsqueeze(0) >= k.unsqueeze(1), 0.0)
    p = torch.tensor(top_p, dtype=vals.dtype, device=dev)
    total = torch.where(has_k, vals.sum(dim=-1), probs.sum(dim=-1))
    reach = p * total
    if width < vocab and bool(((vals.sum(dim=-1) < reach) & ~has_k & (p < 1.0)).any()):
        return top_k_top_p(probs, top_k, top_p, width=vocab)  # a nucleus wider than width
    before = vals.cumsum(dim=-1) - vals
    # p == 1 filters nothing, whatever the rounding in the cumulative sum.
    drop = (before >= reach.unsqueeze(1)) & (p < 1.0).unsqueeze(1)
    return vals.masked_fill(drop, 0.0), ids


def _logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, jobs: list[_JobSampling]
) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    import torch

    rows = [i for i, j in enumerate(jobs) if j.logprobs is not None]
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    chosen = lp.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()
    max_k = min(max(int(jobs[i].logprobs or 0) for i in rows), lp.shape[1])
    top_vals: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if max_k > 0:
        vals, ids = lp.topk(max_k, dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    logprobs: list[float | None] = [None] * len(jobs)
    top: list[list[tuple[int, float]] | None] = [None] * len(jobs)
    for n, i in enumerate(rows):
        k = int(jobs[i].logprobs or 0)
        logprobs[i] = chosen[n]
        top[i] = list(zip(top_ids[n][:k], top_vals[n][:k]))
    return logprobs, top
