"""Workloads shared by ``fastserve bench`` (a real server) and ``fastserve simulate``.

A workload is a list of :class:`WorkItem` (prompt length, output length, arrival time).
Lengths come from a named generator (:func:`sample_lengths`) or a JSONL trace
(:func:`load_trace`); arrivals from :func:`arrival_times` (Poisson, or Gamma with a given
coefficient of variation) or the trace's own times. Everything is seeded and pure: no
clock, no I/O except reading a trace file. Prompt *text* of a given token length for a
target's tokenizer is :class:`PromptBuilder`'s job.

Synthetic length statistics (``sharegpt`` and ``alpaca``) are the means published for
those datasets as serving benchmarks use them (vLLM paper, Kwon et al. SOSP'23, Fig. 11:
ShareGPT mean input 161 / output 338 tokens; Alpaca 19.31 / 58.45), drawn log-normal with
a fixed spread; the log-normal's location is solved so that the mean *after* clipping to
``max_input_len`` / ``max_output_len`` is the published one (a real dataset's mean is also
measured after its own cut-offs). They are synthetic stand-ins, not the datasets.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Z99 = 2.3263  # standard normal 99th percentile: sigma = ln(p99 / median) / Z99


@dataclass(frozen=True)
class WorkItem:
    """One request of a workload: its length and when it arrives (seconds after start).
    ``prompt`` is the trace's own text, if it had one."""

    prompt_len: int
    output_len: int
    arrival_s: float = 0.0
    prompt: str | None = None


@dataclass(frozen=True)
class LengthDist:
    """Log-normal length with a target mean (after clipping to ``[1, cap]``) and spread."""

    mean: float
    sigma: float


@dataclass(frozen=True)
class WorkloadSpec:
    """A named synthetic workload: input and output length distributions, default caps."""

    name: str
    input: LengthDist
    output: LengthDist
    max_input_len: int
    max_output_len: int


# Spreads (log-normal sigma) give the heavy right tail both datasets have; the means are
# the published ones. Caps follow vLLM's ShareGPT filter (prompt <= 1024, total <= 2048).
WORKLOADS: dict[str, WorkloadSpec] = {
    "sharegpt": WorkloadSpec("sharegpt", LengthDist(161.0, 1.0), LengthDist(338.0, 0.9), 1024, 1024),
    "alpaca": WorkloadSpec("alpaca", LengthDist(19.31, 0.6), LengthDist(58.45, 0.8), 256, 512),
}
SYNTHETIC = ("sharegpt", "alpaca", "lognormal", "fixed", "uniform")


def clipped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma)."""
    phi = _normal_cdf
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma**2 / 2) * phi(z - sigma) + cap * (1.0 - phi(z))


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def solve_mu(mean: float, sigma: float, cap: int) -> float:
    """The log-normal location whose mean after clipping at ``cap`` is ``mean``."""
    if not 1 <= mean < cap:
        raise ValueError(f"need 1 <= mean < cap, got mean={mean}, cap={cap}")
    lo, hi = math.log(mean) - sigma**2 / 2 - 1.0, math.log(cap) + 5 * sigma
    for _ in range(100):
        mid = (lo + hi) / 2
        if clipped_lognormal_mean(mid, sigma, cap) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _lognormal(rng: random.Random, n: int, dist: LengthDist, cap: int) -> list[int]:
    if dist.mean >= cap:  # the cap rules: every length is the cap
        return [cap] * n
    mu = solve_mu(dist.mean, dist.sigma, cap)
    return [min(cap, max(1, round(rng.lognormvariate(mu, dist.sigma)))) for _ in range(n)]


def sample_lengths(
    name: str,
    n: int,
    *,
    seed: int,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
    input_len: int = 128,
    output_len: int = 128,
    sigma: float = 1.0,
) -> list[tuple[int, int]]:
    """``n`` (prompt_len, output_len) pairs from the named generator, seeded.

    ``sharegpt`` / ``alpaca``: published means (see the module notes), log-normal.
    ``lognormal``: means ``input_len`` / ``output_len`` with spread ``sigma``.
    ``fixed``: exactly ``input_len`` / ``output_len``. ``uniform``: uniform integers on
    ``[1, 2 * len - 1]`` (mean ``len``). Every length is clipped to ``[1, max_*_len]``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    spec = WORKLOADS.get(name)
    if spec is not None:
        cap_in = max_input_len or spec.max_input_len
        cap_out = max_output_len or spec.max_output_len
        ins = _lognormal(rng, n, spec.input, cap_in)
        outs = _lognormal(rng, n, spec.output, cap_out)
        return list(zip(ins, outs, strict=True))
    if input_len < 1 or output_len < 1:
        raise ValueError("input_len and output_len must be >= 1")
    cap_in = max_input_len or max(input_len * 8, 1)
    cap_out = max_output_len or max(output_len * 8, 1)
    if name == "fixed":
        return [(min(input_len, cap_in), min(output_len, cap_out))] * n
    if name == "uniform":
        return [
            (min(cap_in, rng.randint(1, 2 * input_len - 1)),
             min(cap_out, rng.randint(1, 2 * output_len - 1)))
            for _ in range(n)
        ]
    if name == "lognormal":
        ins = _lognormal(rng, n, LengthDist(input_len, sigma), cap_in)
        outs = _lognormal(rng, n, LengthDist(output_len, sigma), cap_out)
        return list(zip(ins, outs, strict=True))
    raise ValueError(f"unknown workload {name!r}; use one of {', '.join(SYNTHETIC)} or trace:FILE")


def arrival_times(n: int, rate: float, *, seed: int, burstiness: float = 1.0) -> list[float]:
    """``n`` arrival times (seconds, the first at 0) at mean ``rate`` per second.

    Inter-arrival gaps are Gamma with shape ``1 / burstiness**2`` and mean ``1 / rate``, so
    their coefficient of variation is ``burstiness``: 1 is Poisson (exponential gaps),
    below 1 is more regular, above 1 burstier (vLLM's ``--burstiness`` is the shape
    itself; here it is the CV the issue asks for). ``rate = inf`` puts every arrival at 0.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed ^ 0x5EED)
    shape = 1.0 / burstiness**2
    scale = 1.0 / (rate * shape)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.gammavariate(shape, scale)
        out.append(t)
    return out


def load_trace(path: str, max_input_len: int | None = None, max_output_len: int | None = None,
               count_tokens: Callable[[str], int] | None = None) -> list[WorkItem]:
    """A JSONL trace: one object per line with ``arrival_s``, ``output_len`` and either
    ``prompt_len`` or ``prompt`` (text; its length is ``count_tokens(prompt)``, or the
    trace's ``prompt_len`` if both are given). Items are returned in arrival order, with
    arrivals shifted so the first is at 0."""
    items: list[WorkItem] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row.get("prompt")
                plen = row.get("prompt_len")
                if plen is None:
                    if prompt is None:
                        raise KeyError("prompt_len or prompt")
                    if count_tokens is None:
                        raise ValueError("a trace with prompt text needs a tokenizer")
                    plen = count_tokens(prompt)
                item = WorkItem(int(plen), int(row["output_len"]), float(row["arrival_s"]), prompt)
            except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: bad trace row: {e}") from None
            if item.prompt_len < 1 or item.output_len < 1 or item.arrival_s < 0:
                raise ValueError(f"{path}:{lineno}: lengths must be >= 1 and arrival_s >= 0")
            items.append(item)
    items.sort(key=lambda it: it.arrival_s)
    t0 = items[0].arrival_s if items else 0.0
    return [
        WorkItem(min(it.prompt_len, max_input_len or it.prompt_len),
                 min(it.output_len, max_output_len or it.output_len), it.arrival_s - t0,
                 it.prompt if max_input_len is None or it.prompt_len <= max_input_len else None)
        for it in items
    ]


def build_workload(
    workload: str,
    num_prompts: int,
    *,
    rate: float,
    seed: int = 0,
    burstiness: float = 1.0,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
    input_len: int = 128,
    output_len: int = 128,
    count_tokens: Callable[[str], int] | None = None,
) -> list[WorkItem]:
    """The items of a named workload (``trace:FILE`` included) at ``rate`` requests/s.

    A trace keeps its own arrival times unless ``rate`` is finite and ``> 0`` *and* the
    trace has no spread (every arrival 0); it is cut to ``num_prompts`` if that is > 0.
    Lengths do not depend on ``rate``, so one seed gives the same jobs at every rate.
    """
    if workload.startswith("trace:"):
        items = load_trace(workload[len("trace:"):], max_input_len, max_output_len, count_tokens)
        if num_prompts > 0:
            items = items[:num_prompts]
        if all(it.arrival_s == 0 for it in items) and not math.isinf(rate):
            times = arrival_times(len(items), rate, seed=seed, burstiness=burstiness)
            items = [WorkItem(it.prompt_len, it.output_len, t, it.prompt) for it, t in zip(items, times)]
        return items
    lengths = sample_lengths(workload, num_prompts, seed=seed, max_input_len=max_input_len,
                             max_output_len=max_output_len, input_len=input_len,
                             output_len=output_len)
    times = arrival_times(num_prompts, rate, seed=seed, burstiness=burstiness)
    return [WorkItem(p, o, t) for (p, o), t in zip(lengths, times, strict=True)]


def write_trace(path: str, items: Sequence[WorkItem], with_prompts: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            row: dict = {"arrival_s": round(it.arrival_s, 6), "prompt_len": it.prompt_len,
                         "output_len": it.output_len}
            if with_prompts and it.prompt is not None:
                row["prompt"] = it.prompt
            f.write(json.dumps(row) + "\n")


# -- the older CPU-benchmark workload (benchmarks/policies_cpu.py, `simulate --profile`) ----
def lognormal_lengths(rng: random.Random, n: int, median: int, p99: int, lo: int) -> list[int]:
    """``n`` log-normal lengths with the given median and 99th percentile, clipped to
    ``[lo, p99]``."""
    if not 1 <= median <= p99:
        raise ValueError(f"need 1 <= median <= p99, got median={median}, p99={p99}")
    sigma = math.log(p99 / median) / Z99
    mu = math.log(median)
    return [min(p99, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def heavy_tailed(
    n: int,
    *,
    seed: int,
    prompt_median: int,
    prompt_p99: int,
    output_median: int,
    output_p99: int,
    max_job_tokens: int,
) -> tuple[list[WorkItem], list[float]]:
    """``n`` jobs with log-normal prompt and output lengths, and their unit-rate
    exponential inter-arrival gaps (the first gap is 0). A prompt is shortened so that
    prompt + output fits ``max_job_tokens``. Scale the gaps with :func:`with_rate`."""
    rng = random.Random(seed)
    prompts = lognormal_lengths(rng, n, prompt_median, prompt_p99, 4)
    outputs = lognormal_lengths(rng, n, output_median, output_p99, 1)
    gaps = [0.0] + [rng.expovariate(1.0) for _ in range(n - 1)]
    items = [
        WorkItem(max(1, min(p, max_job_tokens - o)), o) for p, o in zip(prompts, outputs, strict=True)
    ]
    return items, gaps


def with_rate(items: Sequence[WorkItem], gaps: Sequence[float], rate: float) -> list[WorkItem]:
    """The items with Poisson arrivals at ``rate`` per second (the unit gaps, scaled)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    t, out = 0.0, []
    for item, gap in zip(items, gaps, strict=True):
        t += gap / rate
        out.append(WorkItem(item.prompt_len, item.output_len, t))
    return out
