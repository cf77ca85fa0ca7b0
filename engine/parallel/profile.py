"""Measure the running model's cost curve inside the worker: prefill seconds by input
length and decode-step seconds by batch size. Skip-join MLFQ uses the prefill curve to
pick a new job's first queue. Runs on an idle worker (start-up, or ``fastserve profile``):
it borrows the front of the KV pool and gives it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

# Enough points for piecewise-linear interpolation of the (close to linear) cost curves,
# few enough that start-up profiling of a small model on a CPU takes seconds.
DEFAULT_LENGTHS = (1, 32, 128, 512)
DEFAULT_BATCHES = (1, 8, 32)


def profile_runner(
    runner: Any,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    repeats: int = 2,
    context: int = 64,
    progress: Callable[[int, int], None] | None = None,
    max_len: int | None = None,
) -> dict[str, Any]:
    """``progress(done, total)`` is called as measurements complete. ``max_len``: the
    model's context length; no measured sequence goes past it (learned position
    embeddings, as OPT's, have no row beyond it)."""
    if runner.jobs:
        raise RuntimeError("profile needs an idle worker")
    bs = runner.block_size
    pool = runner.gpu_pool.num_blocks
    step_ids = iter(range(-1, -1_000_000, -1))

    def run(seqs: list, new: list) -> float:
        t0 = time.perf_counter()
        runner.step({"step": next(step_ids), "free": [], "new": new, "swap_out": [], "swap_in": [], "seqs": seqs})
        return time.perf_counter() - t0

    def params() -> dict:
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "logprobs": None}

    limit = max_len if max_len is not None else 1 << 30
    fits = [n for n in lengths if -(-(n + 1) // bs) <= pool and n < limit]
    lengths = fits or [max(1, min(limit - 1, pool * bs - 1))]
    context = max(1, min(context, limit - repeats - 3))
    total = (repeats + 1) * len(lengths) + len(batch_sizes)
    done = iter(range(1, total + 1))

    def tick() -> None:
        if progress is not None:
            progress(next(done), total)

    if progress is not None:
        progress(0, total)
    times: dict[int, float] = {n: float("inf") for n in lengths}
    # Round 0 warms every shape up (first calls pay for allocation and kernel selection);
    # the rest are timed, best of ``repeats``.
    for r in range(repeats + 1):
        for length in lengths:
            jid = f"__profile_p{length}_{r}"
            t = run([[jid, 0, length, list(range(-(-(length + 1) // bs))), True, True]],
                    [{"id": jid, "prompt": [1] * length, "params": params()}])
            runner.step({"step": next(step_ids), "free": [jid], "new": [], "swap_out": [], "swap_in": [], "seqs": []})
            if r:
                times[length] = min(times[length], t)
            tick()
    prefill: list[list[float]] = [[n, times[n]] for n in lengths]

    decode: list[list[float]] = []
    per_job = -(-(context + repeats + 2) // bs)
    for batch in batch_sizes:
        if batch * per_job > pool:
            break
        ids = [f"__profile_d{batch}_{i}" for i in range(batch)]
        tables = [list(range(i * per_job, (i + 1) * per_job)) for i in range(batch)]
        run([[j, 0, context, t, True, True] for j, t in zip(ids, tables)],
            [{"id": j, "prompt": [1] * context, "params": params()} for j in ids])
        best = float("inf")
        for r in range(repeats + 1):  # the first decode warms up
            # The fed token travels in the plan: under pipeline parallelism only the last
            # stage sampled it.
            t = run([[j, context + r, 1, [], False, True, [1]] for j in ids], [])
            if not r:
                continue
            best = min(best, t)
        runner.step({"step": next(step_ids), "free": ids, "new": [], "swap_out": [], "swap_in": [], "seqs": []})
        decode.append([batch, best])
        tick()
    if progress is not None:
        progress(total, total)  # batch sizes the pool cannot hold were skipped
    return {"prefill": prefill, "decode": decode}
