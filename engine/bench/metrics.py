"""Summaries of a benchmark or simulation run, shared by both so they report alike."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
