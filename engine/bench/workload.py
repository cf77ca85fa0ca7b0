"""Synthetic online workloads: heavy-tailed lengths and Poisson arrivals, seeded.

Shared by the real-engine benchmarks and the simulator, so both see the same jobs.
Pure functions, no clock and no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

Z99 = 2.3263  # standard normal 99th percentile: sigma = ln(p99 / median) / Z99


@dataclass(frozen=True)
class WorkItem:
    """One request of a workload: its length and when it arrives (seconds after start)."""

    prompt_len: int
    output_len: int
    arrival_s: float = 0.0


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
