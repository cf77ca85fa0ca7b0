"""A full host pool under skip-join MLFQ, on this CPU, in one run: spare the victim the
host pool cannot take (the engine default) vs drop its KV for recompute at once
(``--eager-recompute``, the scheduler's behaviour before the change that made sparing the
default).

When a more urgent job needs GPU room and the victim's KV does not fit the host pool, the
scheduler either drops the victim's KV (it prefills prompt + output again later) or lets
the urgent job wait while lower-priority resident jobs run, falling back to recompute only
if nothing could run at all. This benchmark runs both, under the reactive and the proactive
swap policy, on the same timed workload.

Workload, capacity, arrivals and MLFQ settings are those of ``policies_cpu.py`` (its
options, the same defaults), except the host pool: ``--num-host-blocks`` defaults to 32
blocks here (a third of the KV pool) so that swap-outs find it full. The fcfs capacity run
uses that same small host pool. The simulator's predictions for every row are printed
before the timed runs (``--sim-seeds`` is not used).

    .venv/bin/python benchmarks/host_full_cpu.py [--num-host-blocks 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import policies_cpu as pc

from engine.api import Engine

DEFAULT_OUT = "benchmarks/results/host_full_cpu.md"
POLICY = "skip-join-mlfq"
# (swap policy, eager_recompute): the eager row of each swap policy is the peer.
CONFIGS = [(swap, eager) for swap in ("reactive", "proactive") for eager in (True, False)]


def victim_label(eager: bool) -> str:
    return "recomputed at once (--eager-recompute)" if eager else "spared (default)"


def parse_args() -> argparse.Namespace:
    ap = pc.build_parser(__doc__, DEFAULT_OUT)
    ap.set_defaults(num_host_blocks=32, sim_seeds=0)
    return pc.finish_args(ap.parse_args(), DEFAULT_OUT)


async def bench(args: argparse.Namespace, profile_path: str) -> str:
    b = await pc.measure_capacity(args, profile_path)

    sim = pc.Simulator(args, b.profile, b.mlfq)
    overhead_s = sim.calibrate(b.default_swap, b.items, b.cap.makespan)
    print(f"simulator: {overhead_s * 1e3:.1f} ms per step calibrated on the capacity run",
          flush=True)
    predicted = {c: sim.run(POLICY, c[0], b.timed_items, eager_recompute=c[1]) for c in CONFIGS}
    for (swap, eager), r in predicted.items():
        print(f"predicted {swap:10s} {victim_label(eager):40s} mean JCT {r.mean_jct:6.2f} s  "
              f"recomputes {r.recomputes}", flush=True)

    results: dict[tuple[str, bool], pc.Result] = {}
    for swap, eager in CONFIGS:
        cfg = pc.engine_config(args, POLICY, swap, b.mlfq, profile_path, eager_recompute=eager)
        engine = await Engine.create(cfg)
        try:
            await pc.warm_up(engine, b.vocab_size)
            res = results[(swap, eager)] = await pc.run(engine, b.timed)
        finally:
            await engine.shutdown()
        print(f"{swap:10s} {victim_label(eager):40s} mean JCT {statistics.mean(res.jct):6.2f} s"
              f"  recomputes {res.recomputes}  makespan {res.makespan:5.1f} s", flush=True)

    meta = pc.Meta(b.timed, b.cap, b.capacity, b.rate, b.step_s, b.base_quantum,
                   b.default_swap, b.load_before, time.perf_counter() - b.started, predicted,
                   {}, overhead_s)
    lines = pc.header_lines(args, meta, list(results.values()),
                            "# A full host pool under skip-join MLFQ on CPU: spare the victim "
                            "or recompute it at once", "benchmarks/host_full_cpu.py")
    lines += ["", f"| swap | victim the host pool cannot take | {pc.RESULT_COLUMNS}",
              f"|---|---|{pc.RESULT_ALIGN}"]
    for (swap, eager), r in results.items():
        lines.append(f"| {swap} | {victim_label(eager)} "
                     f"| {pc.result_cells(r, predicted[(swap, eager)].mean_jct)}")

    def mean(x) -> float:
        return statistics.mean(x.jct)

    lines += [""]
    for swap in ("reactive", "proactive"):
        lines.append(
            f"{swap}: eager / spared mean JCT = "
            f"{mean(results[(swap, True)]) / mean(results[(swap, False)]):.2f} (predicted "
            f"{mean(predicted[(swap, True)]) / mean(predicted[(swap, False)]):.2f}); recomputes "
            f"{results[(swap, True)].recomputes} -> {results[(swap, False)].recomputes}")
    return "\n".join(lines) + "\n"


async def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="host_full_cpu_") as tmp:
        report = await bench(args, os.path.join(tmp, "profile.json"))
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


if __name__ == "__main__":
    asyncio.run(main())
