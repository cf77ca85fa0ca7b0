"""One decode step of the bundled SmolLM2 (forward + logits), per weight format, on this CPU.

Every ``--quantization`` mode's model is loaded first; then rounds run one decode step of
each (mode, batch) in turn (B sequences, one new token each over a ``--context``-token
history, fixed slots), so that load from other processes on a shared machine hits every
mode alike. ``--warmup`` untimed rounds, then ``--iters`` timed ones; the median and the
10th/90th percentiles of the per-step times are reported in ms. The LM head alone (the
largest matrix) is timed the same way.

    .venv/bin/python benchmarks/quant_decode_step.py [--threads 2] [--batch 1 8] \
        [--dtype bfloat16] [--cpu-time] [--profile]

``--dtype`` is the model's dtype (``--dtype auto`` picks bfloat16 on a CPU with native bf16);
``--cpu-time`` reports process CPU time (all threads) instead of wall time, the steadier
measure on a shared machine; ``--profile`` prints, per (mode, batch), torch.profiler's
self-CPU time per aten op over a few extra steps (with input shapes for the matmuls).
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


class Case:
    """One (mode, batch) step, ready to run."""

    def __init__(self, model, batch: int, context: int) -> None:
        self.model = model
        self.ids, self.positions, self.attn, blocks = decode_inputs(batch, context, 16)
        dtype = next(model.parameters()).dtype
        self.pool = KVCachePool(
            model.num_layers, blocks, 16, model.num_kv_heads, model.head_dim, dtype, "cpu"
        )
        for cache in self.pool.caches:
            cache.normal_()  # a filled history; its values do not matter for timing
        self.hidden = torch.randn(batch, model.lm_head.in_features, dtype=dtype)

    def step(self) -> None:
        self.model.compute_logits(self.model(self.ids, self.positions, self.pool.caches, self.attn))

    def head(self) -> None:
        self.model.lm_head(self.hidden)


def summary(times: list[float]) -> str:
    q = statistics.quantiles(times, n=10)
    return f"{statistics.median(times):8.2f} ms (p10 {q[0]:7.2f}, p90 {q[-1]:7.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "int4", "auto"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall")
    parser.add_argument("--profile", action="store_true", help="per-op table per case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} threads, context {args.context}, "
          f"{args.dtype}, {'CPU' if args.cpu_time else 'wall'} time", flush=True)
    models = {m: load_model(None, dtype, "cpu", quantization=m)[0] for m in args.modes}
    cases = {(m, b): Case(models[m], b, args.context) for m in args.modes for b in args.batch}
    steps: dict = {key: [] for key in cases}
    heads: dict = {key: [] for key in cases}
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            for key, case in cases.items():
                for fn, times in ((case.step, steps[key]), (case.head, heads[key])):
                    start = clock()
                    fn()
                    if i >= args.warmup:
                        times.append((clock() - start) * 1e3)
    for (mode, batch), times in steps.items():
        print(f"{mode:>5} batch {batch}: decode step {summary(times)}")
    for (mode, batch), times in heads.items():
        print(f"{mode:>5} batch {batch}: lm head     {summary(times)}")
    if args.profile:
        for (mode, batch), case in cases.items():
            print(f"\n=== {mode} batch {batch}: per-op self CPU time over 5 steps")
            print(profile_table(case, 5))


def profile_table(case: Case, steps: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU],
                                         record_shapes=True) as prof:
        for _ in range(steps):
            case.step()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40,
        max_shapes_column_width=60)


if __name__ == "__main__":
    main()
