"""Pipeline and tensor parallelism on this CPU (gloo, one torch thread per rank).

For (tp, pp) in (1, 2) and (2, 2), with 1 batch in flight and with pp batches in flight
(the streaming pipeline), the same workload runs and each rank reports the time it spent in
steps and, of that, the time it sat blocked on its neighbour stage. Per stage:

- step time: compute per step (time in steps minus blocked time, over the step count);
- bubble: the fraction of the run's wall time the stage was not computing.

With one batch in flight each stage waits for the other for a whole step, so the bubble of
a two-stage pipeline is about one half; with two in flight it shrinks toward the
scheduling and transfer overhead. Then the throughput (output tokens/s) of (2, 1) against
(1, 1) on the same model and workload.

A CPU box has no free devices: two ranks share the cores that one rank would use, so
throughput does not double here; the bubble is the property this run can show. Numbers
come from one run on a shared machine: read them as directions, not as constants.

    .venv/bin/python benchmarks/parallel_cpu.py [--out benchmarks/results/parallel_cpu.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.api import Engine
from engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from engine.sampling import SamplingParams

DEFAULT_OUT = "benchmarks/results/parallel_cpu.md"
# Big enough that a step's compute dominates gloo's per-message cost, small enough to run
# in minutes on two shared cores.
MODEL = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 768, "num_hidden_layers": 8}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=24)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="batch cap (a batch per stage: half the jobs)")
    return ap.parse_args()


def config(path: str, tp: int, pp: int, in_flight: int | None, seqs: int) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(path=path, dtype="float32"),
        cache=CacheConfig(block_size=16, num_gpu_blocks_override=256, num_host_blocks_override=0),
        scheduler=SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=4096),
        parallel=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, torch_threads=1,
                                max_batches_in_flight=in_flight),
    )


async def run(path: str, args: argparse.Namespace, tp: int, pp: int, in_flight: int | None) -> dict:
    engine = await Engine.create(config(path, tp, pp, in_flight, args.max_num_seqs))
    try:
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

        async def one(i: int) -> int:
            prompt = [(13 * i + 7 * k) % 500 + 3 for k in range(args.prompt_len)]
            n = 0
            async for out in engine.generate(prompt, params):
                n += len(out.token_ids)
            return n

        await one(0)  # warm-up: first calls pay for allocation
        before = await engine._workers.executor.call_all("health")
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(args.requests))))
        wall = time.perf_counter() - t0
        after = await engine._workers.executor.call_all("health")
    finally:
        await engine.shutdown()
    stages = []
    for stage in range(pp):
        rank = stage * tp  # TP rank 0 of the stage speaks for it
        a, b = after[rank], before[rank]
        steps = a["num_steps"] - b["num_steps"]
        compute = (a["step_s"] - b["step_s"]) - (a["wait_s"] - b["wait_s"])
        stages.append({"step_ms": 1e3 * compute / max(steps, 1), "bubble": 1 - compute / wall})
    return {"tp": tp, "pp": pp, "in_flight": in_flight or pp, "wall": wall, "tokens": tokens,
            "tps": tokens / wall, "stages": stages}


async def main() -> None:
    args = parse_args()
    from tests.tiny_models import make_tiny_model_dir

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model_dir("llama", tmp, **MODEL)
        rows = []
        for tp, pp, depth in [(1, 2, 1), (1, 2, 2), (2, 2, 1), (2, 2, 2)]:
            r = await run(path, args, tp, pp, depth)
            print(r, flush=True)
            rows.append(r)
        tput = []
        for tp in (1, 2):
            r = await run(path, args, tp, 1, None)
            print(r, flush=True)
            tput.append(r)
    lines = [
        "# Pipeline and tensor parallelism on CPU (gloo)",
        "",
        (f"`benchmarks/parallel_cpu.py`: Llama {MODEL}, fp32, {args.requests} requests of "
        f"{args.prompt_len} prompt + {args.output_len} output tokens at once, batch cap "
        f"{args.max_num_seqs}, one torch thread per rank, {os.cpu_count()} cores shared with other work."),
        "",
        "## Pipeline bubble: 1 batch in flight vs one per stage",
        "",
        "| tp | pp | batches in flight | wall s | tokens/s | stage | compute ms/step | bubble |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for s, st in enumerate(r["stages"]):
            lines.append(f"| {r['tp']} | {r['pp']} | {r['in_flight']} | {r['wall']:.2f} | {r['tps']:.1f} | {s} "
                         f"| {st['step_ms']:.2f} | {st['bubble']:.0%} |")
    lines += [
        "",
        "## Tensor parallelism: (2, 1) against (1, 1)",
        "",
        "| tp | pp | wall s | tokens/s |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['tp']} | 1 | {r['wall']:.2f} | {r['tps']:.1f} |" for r in tput]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
