"""Summaries of a benchmark or simulation run, shared by both so they report alike."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def nearest_rank(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (no interpolation)."""
    if not xs:
        raise ValueError("nearest_rank of an empty sequence")
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def saturated_capacity(token_times: Sequence[Sequence[float]], output_lens: Sequence[int]) -> float:
    """Jobs per second a run served while it was saturated, from a run that submitted
    every job at t=0.

    The saturated window ends when the last job gets its first token: until then some job
    was waiting, so the engine was as busy as its policy, batch cap and KV pool allow.
    The work done in the window is counted in jobs: a finished job counts 1, a job that
    had produced k of its n tokens counts k/n. Unlike "jobs / time to finish them all",
    this leaves out the drain at the end, where a heavy-tailed workload runs a few long
    jobs in an almost empty batch, so it does not understate what the engine sustains.

    ``token_times[i]`` are the times (seconds after the start) job ``i`` got each of its
    ``output_lens[i]`` tokens.
    """
    if len(token_times) != len(output_lens) or not token_times:
        raise ValueError("need one token-time list per job, and at least one job")
    if any(len(ts) != n for ts, n in zip(token_times, output_lens)):
        raise ValueError("every job needs exactly its output length of token times")
    end = max(ts[0] for ts in token_times)
    if end <= 0:
        return math.inf
    done = sum(sum(1 for t in ts if t <= end) / len(ts) for ts in token_times)
    return done / end


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks,
    as ``numpy.percentile`` computes it by default (and so vLLM's benchmark)."""
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class RequestRecord:
    """What one request did, in seconds after the run started.

    ``arrival_s`` is when the workload said it arrives (a client held back by
    ``--max-concurrency`` is still counted from there: the job existed); ``token_s`` the
    times its output tokens arrived (a streamed chunk of k tokens gives k equal times);
    ``scheduled_s`` when the server first put it in a batch, if it says (queueing time).
    """

    prompt_len: int
    output_len: int  # tokens the workload asked for
    arrival_s: float
    token_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    scheduled_s: float | None = None
    error: str | None = None
    rejected: bool = False  # refused by admission (queue full), not failed mid-way
    # Set when ``token_s`` holds only the first and last token times (large simulations):
    # the real count. ITLs are then unknown.
    num_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.rejected and self.finish_s is not None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_s) if self.num_tokens is None else self.num_tokens

    @property
    def ttft_s(self) -> float | None:
        return self.token_s[0] - self.arrival_s if self.token_s else None

    @property
    def e2el_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a single-token output."""
        n = self.num_output_tokens
        if n < 2 or self.finish_s is None:
            return None
        return (self.token_s[-1] - self.token_s[0]) / (n - 1)

    @property
    def itl_s(self) -> list[float]:
        """Gaps between successive tokens (0 between tokens of one chunk)."""
        if self.num_tokens is not None and self.num_tokens != len(self.token_s):
            return []
        return [b - a for a, b in itertools.pairwise(self.token_s)]

    @property
    def queue_s(self) -> float | None:
        return None if self.scheduled_s is None else self.scheduled_s - self.arrival_s

    def row(self) -> dict:
        r = {"prompt_len": self.prompt_len, "output_len": self.output_len,
             "output_tokens": self.num_output_tokens, "arrival_s": _r(self.arrival_s),
             "ttft_s": _r(self.ttft_s), "tpot_s": _r(self.tpot_s), "e2el_s": _r(self.e2el_s),
             "queue_s": _r(self.queue_s)}
        if self.error:
            r["error"] = self.error
        if self.rejected:
            r["rejected"] = True
        return r


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput, in milliseconds; None: not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, specs: Sequence[str]) -> SLO:
        """``["ttft:500", "tpot:50", "e2el:10000"]`` (or one space/comma-separated string)."""
        vals: dict[str, float] = {}
        for spec in (p for s in specs for p in s.replace(",", " ").split()):
            key, sep, value = spec.partition(":")
            if not sep or key not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"bad SLO {spec!r}: expected ttft:MS, tpot:MS or e2el:MS")
            ms = float(value)
            if not ms > 0:
                raise ValueError(f"SLO {key} must be > 0 ms, got {value}")
            vals[f"{key}_ms"] = ms
        return cls(**vals)

    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        for limit, value in ((self.ttft_ms, r.ttft_s), (self.tpot_ms, r.tpot_s),
                             (self.e2el_ms, r.e2el_s)):
            if limit is not None and value is not None and value * 1e3 > limit:
                return False
        return True

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


PERCENTILES = (50, 90, 99)


def _stats(out: dict, name: str, values_s: Sequence[float], scale: float = 1e3) -> None:
    """``mean_/median_/std_/p90_/p99_`` + name, in ms (``scale``), as vLLM reports them."""
    vals = [v * scale for v in values_s]
    if not vals:
        for k in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES if p != 50)):
            out[f"{k}_{name}"] = 0.0
        return
    out[f"mean_{name}"] = statistics.fmean(vals)
    out[f"median_{name}"] = statistics.median(vals)
    out[f"std_{name}"] = statistics.pstdev(vals)
    for p in PERCENTILES:
        if p != 50:
            out[f"p{p}_{name}"] = percentile(vals, p)


def summarize(records: Sequence[RequestRecord], duration_s: float | None = None,
              slo: SLO | None = None) -> dict:
    """The run's summary with vLLM's ``bench serve`` key names where the meaning is the
    same (``completed``, ``request_throughput``, ``mean_ttft_ms``, ``p99_e2el_ms``, ...),
    plus ``mean_jct_s`` / ``median_jct_s`` / ``p99_jct_s`` (JCT = e2e latency from
    arrival), queueing time, and ``rejected``. ``duration`` defaults to first arrival to
    last finish."""
    ok = [r for r in records if r.ok]
    if duration_s is None:
        ends = [r.finish_s for r in ok if r.finish_s is not None]
        start = min((r.arrival_s for r in records), default=0.0)
        duration_s = (max(ends) - start) if ends else 0.0
    out: dict = {
        "num_prompts": len(records),
        "completed": len(ok),
        "failed": sum(1 for r in records if r.error is not None and not r.rejected),
        "rejected": sum(1 for r in records if r.rejected),
        "duration": duration_s,
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": sum(r.num_output_tokens for r in ok),
    }
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out["request_throughput"] = per_s(len(ok))
    out["output_throughput"] = per_s(out["total_output_tokens"])
    out["total_token_throughput"] = per_s(out["total_input_tokens"] + out["total_output_tokens"])
    if slo is not None and slo.is_set():
        out["request_goodput"] = per_s(sum(1 for r in ok if slo.met(r)))
        out["slo"] = slo.to_dict()
    _stats(out, "ttft_ms", [r.ttft_s for r in ok if r.ttft_s is not None])
    _stats(out, "tpot_ms", [r.tpot_s for r in ok if r.tpot_s is not None])
    _stats(out, "itl_ms", [g for r in ok for g in r.itl_s])
    _stats(out, "e2el_ms", [r.e2el_s for r in ok if r.e2el_s is not None])
    _stats(out, "queue_ms", [r.queue_s for r in ok if r.queue_s is not None])
    jct = [r.e2el_s for r in ok if r.e2el_s is not None]
    out["mean_jct_s"] = statistics.fmean(jct) if jct else 0.0
    out["median_jct_s"] = statistics.median(jct) if jct else 0.0
    out["p99_jct_s"] = percentile(jct, 99) if jct else 0.0
    return out


def result_entry(records: Sequence[RequestRecord], rate: float, duration_s: float | None = None,
                 slo: SLO | None = None, with_rows: bool = True) -> dict:
    """One entry of a result file's ``results`` list: the summary at one request rate,
    and (``with_rows``) the per-request rows under ``requests``."""
    out = {"request_rate": rate if math.isfinite(rate) else None,
           **summarize(records, duration_s, slo)}
    if with_rows:
        out["requests"] = [r.row() for r in records]
    return out
