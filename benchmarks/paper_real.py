"""``benchmarks/paper_sim.py --real``: the paper's policies served by the real engine on
this machine, loaded by ``fastserve bench``'s client, next to the simulator's prediction.

Steps (every configuration sees the same jobs and the same arrival times):

1. A ``fcfs`` + ``reactive`` engine (bundled SmolLM2-135M, fp32 on CPU, a KV pool of
   ``NUM_GPU_BLOCKS`` blocks and a batch cap of ``MAX_NUM_SEQS``, so memory and the batch
   bind as on a GPU at scale) profiles itself; the profile is saved and handed to every
   skip-join engine and to the simulator.
2. On it, the whole Alpaca-like workload is submitted at t=0 over HTTP: the measured
   saturated capacity sets the arrival rate (``--real-load`` x capacity), and the run's
   makespan calibrates the simulator's per-step overhead
   (``engine.sim.simulator.calibrate_overhead``).
3. For each configuration: the simulator predicts the run (profile cost model, copies
   serial with the step as on a CPU), then a fresh engine serves it, loaded with
   ``engine.bench.client.run_load`` (what ``fastserve bench`` runs) at the timed arrivals.

Writes, under ``<out-dir>/real``: ``measured-<config>.json`` and ``simulated-<config>.json``
(bench's result shape), the ``bench report`` plots of both, and ``summary.md`` with
measured vs simulated mean JCT per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time

from typing_extensions import Self

from engine.bench.metrics import result_entry, saturated_capacity
from engine.bench.report import write_report
from engine.bench.workload import WorkItem, build_workload
from engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
)
from engine.policies.profile import PrefillProfile

MAX_NUM_SEQS = 4
NUM_GPU_BLOCKS = 96  # 1536 tokens of KV
BLOCK_SIZE = 16
SWAP_MS_PER_BLOCK = 0.2  # a CPU memcpy of one block of SmolLM2's KV, roughly
CONFIGS = [
    ("orca-fcfs", "orca-fcfs", "recompute"),
    ("fcfs+reactive", "fcfs", "reactive"),
    ("fcfs+recompute", "fcfs", "recompute"),
    ("mlfq+proactive", "mlfq", "proactive"),
    ("skip-join+proactive", "skip-join-mlfq", "proactive"),
    ("skip-join+reactive", "skip-join-mlfq", "reactive"),
    ("skip-join+recompute", "skip-join-mlfq", "recompute"),
]
QUICK = ["fcfs+reactive", "skip-join+proactive"]


PROFILE_ROUNDS = 2  # whole profiles taken; each point keeps its fastest round
PROFILE_REPEATS = 5  # timed repeats per point inside a round (the worker keeps the best)


def steady_profile(raw: list[dict]) -> PrefillProfile:
    """One profile from several rounds of the worker's: each point's fastest round (a
    shared CPU only ever adds time), and the decode curve replaced by its least-squares
    line over the batch sizes measured. On a CPU a decode step is close to affine in the
    batch at these sizes; a single noisy point (one round measured batch 2 as slow as
    batch 4 here) otherwise bends the piecewise-linear curve the simulator prices steps
    with, and a run near capacity turns a few milliseconds per step into a large JCT error.
    """
    def fastest(kind: str) -> list[tuple[int, float]]:
        xs = sorted({int(x) for r in raw for x, _ in r[kind]})
        return [(x, min(t for r in raw for xx, t in r[kind] if int(xx) == x)) for x in xs]

    decode = fastest("decode")
    if len(decode) >= 2:
        n = len(decode)
        mx = sum(x for x, _ in decode) / n
        my = sum(t for _, t in decode) / n
        sxx = sum((x - mx) ** 2 for x, _ in decode)
        slope = max(0.0, sum((x - mx) * (t - my) for x, t in decode) / sxx)
        decode = [(x, my + slope * (x - mx)) for x, _ in decode]
    return PrefillProfile(fastest("prefill"), decode)


def engine_config(policy: str, swap: str, profile_path: str | None) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(dtype="float32", max_model_len=1024),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_GPU_BLOCKS,
                          num_host_blocks_override=4 * NUM_GPU_BLOCKS),
        scheduler=SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=MAX_NUM_SEQS,
                                  profile_path=profile_path if policy != "orca-fcfs" else None),
        server=ServerConfig(host="127.0.0.1", port=0, zmq_address="off"),
        # A busy machine can take minutes to load and profile; a slow start is not a failure.
        parallel=ParallelConfig(startup_timeout_s=1800.0),
    )


class Served:
    """An engine behind the real HTTP app on a free loopback port."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg

    async def __aenter__(self) -> Self:
        from engine.api import Engine
        from engine.server import build_app, start_http
        from engine.server.http import default_model_name

        self.engine = await Engine.create(self.cfg)
        name = default_model_name(self.cfg)
        self.runner, port = await start_http(build_app(self.engine, self.cfg.server, name),
                                             "127.0.0.1", 0)
        self.url, self.model = f"http://127.0.0.1:{port}", name
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.engine.shutdown()


async def _load(served: Served, items: list[WorkItem], prompts: list[str], desc: str):
    from engine.bench.client import run_load

    return await run_load(items, prompts, backend="http", base_url=served.url,
                          model=served.model, progress=True, desc=desc)


async def _warm_up(served: Served, prompts: list[str]) -> None:
    await _load(served, [WorkItem(8, 4, 0.0)] * 2, prompts[:2], "warm-up")


async def _real(args: argparse.Namespace) -> None:
    from engine.bench.prompts import PromptBuilder
    from engine.sim import CostModel, simulate
    from engine.sim.simulator import build_scheduler, calibrate_overhead

    out = os.path.join(args.out_dir, "real")
    os.makedirs(out, exist_ok=True)
    n = 8 if args.quick else args.real_requests
    labels = QUICK if args.quick else [c[0] for c in CONFIGS]
    configs = [c for c in CONFIGS if c[0] in labels]
    lengths = build_workload("alpaca", n, rate=math.inf, seed=args.seed,
                             max_input_len=128, max_output_len=128 if not args.quick else 16)
    profile_path = os.path.join(out, "profile.json")
    async with Served(engine_config("fcfs", "reactive", None)) as s:
        longest = max(it.prompt_len for it in lengths)
        sizes = sorted({n for n in (1, 8, 32, 64) if n < longest} | {longest})
        builder = PromptBuilder(s.engine.tokenizer.encode)
        prompts = [builder.text(it.prompt_len, i) for i, it in enumerate(lengths)]
        await _warm_up(s, prompts)
        raw = [await s.engine.profile(lengths=sizes, batch_sizes=list(range(1, MAX_NUM_SEQS + 1)),
                                      repeats=PROFILE_REPEATS) for _ in range(PROFILE_ROUNDS)]
        profile = steady_profile(raw)
        profile.save(profile_path)
        with open(os.path.join(out, "profile_raw.json"), "w", encoding="utf-8") as f:  # noqa: ASYNC230
            json.dump(raw, f)
        records, makespan = await _load(s, lengths, prompts, "capacity")
    ok = [r for r in records if r.ok]
    cap = saturated_capacity([r.token_s for r in ok], [r.num_output_tokens for r in ok])
    rate = args.real_load * cap
    timed = build_workload("alpaca", n, rate=rate, seed=args.seed, max_input_len=128,
                           max_output_len=128 if not args.quick else 16)
    print(f"fcfs capacity {cap:.3f} req/s (makespan {makespan:.1f} s); rate {rate:.3f} req/s")

    def core(policy: str, swap: str):
        cfg = SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=MAX_NUM_SEQS)
        return build_scheduler(cfg, NUM_GPU_BLOCKS, 4 * NUM_GPU_BLOCKS, BLOCK_SIZE, profile)

    cost = CostModel(profile, SWAP_MS_PER_BLOCK / 1e3, overlap=False)
    overhead = calibrate_overhead(core("fcfs", "reactive"), lengths, cost, makespan)
    cost = cost.with_overhead(overhead)
    rows, files = [], []
    for label, policy, swap in configs:
        sim = simulate(core(policy, swap), timed, cost, max_model_len=1024)
        sim_entry = result_entry(sim.records, rate)
        async with Served(engine_config(policy, swap, profile_path)) as s:
            await _warm_up(s, prompts)
            records, duration = await _load(s, timed, prompts, label)
            sched = await s.engine.stats()
        entry = result_entry(records, rate, duration)
        for kind, e in (("measured", entry), ("simulated", sim_entry)):
            path = os.path.join(out, f"{kind}-{label}.json")
            with open(path, "w", encoding="utf-8") as f:  # noqa: ASYNC230 - small result files, between runs
                json.dump({"source": "bench" if kind == "measured" else "simulate",
                           "label": f"{label} ({kind})", "scheduling_policy": policy,
                           "swap_policy": swap, "workload": "alpaca", "seed": args.seed,
                           "server_scheduler": {k: v for k, v in sched.items() if k != "jobs"}
                           if kind == "measured" else None,
                           "results": [e]}, f, default=str)
            files.append(path)
        err = sim_entry["mean_jct_s"] / entry["mean_jct_s"] - 1 if entry["mean_jct_s"] else math.nan
        rows.append((label, entry, sim_entry, err))
        print(f"{label}: measured mean JCT {entry['mean_jct_s']:.2f} s, simulated "
              f"{sim_entry['mean_jct_s']:.2f} s ({100 * err:+.0f} %)", flush=True)
    write_report(files, out)
    lines = [
        "# Measured on this machine, and simulated\n",
        (f"Generated by `benchmarks/paper_sim.py --real{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs. SmolLM2-135M fp32, batch cap "
        f"{MAX_NUM_SEQS}, {NUM_GPU_BLOCKS} KV blocks of {BLOCK_SIZE}; Alpaca-like workload, {n} "
        f"requests (outputs clipped to {128 if not args.quick else 16} tokens), Poisson at "
        f"{args.real_load:g} x the measured fcfs capacity ({cap:.3f} req/s) = {rate:.3f} req/s. "
        f"Simulator: the profile measured on the fcfs engine after warm-up (each point the "
        f"fastest of {PROFILE_ROUNDS} rounds of {PROFILE_REPEATS} repeats, the decode curve "
        f"its least-squares line; `profile.json`, rounds in `profile_raw.json`), per-step "
        f"overhead {1e3 * overhead:.1f} ms calibrated on the capacity run.\n"),
        ("| configuration | measured mean JCT (s) | simulated mean JCT (s) | error | measured p99 "
        "JCT (s) | simulated p99 JCT (s) | measured mean TTFT (ms) |"),
        "|---|---|---|---|---|---|---|",
    ]
    for label, e, se, err in rows:
        lines.append(f"| {label} | {e['mean_jct_s']:.2f} | {se['mean_jct_s']:.2f} | "
                     f"{100 * err:+.1f} % | {e['p99_jct_s']:.2f} | {se['p99_jct_s']:.2f} | "
                     f"{e['mean_ttft_ms']:.0f} |")
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:  # noqa: ASYNC230
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_real(args: argparse.Namespace) -> None:
    asyncio.run(_real(args))
