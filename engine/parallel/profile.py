"""Measure the running model's cost curve inside the worker: prefill seconds by input
length and decode-step seconds by batch size. Skip-join MLFQ uses the prefill curve to
pick a new job's first queue. Runs on an idle worker (start-up, or ``fastserve profile``):
it borrows the front of the KV pool and gives it back.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

DEFAULT_LENGTHS = (1, 16, 64, 256, 1024)
DEFAULT_BATCHES = (1, 4, 16, 64)


def profile_runner(
    runner: Any,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    repeats: int = 2,
    context: int = 64,
) -> dict[str, Any]:
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

    prefill: list[list[float]] = []
    for length in lengths:
        nblocks = -(-(length + 1) // bs)
        if nblocks > pool:
            break
        best = float("inf")
        for r in range(repeats + 1):  # the first run warms up
            jid = f"__profile_p{length}_{r}"
            t = run([[jid, 0, length, list(range(nblocks)), True, True]],
                    [{"id": jid, "prompt": [1] * length, "params": params()}])
            runner.step({"step": next(step_ids), "free": [jid], "new": [], "swap_out": [], "swap_in": [], "seqs": []})
            if r:
                best = min(best, t)
        prefill.append([length, best])

    decode: list[list[float]] = []
    per_job = -(-(context + 2) // bs)
    for batch in batch_sizes:
        if batch * per_job > pool:
            break
        ids = [f"__profile_d{batch}_{i}" for i in range(batch)]
        tables = [list(range(i * per_job, (i + 1) * per_job)) for i in range(batch)]
        run([[j, 0, context, t, True, True] for j, t in zip(ids, tables)],
            [{"id": j, "prompt": [1] * context, "params": params()} for j in ids])
        best = float("inf")
        for r in range(repeats):
            t = run([[j, context + r, 1, [], False, True] for j in ids], [])
            best = min(best, t)
        runner.step({"step": next(step_ids), "free": ids, "new": [], "swap_out": [], "swap_in": [], "seqs": []})
        decode.append([batch, best])
    return {"prefill": prefill, "decode": decode}
