"""One decode step of the bundled SmolLM2 (forward + logits), per weight format, on this CPU.

For each ``--quantization`` mode the model is loaded once; a batch of B sequences with a
``--context``-token history is prefilled, then the same decode step (one new token per
sequence, fixed slots) is timed ``--iters`` times after ``--warmup`` untimed runs. The
median and the 10th/90th percentiles of the per-step times are reported in ms. Also times
the LM head alone (the largest matrix) in each format.

    .venv/bin/python benchmarks/quant_decode_step.py [--threads 2] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.memory.kv_cache import KVCachePool
from engine.models.base import AttentionMetadata
from engine.models.loader import load_model


def decode_inputs(batch: int, context: int, block_size: int):
    """(ids, positions, metadata) of one decode step over ``batch`` sequences."""
    blocks_per_seq = -(-(context + 1) // block_size)
    tables = torch.arange(batch * blocks_per_seq).reshape(batch, blocks_per_seq)
    slots = tables[:, context // block_size] * block_size + context % block_size
    attn = AttentionMetadata(
        query_lens=[1] * batch,
        context_lens=[context + 1] * batch,
        block_tables=tables,
        slot_mapping=slots,
        block_size=block_size,
    )
    ids = torch.randint(100, 40000, (batch,), generator=torch.Generator().manual_seed(0))
    return ids, torch.full((batch,), context), attn, batch * blocks_per_seq


def time_step(model, batch: int, context: int, warmup: int, iters: int) -> list[float]:
    ids, positions, attn, blocks = decode_inputs(batch, context, 16)
    dtype = next(model.parameters()).dtype
    pool = KVCachePool(
        model.num_layers, blocks, 16, model.num_kv_heads, model.head_dim, dtype, "cpu"
    )
    for cache in pool.caches:
        cache.normal_()  # a filled history; its values do not matter for timing
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start = time.perf_counter()
            model.compute_logits(model(ids, positions, pool.caches, attn))
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> str:
    q = statistics.quantiles(times, n=10)
    return f"{statistics.median(times):7.2f} ms (p10 {q[0]:.2f}, p90 {q[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "int4", "auto"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, context {args.context}")
    for mode in args.modes:
        model, _ = load_model(None, torch.float32, "cpu", quantization=mode)
        for batch in args.batch:
            times = time_step(model, batch, args.context, args.warmup, args.iters)
            print(f"{mode:>5} batch {batch}: decode step {summary(times)}")
        head = model.lm_head
        for batch in args.batch:
            x = torch.randn(batch, head.in_features)
            with torch.inference_mode():
                for _ in range(args.warmup):
                    head(x)
                times = []
                for _ in range(args.iters):
                    start = time.perf_counter()
                    head(x)
                    times.append((time.perf_counter() - start) * 1e3)
            print(f"{mode:>5} batch {batch}: lm head alone {summary(times)}")
        del model


if __name__ == "__main__":
    main()
