"""Offline throughput and JCT: FastServe vs transformers' static batching, in one run.

All requests arrive at t=0. transformers runs them in static batches of 16 (left-padded,
each batch runs to its longest output, one batch after another: the classic pre-Orca
baseline); a request's JCT is the end of its batch. FastServe gets all 64 at once and
schedules them iteration by iteration. Both decode greedily with EOS ignored, so every
request produces exactly its requested number of tokens; throughput counts only those.

    .venv/bin/python benchmarks/offline_cpu.py [--requests 64] [--out benchmarks/results/offline_cpu.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from engine.api import Engine
from engine.bench.hf_reference import transformers_model_from_gguf
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.models.loader import default_model_path
from engine.sampling import SamplingParams

HF_BATCH = 16


def workloads(n: int, vocab: int, seed: int = 0) -> dict[str, list[tuple[list[int], int]]]:
    rng = random.Random(seed)

    def prompt(length: int) -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(length)]

    equal = [(prompt(64), 64) for _ in range(n)]
    mixed = [(prompt(int(2 ** rng.uniform(3, 8))), int(2 ** rng.uniform(2, 7))) for _ in range(n)]
    return {"a) equal: 64 in / 64 out": equal, "b) mixed: 8-256 in / 4-128 out": mixed}


def run_hf(model, reqs: list[tuple[list[int], int]], pad_id: int) -> tuple[list[float], float]:
    jct: list[float] = []
    t0 = time.perf_counter()
    for i in range(0, len(reqs), HF_BATCH):
        batch = reqs[i : i + HF_BATCH]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(batch):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        longest = max(m for _, m in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=pad_id)
        jct += [time.perf_counter() - t0] * len(batch)
    return jct, time.perf_counter() - t0


async def run_engine(engine: Engine, reqs: list[tuple[list[int], int]]) -> tuple[list[float], float, int]:
    t0 = time.perf_counter()
    jct: list[float] = [0.0] * len(reqs)
    produced = [0] * len(reqs)

    async def one(i: int, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(prompt, params):
            produced[i] += len(out.token_ids)
        jct[i] = time.perf_counter() - t0

    await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(reqs)))
    return jct, time.perf_counter() - t0, sum(produced)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/offline_cpu.md")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    path = default_model_path()

    hf = transformers_model_from_gguf(path, torch.float32)
    vocab = hf.config.vocab_size
    loads = workloads(args.requests, vocab)
    cfg = EngineConfig(
        cache=CacheConfig(kv_cache_memory=1024**3),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048),
    )
    rows = []
    engine = await Engine.create(cfg)
    try:
        # Warm both paths once (allocator, kernels) so neither pays a first-call cost.
        await run_engine(engine, [(list(range(100, 116)), 4)] * 4)
        run_hf(hf, [(list(range(100, 116)), 4)] * 4, pad_id=0)
        for name, reqs in loads.items():
            useful = sum(m for _, m in reqs)
            e_jct, e_wall, e_tok = await run_engine(engine, reqs)
            assert e_tok == useful, (e_tok, useful)
            h_jct, h_wall = run_hf(hf, reqs, pad_id=0)
            rows.append((name, "transformers (static batch 16)", useful / h_wall, statistics.mean(h_jct), h_wall))
            rows.append((name, "fastserve (fcfs, continuous)", useful / e_wall, statistics.mean(e_jct), e_wall))
            print(rows[-2], rows[-1], flush=True)
    finally:
        await engine.shutdown()

    lines = [
        "# Offline CPU benchmark: FastServe vs transformers static batching",
        "",
        f"- date: {dt.date.today().isoformat()}",
        (f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
         f"{platform.release()}; torch {torch.__version__}, {threads} threads; no GPU"),
        "- model: SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized to fp32), greedy, EOS ignored",
        (f"- command: `.venv/bin/python benchmarks/offline_cpu.py --requests {args.requests} "
         f"--max-num-seqs {args.max_num_seqs}`"),
        f"- {args.requests} requests, all arriving at t=0",
        "",
        "| workload | system | output tok/s | mean JCT (s) | makespan (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, system, tps, jct, wall in rows:
        lines.append(f"| {name} | {system} | {tps:.1f} | {jct:.2f} | {wall:.2f} |")
    for name in loads:
        h, e = [r for r in rows if r[0] == name]
        lines.append("")
        lines.append(f"{name}: throughput ×{e[2] / h[2]:.2f}, mean JCT ×{h[3] / e[3]:.2f} lower")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
