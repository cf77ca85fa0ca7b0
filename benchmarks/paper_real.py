"""``benchmarks/paper_sim.py --real``: the paper's policies served by the real engine on
this machine, loaded by ``fastserve bench``'s client, next to the simulator's prediction.

Steps (every configuration sees the same jobs and the same arrival times):

1. A ``fcfs`` + ``reactive`` engine (bundled SmolLM2-135M, fp32 on CPU, a KV pool of
   ``NUM_GPU_BLOCKS`` blocks and a batch cap of ``MAX_NUM_SEQS``, so memory and the batch
   bind as on a GPU at scale) profiles itself; the profile is saved and handed to every
   skip-join engine and to the simulator.
2. On it, the whole Alpaca-like workload is submitted at t=0 over HTTP: the measured
   saturated capacity sets the arrival rate (``--real-load`` x capacity). A second fcfs
   engine with a batch cap of 1 serves the first ``CALIBRATION_JOBS`` jobs at t=0. The
   two makespans fit the simulator's decode line (step cost at batch 1 and per extra
   job, ``engine.sim.simulator.calibrate_decode_line``); the prefill curve stays the
   worker's.
3. The simulator predicts each configuration's run (profile cost model, copies serial
   with the step as on a CPU). Then each configuration is served ``--real-repeats`` times
   at the timed arrivals, the repeats going round the configurations, each run by a fresh
   engine in a fresh process, loaded with ``engine.bench.client.run_load`` (what
   ``fastserve bench`` runs); the run with the median mean JCT is the measured one.

Why repeats and a fresh process, and why 0.7 x capacity by default: on this shared 2-core
machine a run near saturation is not reproducible. At 0.9 x capacity the same fcfs
configuration measured 3.75 to 4.54 s of mean JCT in separate processes and 9.97 s inside
one long benchmark process (2026-11-30): near saturation the queue multiplies a few
percent of step time into tens of percent of JCT (mean wait grows as 1 / (1 - load)), so
one run says little, and no predictor can be within 10 % of it.

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
import subprocess
import sys
import time

from typing_extensions import Self

if __name__ == "__main__":  # a measured run's own process: the repository on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
CALIBRATION_JOBS = 24  # served one at a time to pin the batch-1 step cost
MEASURE_TIMEOUT_S = 3600  # one measured run, start-up included, on a busy machine


PROFILE_ROUNDS = 2  # whole profiles taken; each point keeps its fastest round
PROFILE_REPEATS = 5  # timed repeats per point inside a round (the worker keeps the best)


def steady_profile(raw: list[dict]) -> PrefillProfile:
    """One profile from several rounds of the worker's: each point's fastest round (a
    shared CPU only ever adds time), and the decode curve replaced by its least-squares
    line over the batch sizes measured (a single noisy point, one round measured batch 2
    as slow as batch 4 here, would otherwise bend the piecewise-linear curve). This is the
    profile the skip-join engines are given (they read its prefill curve); the simulator
    prices decode steps with the line ``calibrate_decode_line`` fits on served runs instead.
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


def engine_config(policy: str, swap: str, profile_path: str | None,
                  max_num_seqs: int = MAX_NUM_SEQS) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(dtype="float32", max_model_len=1024),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_GPU_BLOCKS,
                          num_host_blocks_override=4 * NUM_GPU_BLOCKS),
        scheduler=SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=max_num_seqs,
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


def _workload(n: int, rate: float, seed: int, quick: bool) -> list[WorkItem]:
    return build_workload("alpaca", n, rate=rate, seed=seed, max_input_len=128,
                          max_output_len=16 if quick else 128)


async def _measure_one(spec: dict) -> None:
    """One measured run, alone in this process (``--measure-one``): a fresh engine serves
    the timed workload; its bench result entry and scheduler counters go to
    ``spec["out"]``."""
    from engine.bench.prompts import PromptBuilder

    timed = _workload(spec["n"], spec["rate"], spec["seed"], spec["quick"])
    async with Served(engine_config(spec["policy"], spec["swap"], spec["profile"])) as s:
        builder = PromptBuilder(s.engine.tokenizer.encode)
        prompts = [builder.text(it.prompt_len, i) for i, it in enumerate(timed)]
        await _warm_up(s, prompts)
        before = await s.engine.stats()
        records, duration = await _load(s, timed, prompts, spec["label"])
        sched = await s.engine.stats()
    entry = result_entry(records, spec["rate"], duration)
    steps = sched["num_steps"] - before["num_steps"]
    with open(spec["out"], "w", encoding="utf-8") as f:  # noqa: ASYNC230 - after the run
        json.dump({"entry": entry, "steps": steps,
                   "served_step_s": (sched["busy_s"] - before["busy_s"]) / max(1, steps),
                   "server_scheduler": {k: v for k, v in sched.items() if k != "jobs"}},
                  f, default=str)


def _measure(spec: dict) -> dict:
    """Run ``_measure_one`` in a child process: every measured run starts from a fresh
    interpreter, so no run inherits the heap, threads or sockets of the ones before it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-one", json.dumps(spec)]
    subprocess.run(cmd, check=True, timeout=MEASURE_TIMEOUT_S)
    with open(spec["out"], encoding="utf-8") as f:
        return json.load(f)


def _median_run(runs: list[dict]) -> dict:
    """The run whose mean JCT is the median (the lower middle one for an even count)."""
    ranked = sorted(runs, key=lambda r: r["entry"]["mean_jct_s"])
    return ranked[(len(ranked) - 1) // 2]


async def _profile_and_calibrate(lengths: list[WorkItem], profile_path: str, out: str):
    """The worker's profile, then the two saturated fcfs runs the simulator is calibrated
    on: every job at t=0 with the batch cap (its makespan also gives the capacity), and
    the first ``CALIBRATION_JOBS`` at t=0 one at a time (batch cap 1)."""
    from engine.bench.prompts import PromptBuilder

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
    one_by_one = lengths[:CALIBRATION_JOBS]
    async with Served(engine_config("fcfs", "reactive", None, max_num_seqs=1)) as s:
        await _warm_up(s, prompts)
        _, makespan_1 = await _load(s, one_by_one, prompts, "batch cap 1")
    return profile, records, makespan, one_by_one, makespan_1


def _real(args: argparse.Namespace) -> None:
    from engine.sim import CostModel, simulate
    from engine.sim.simulator import build_scheduler, calibrate_decode_line

    out = os.path.join(args.out_dir, "real")
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    n = 8 if args.quick else args.real_requests
    repeats = 1 if args.quick else args.real_repeats
    labels = QUICK if args.quick else [c[0] for c in CONFIGS]
    configs = [c for c in CONFIGS if c[0] in labels]
    lengths = _workload(n, math.inf, args.seed, args.quick)
    profile_path = os.path.join(out, "profile.json")
    profile, records, makespan, one_by_one, makespan_1 = asyncio.run(
        _profile_and_calibrate(lengths, profile_path, out))
    ok = [r for r in records if r.ok]
    cap = saturated_capacity([r.token_s for r in ok], [r.num_output_tokens for r in ok])
    rate = args.real_load * cap
    timed = _workload(n, rate, args.seed, args.quick)
    print(f"fcfs capacity {cap:.3f} req/s (makespan {makespan:.1f} s); rate {rate:.3f} req/s")

    def core(policy: str, swap: str, max_num_seqs: int = MAX_NUM_SEQS):
        cfg = SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=max_num_seqs)
        return build_scheduler(cfg, NUM_GPU_BLOCKS, 4 * NUM_GPU_BLOCKS, BLOCK_SIZE, profile)

    cost = calibrate_decode_line(
        [(lambda: core("fcfs", "reactive"), lengths, makespan),
         (lambda: core("fcfs", "reactive", 1), one_by_one, makespan_1)],
        CostModel(profile, SWAP_MS_PER_BLOCK / 1e3, overlap=False))
    line = cost.profile
    line.save(os.path.join(out, "profile_calibrated.json"))
    d1, d4 = line.decode_step_time(1), line.decode_step_time(MAX_NUM_SEQS)
    print(f"decode line from served runs: {1e3 * d1:.1f} ms at batch 1, {1e3 * d4:.1f} ms at "
          f"batch {MAX_NUM_SEQS} (profile: {1e3 * profile.decode_step_time(1):.1f} / "
          f"{1e3 * profile.decode_step_time(MAX_NUM_SEQS):.1f} ms)")
    sims = {label: simulate(core(policy, swap), timed, cost, max_model_len=1024)
            for label, policy, swap in configs}
    simulated = {label: result_entry(sim.records, rate) for label, sim in sims.items()}

    def at_run_speed(label: str, policy: str, swap: str, run: dict) -> tuple[float, dict]:
        """The simulator's prediction of ``run`` with every step cost scaled by how much
        slower (or faster) the run's steps were as served than the simulated steps: the
        machine's speed during that run, taken from its step times alone (busy time over
        steps), not from its JCT."""
        sim = sims[label]
        factor = run["served_step_s"] / (sim.busy_s / sim.steps)
        scaled = CostModel(PrefillProfile([(x, factor * y) for x, y in line.prefill_points],
                                          [(x, factor * y) for x, y in line.decode_points]),
                           cost.swap_s_per_block * factor, cost.overlap)
        return factor, result_entry(simulate(core(policy, swap), timed, scaled,
                                             max_model_len=1024).records, rate)
    # Repeats go round the configurations (all of them once, then again), so a slow spell
    # of the shared machine lands on different configurations rather than all of one.
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    for rep in range(repeats):
        for label, policy, swap in configs:
            spec = {"label": f"{label} #{rep + 1}", "policy": policy, "swap": swap,
                    "profile": profile_path if policy != "orca-fcfs" else None,
                    "n": n, "rate": rate, "seed": args.seed, "quick": args.quick,
                    "out": os.path.join(runs_dir, f"{label}-{rep + 1}.json")}
            run = _measure(spec)
            run["speed_factor"], run["at_run_speed"] = at_run_speed(label, policy, swap, run)
            runs[label].append(run)
            print(f"{spec['label']}: measured mean JCT {run['entry']['mean_jct_s']:.2f} s "
                  f"(simulated {simulated[label]['mean_jct_s']:.2f} s; at this run's step speed, "
                  f"x{run['speed_factor']:.3f}: {run['at_run_speed']['mean_jct_s']:.2f} s)",
                  flush=True)
    rows, files = [], []
    for label, policy, swap in configs:
        median = _median_run(runs[label])
        sim_entry = simulated[label]
        for kind, e in (("measured", median["entry"]), ("simulated", sim_entry)):
            path = os.path.join(out, f"{kind}-{label}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"source": "bench" if kind == "measured" else "simulate",
                           "label": f"{label} ({kind})", "scheduling_policy": policy,
                           "swap_policy": swap, "workload": "alpaca", "seed": args.seed,
                           "server_scheduler": median["server_scheduler"]
                           if kind == "measured" else None,
                           "measured_mean_jct_s_all_runs":
                           [r["entry"]["mean_jct_s"] for r in runs[label]]
                           if kind == "measured" else None,
                           "results": [e]}, f, default=str)
            files.append(path)
        jcts = [r["entry"]["mean_jct_s"] for r in runs[label]]
        e = median["entry"]
        err = sim_entry["mean_jct_s"] / e["mean_jct_s"] - 1 if e["mean_jct_s"] else math.nan
        matched = [r["at_run_speed"]["mean_jct_s"] / r["entry"]["mean_jct_s"] - 1
                   for r in runs[label] if r["entry"]["mean_jct_s"]]
        speeds = [r["speed_factor"] for r in runs[label]]
        rows.append((label, e, sim_entry, err, jcts, median, matched, speeds))
    write_report(files, out)
    lines = [
        "# Measured on this machine, and simulated\n",
        (f"Generated by `benchmarks/paper_sim.py --real{' --quick' if args.quick else ''} "
         f"--real-load {args.real_load:g} --real-repeats {repeats}` on "
         f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs. SmolLM2-135M fp32, batch "
         f"cap {MAX_NUM_SEQS}, {NUM_GPU_BLOCKS} KV blocks of {BLOCK_SIZE}; Alpaca-like workload, "
         f"{n} requests (outputs clipped to {16 if args.quick else 128} tokens), Poisson at "
         f"{args.real_load:g} x the measured fcfs capacity ({cap:.3f} req/s) = {rate:.3f} req/s. "
         f"Each configuration was served {repeats} time(s), each run by a fresh process, the "
         f"repeats going round the configurations; the measured columns are the run with the "
         f"median mean JCT, and the spread is the lowest and highest mean JCT of the runs "
         f"(every run: `runs/`). Simulator: the prefill curve the fcfs engine's worker "
         f"measured after warm-up (each point the fastest of {PROFILE_ROUNDS} rounds of "
         f"{PROFILE_REPEATS} repeats; `profile.json`, rounds in `profile_raw.json`) and a "
         f"decode line fitted on two saturated fcfs runs served at t=0 (the whole workload "
         f"with the batch cap, makespan {makespan:.1f} s; its first {len(one_by_one)} jobs one "
         f"at a time, {makespan_1:.1f} s): {1e3 * d1:.1f} ms per step at batch 1, "
         f"{1e3 * d4:.1f} ms at batch {MAX_NUM_SEQS} (`profile_calibrated.json`; the worker's "
         f"own decode profile said {1e3 * profile.decode_step_time(1):.1f} / "
         f"{1e3 * profile.decode_step_time(MAX_NUM_SEQS):.1f} ms).\n"),
        ("Two predictions per run. *Simulated*: from the calibration above, made before any "
         "measured run (what a user of the simulator gets). *At the run's step speed*: the "
         "same simulation with every step cost multiplied by the run's own served step time "
         "(the engine's busy time over its steps, `busy_s` in its stats) over the simulated "
         "one: this takes the machine's speed during that run from its step times, never "
         "from its JCT, and so separates the scheduling model's error from the shared "
         "machine's drift.\n"),
        ("| configuration | measured mean JCT (s), median run | spread over runs (s) | simulated "
         "mean JCT (s) | error vs median | at the median run's step speed: step-time factor, "
         "mean JCT (s), error | error at each run's step speed, every run | measured p99 JCT "
         "(s) | simulated p99 JCT (s) | measured mean TTFT (ms) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, e, se, err, jcts, median, matched, _speeds in rows:
        m = median["at_run_speed"]["mean_jct_s"]
        lines.append(
            f"| {label} | {e['mean_jct_s']:.2f} | {min(jcts):.2f}-{max(jcts):.2f} | "
            f"{se['mean_jct_s']:.2f} | {100 * err:+.1f} % | x{median['speed_factor']:.3f}, "
            f"{m:.2f}, {100 * (m / e['mean_jct_s'] - 1):+.1f} % | "
            f"{', '.join(f'{100 * x:+.0f} %' for x in matched)} | {e['p99_jct_s']:.2f} | "
            f"{se['p99_jct_s']:.2f} | {e['mean_ttft_ms']:.0f} |")
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_real(args: argparse.Namespace) -> None:
    _real(args)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-one":
        asyncio.run(_measure_one(json.loads(sys.argv[2])))
    else:
        sys.exit("usage: run benchmarks/paper_sim.py --real (this file's own entry point "
                 "is its measured runs': --measure-one SPEC)")
