"""The batched sampler (worker side): one token per row of a batch of logits, each row by
its job's ``SamplingParams``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.logit_processors import BatchProcessors, JobProcessors

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
