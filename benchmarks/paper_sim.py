"""The FastServe paper's comparison, in simulation at the paper's scale and measured on
this machine.

Simulation (default). The real scheduler core, policy plugins and block manager on a
virtual clock (``engine/sim``), steps priced by the analytic cost model of a GPU cluster
(``engine/sim/analytic.py``): OPT-13B on one A100-80GB and GPT-3 175B on 16 A100-80GB
(TP 8 x PP 2). For each workload (ShareGPT-like and Alpaca-like, ``engine/bench/workload``),
the capacity of vLLM-style FCFS (``fcfs`` + ``reactive``) is measured by submitting the
whole workload at t=0 (``engine.bench.metrics.saturated_capacity``); arrivals are then
Poisson at ``--loads`` x that capacity, the same seeded jobs and arrival gaps for every
configuration. Configurations: Orca-style FCFS (``orca-fcfs``, max-length reservation),
vLLM-style FCFS (``fcfs`` with ``reactive`` or ``recompute``), MLFQ, skip-join MLFQ with
``proactive`` / ``reactive`` / ``recompute`` swapping, and the oracle bound
(``oracle-srpt``: shortest remaining output first, knowing every length). Every policy
runs with its default knobs: nothing is tuned to the workload.

Real (``--real``). The same policies served by the real engine (bundled SmolLM2-135M on
this CPU) and loaded with ``fastserve bench``'s client over HTTP, an Alpaca-like workload
at ``--real-load`` x the measured FCFS capacity; beside each run, the simulator's
prediction of it from the profile the worker measured (``--profile`` mode, per-step
overhead calibrated on the capacity run, as ``benchmarks/policies_cpu.py`` does). This
needs a quiet machine; ``--real --quick`` is a smoke run.

Outputs (``--out-dir``, default ``benchmarks/results/paper_sim``): one bench-shaped JSON
per configuration, ``fastserve bench report`` plots per setup and workload, and
``summary.md`` with the ratios at ``--headline-load``.

    .venv/bin/python benchmarks/paper_sim.py [--setups opt13b-1xa100,gpt3-16xa100] [--jobs 2]
    .venv/bin/python benchmarks/paper_sim.py --real [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.bench.metrics import result_entry
from engine.bench.report import write_report
from engine.bench.workload import WorkItem, build_workload
from engine.config import SchedulerConfig

SETUPS = {
    "opt13b-1xa100": {"model": "opt-13b", "gpu": "a100-80gb", "tp": 1, "pp": 1},
    "gpt3-16xa100": {"model": "gpt3-175b", "gpu": "a100-80gb", "tp": 8, "pp": 2},
}
CONFIGS = [  # (label, scheduling policy, swap policy)
    ("orca-fcfs", "orca-fcfs", "recompute"),
    ("fcfs+reactive", "fcfs", "reactive"),
    ("fcfs+recompute", "fcfs", "recompute"),
    ("mlfq+proactive", "mlfq", "proactive"),
    ("skip-join+proactive", "skip-join-mlfq", "proactive"),
    ("skip-join+reactive", "skip-join-mlfq", "reactive"),
    ("skip-join+recompute", "skip-join-mlfq", "recompute"),
    ("oracle-srpt", "oracle-srpt", "reactive"),
    # The same orders under skip-join's default admission rules (a job whose KV is not on
    # the GPU never evicts a resident one, and gets in only while 5 % of the KV cache stays
    # free): how much of skip-join's result is its admission and how much its order, and the
    # bound on the order under those rules.
    ("fcfs-admit+reactive", "fcfs", "reactive"),
    ("oracle-srpt-admit", "oracle-srpt", "reactive"),
]
ADMIT = (("evict_to_admit", False), ("admission_reserve_frac", 0.05))
OPTIONS = {"fcfs-admit+reactive": ADMIT, "oracle-srpt-admit": ADMIT}  # label -> policy options
BASELINE = "fcfs+reactive"  # whose capacity defines the load
MAX_NUM_SEQS = 256  # vLLM's default batch cap
MAX_NUM_BATCHED_TOKENS = 2048


def _cost(setup: str):
    from engine.sim.analytic import AnalyticCost, ClusterConfig
    from engine.sim.hardware import GPUS, MODELS

    s = SETUPS[setup]
    return AnalyticCost(MODELS[s["model"]], GPUS[s["gpu"]], ClusterConfig(
        tensor_parallel_size=s["tp"], pipeline_parallel_size=s["pp"]))


def _core(cost, policy: str, swap: str, capacity_run: bool = False, options: tuple = ()):
    from engine.sim.simulator import build_scheduler

    # The capacity run queues all its jobs at once: no admission cap may refuse them.
    limits = {"max_waiting": 1 << 30, "max_waiting_tokens": None} if capacity_run else {}
    cfg = SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=MAX_NUM_SEQS,
                          max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, policy_options=options,
                          **limits)
    return build_scheduler(cfg, cost.num_gpu_blocks, cost.num_host_blocks,
                           cost.cluster.block_size, cost.profile())


def _items(workload: str, n: int, seed: int, rate: float, max_len: int) -> list[WorkItem]:
    items = build_workload(workload, n, rate=rate, seed=seed)
    return [WorkItem(min(it.prompt_len, max_len - it.output_len), it.output_len, it.arrival_s)
            for it in items]


def capacity(setup: str, workload: str, n: int, seed: int) -> tuple[float, int]:
    """(jobs/s the baseline sustains with a queue that never runs dry, jobs in that run)."""
    from engine.sim.simulator import capacity_jobs, fcfs_capacity

    cost = _cost(setup)
    max_len = cost.model.max_model_len
    kv_tokens = cost.num_gpu_blocks * cost.cluster.block_size
    m = capacity_jobs(_items(workload, n, seed, math.inf, max_len), kv_tokens, MAX_NUM_SEQS)
    items = _items(workload, m, seed, math.inf, max_len)
    _, pol, swap = next(c for c in CONFIGS if c[0] == BASELINE)
    return fcfs_capacity(_core(cost, pol, swap, capacity_run=True), items, cost,
                         max_model_len=max_len), m


def run_one(task: tuple) -> tuple:
    from engine.sim import simulate

    setup, workload, n, seed, label, rate = task
    cost = _cost(setup)
    _, pol, swap = next(c for c in CONFIGS if c[0] == label)
    items = _items(workload, n, seed, rate, cost.model.max_model_len)
    t = time.perf_counter()
    r = simulate(_core(cost, pol, swap, options=OPTIONS.get(label, ())), items, cost,
                 max_model_len=cost.model.max_model_len)
    entry = result_entry(r.records, rate)
    entry.update(preemptions=r.preemptions, swap_out_blocks=r.swap_out_blocks,
                 swap_in_blocks=r.swap_in_blocks, recomputes=r.recomputes, steps=r.steps,
                 sim_wall_s=time.perf_counter() - t)
    return setup, workload, label, entry


def simulate_all(args: argparse.Namespace) -> None:
    tasks, caps = [], {}
    for setup in args.setups:
        for workload in args.workloads:
            n = args.num_prompts[workload]
            cap, m = capacity(setup, workload, n, args.seed)
            caps[(setup, workload)] = cap
            print(f"{setup} {workload}: fcfs capacity {cap:.3f} req/s ({m} jobs queued at t=0)",
                  flush=True)
            tasks += [(setup, workload, n, args.seed, label, f * cap)
                      for label, _, _ in CONFIGS for f in args.loads]
    results: dict[tuple, list] = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for setup, workload, label, entry in pool.map(run_one, tasks):
            results.setdefault((setup, workload, label), []).append(entry)
            print(f"  {setup} {workload} {label} @ {entry['request_rate']:.3f}/s: mean JCT "
                  f"{entry['mean_jct_s']:.2f} s, p99 {entry['p99_jct_s']:.2f} s "
                  f"({entry['sim_wall_s']:.0f} s to simulate)", flush=True)
    lines = ["# Simulated: FastServe's comparison at the paper's scale\n",
             (f"Generated by `benchmarks/paper_sim.py {' '.join(sys.argv[1:])}` on "
             f"{time.strftime('%Y-%m-%d')}. Loads are fractions of the simulated capacity of "
             f"vLLM-style FCFS (`{BASELINE}`); seed {args.seed}; batch cap {MAX_NUM_SEQS}, "
             f"{MAX_NUM_BATCHED_TOKENS} tokens per step; default policy knobs, except the "
             "`-admit` rows: `fcfs` and `oracle-srpt` given skip-join's default admission rules "
             f"({', '.join(f'{k}={v}' for k, v in ADMIT)}).\n")]
    for setup in args.setups:
        for workload in args.workloads:
            d = os.path.join(args.out_dir, setup, workload)
            os.makedirs(d, exist_ok=True)
            files = []
            for label, pol, swap in CONFIGS:
                entries = sorted(results[(setup, workload, label)], key=lambda e: e["request_rate"])
                path = os.path.join(d, f"{label}.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump({"source": "simulate", "label": label, "scheduling_policy": pol,
                               "swap_policy": swap, "policy_options": dict(OPTIONS.get(label, ())),
                               "workload": workload, "seed": args.seed,
                               "cost_model": _cost(setup).describe(), "results": entries}, f)
                files.append(path)
            write_report(files, d)
            for path in files:  # plotted: the per-request rows stay out of the repository
                with open(path, encoding="utf-8") as f:
                    run = json.load(f)
                for entry in run["results"]:
                    entry.pop("requests", None)
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(run, f, indent=1)
            lines += headline(setup, workload, caps[(setup, workload)], results, args)
    with open(os.path.join(args.out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _at(entries: list, rate: float) -> dict:
    return min(entries, key=lambda e: abs(e["request_rate"] - rate))


def headline(setup: str, workload: str, cap: float, results: dict, args) -> list[str]:
    rate = args.headline_load * cap
    row = {label: _at(results[(setup, workload, label)], rate) for label, _, _ in CONFIGS}
    out = [f"\n## {setup}, {workload} (fcfs capacity {cap:.2f} req/s)\n",
           (f"At {args.headline_load:g} x capacity ({rate:.2f} req/s), {args.num_prompts[workload]} "
           f"requests:\n"),
           ("| configuration | mean JCT (s) | p99 JCT (s) | mean TTFT (ms) | preemptions | "
           "swapped-out blocks | recomputes |"), "|---|---|---|---|---|---|---|"]
    for label, _, _ in CONFIGS:
        e = row[label]
        out.append(f"| {label} | {e['mean_jct_s']:.2f} | {e['p99_jct_s']:.2f} | "
                   f"{e['mean_ttft_ms']:.0f} | {e['preemptions']} | {e['swap_out_blocks']} | "
                   f"{e['recomputes']} |")
    sj = row["skip-join+proactive"]["mean_jct_s"]
    for base, oracle in (("fcfs+reactive", "oracle-srpt"), ("orca-fcfs", "oracle-srpt"),
                         ("fcfs-admit+reactive", "oracle-srpt-admit")):
        b, orc = row[base]["mean_jct_s"], row[oracle]["mean_jct_s"]
        if b <= orc:
            captured = f"no reduction to capture: {oracle} does no better"
        elif sj < orc:
            captured = f"skip-join does better than {oracle}"
        else:
            captured = f"skip-join captures {100 * (b - sj) / (b - orc):.0f} % of its reduction"
        out.append(f"\n- {base} / skip-join+proactive mean JCT: **{b / sj:.2f}x** ({oracle}: "
                   f"{b / orc:.2f}x; {captured}); "
                   f"p99: {row[base]['p99_jct_s'] / row['skip-join+proactive']['p99_jct_s']:.2f}x")
    # Every load of the run, not only the headline one: where a queue forms, the policies part.
    loads = sorted(args.loads)
    out += ["", "Mean JCT (s) at every load of the run:", "",
            "| configuration | " + " | ".join(f"{f:g} x ({f * cap:.2f} req/s)" for f in loads) + " |",
            "|---|" + "---|" * len(loads)]
    for label, _, _ in CONFIGS:
        cells = [f"{_at(results[(setup, workload, label)], f * cap)['mean_jct_s']:.2f}"
                 for f in loads]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append(f"\nPlots: `{setup}/{workload}/jct_vs_rate.png`, `ttft_vs_rate.png`, `jct_cdf.png`.")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="opt13b-1xa100,gpt3-16xa100")
    p.add_argument("--workloads", default="sharegpt,alpaca")
    p.add_argument("--loads", default="0.5,0.7,0.9,1.1")
    p.add_argument("--headline-load", type=float, default=0.9)
    p.add_argument("--sharegpt-prompts", type=int, default=400)
    p.add_argument("--alpaca-prompts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results", "paper_sim"))
    p.add_argument("--real", action="store_true", help="measure the real server on this machine")
    p.add_argument("--quick", action="store_true", help="with --real: a smoke run")
    p.add_argument("--real-requests", type=int, default=120)
    p.add_argument("--real-load", type=float, default=0.7,
                   help="with --real: arrival rate as a fraction of the measured fcfs capacity")
    p.add_argument("--real-repeats", type=int, default=3,
                   help="with --real: measured runs per configuration (the median is reported)")
    args = p.parse_args()
    if args.real:
        from benchmarks.paper_real import run_real

        run_real(args)
        return
    args.setups = args.setups.split(",")
    args.workloads = args.workloads.split(",")
    args.loads = [float(x) for x in args.loads.split(",")]
    args.num_prompts = {"sharegpt": args.sharegpt_prompts, "alpaca": args.alpaca_prompts}
    if args.headline_load not in args.loads:
        args.loads.append(args.headline_load)
    simulate_all(args)


if __name__ == "__main__":
    main()
