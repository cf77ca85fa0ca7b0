"""``fastserve simulate``: policies compared on a virtual clock, with no model and no worker.

Two cost models: *analytic* (``--model-shape NAME --gpu NAME -tp T -pp P``: a cluster that
is not here, priced from its bandwidths and FLOP/s, see ``engine/sim/analytic.py``) or
*measured* (``--profile FILE`` from ``fastserve profile``: this machine). Workloads are
``fastserve bench``'s (``--workload``); without ``--workload``, the profile mode keeps
its original log-normal workload (``--prompt-median`` ...). Rates are absolute
(``--request-rate``, a comma list sweeps) or a fraction of the simulated FCFS capacity
(``--load``). Prints one JSON line per policy pair and rate; ``--output FILE.json``
writes bench's result file (one per policy pair when several are compared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence

from engine.bench.cli import add_workload_args, parse_rates, write_result
from engine.bench.metrics import SLO, result_entry
from engine.bench.workload import WorkItem, build_workload, heavy_tailed, with_rate
from engine.cli import EAGER_RECOMPUTE_HELP, _option
from engine.config import CacheConfig, SchedulerConfig

# Per-request rows in the result file up to this many requests (100,000 rows is ~15 MB).
MAX_ROWS = 20_000


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    d = SchedulerConfig()
    g = p.add_argument_group("cost model: analytic (a GPU cluster) or measured (--profile)")
    g.add_argument("--model-shape", default=None,
                   help="opt-13b | opt-66b | opt-175b | gpt3-175b | llama3-8b | llama3-70b")
    g.add_argument("--gpu", default=None, help="a100-40gb | a100-80gb | h100 | h200")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--no-pipeline-in-flight", action="store_true",
                   help="price a batch going through the stages one after another, instead "
                        "of PP micro-batches in flight")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--host-kv-gib-per-gpu", type=float, default=64.0,
                   help="pinned host memory per GPU for swapped KV")
    g.add_argument("--profile", default=None, dest="profile_path",
                   help="cost profile from `fastserve profile --out` (prefill and decode points)")
    add_workload_args(p, num_prompts=200)
    p.set_defaults(workload=None)
    g = p.add_argument_group("original log-normal workload (profile mode without --workload)")
    g.add_argument("--requests", type=int, default=None, dest="requests",
                   help="same as --num-prompts")
    g.add_argument("--prompt-median", type=int, default=64)
    g.add_argument("--prompt-max", type=int, default=1024, help="p99 and clip of prompt length")
    g.add_argument("--output-median", type=int, default=16)
    g.add_argument("--output-max", type=int, default=512, help="p99 and clip of output length")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output cap (default: the model shape's, or 2048)")
    rate = p.add_argument_group("arrival rate").add_mutually_exclusive_group()
    rate.add_argument("--request-rate", "--rate", type=parse_rates, default=None, dest="rate",
                      help="arrivals per second, or a comma list to sweep")
    rate.add_argument("--load", type=parse_rates, default=[0.9],
                      help="arrivals as a fraction of simulated fcfs capacity, or a comma list "
                           "(default 0.9)")
    g = p.add_argument_group("engine")
    g.add_argument("--scheduling-policy", default=d.policy, help="name, or a comma list to compare")
    g.add_argument("--swap-policy", default=d.swap_policy, help="name, or a comma list to compare")
    g.add_argument("--policy-option", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                   type=_option, help="a knob for every listed policy but fcfs, or with NAME. "
                   "for that one only (e.g. skip-join-mlfq.base_quantum_s=0.05)")
    g.add_argument("--swap-policy-option", action="append", default=[], metavar="KEY=VALUE",
                   type=_option)
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"batch cap (default {d.max_num_seqs}; 256 in analytic mode, as vLLM)")
    g.add_argument("--eager-recompute", action="store_true", help=EAGER_RECOMPUTE_HELP)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="waiting-queue cap; arrivals beyond it are rejected")
    g.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV pool (default: 128; analytic: what the memory leaves)")
    g.add_argument("--num-host-blocks", type=int, default=None, help="default 4x --num-gpu-blocks")
    g.add_argument("--block-size", type=int, default=CacheConfig().block_size)
    g.add_argument("--swap-ms-per-block", type=float, default=None,
                   help="copy cost of one block (default 0; analytic: from PCIe bandwidth)")
    g.add_argument("--step-overhead-ms", type=float, default=0.0,
                   help="added to every step for what the cost model does not see")
    g.add_argument("--oracle-priority", action="store_true",
                   help="give each job its output length as priority: the `priority` policy "
                        "becomes oracle shortest-job-first (a bound, not a deployable policy)")
    g.add_argument("--serial-copies", action="store_true",
                   help="proactive copies add to the step instead of overlapping it (CPU)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="FILE.json",
                   help="bench's result file; several policy pairs: FILE-POLICY-SWAP.json")
    g.add_argument("--label", default=None, help="run name in reports (default: POLICY+SWAP)")


def _cost(args: argparse.Namespace):
    """(cost model, profile for skip-join, gpu blocks, host blocks, max model len, describe)"""
    if args.model_shape or args.gpu:
        from engine.sim.analytic import AnalyticCost, ClusterConfig
        from engine.sim.hardware import GIB, GPUS, MODELS, lookup

        if not (args.model_shape and args.gpu):
            raise ValueError("the analytic cost model needs both --model-shape and --gpu")
        if args.profile_path:
            raise ValueError("give --profile or --model-shape/--gpu, not both")
        model = lookup(MODELS, args.model_shape, "model shape")
        cluster = ClusterConfig(
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            pipeline_in_flight=not args.no_pipeline_in_flight,
            gpu_memory_utilization=args.gpu_memory_utilization,
            host_kv_bytes_per_gpu=args.host_kv_gib_per_gpu * GIB,
            block_size=args.block_size, step_overhead_s=args.step_overhead_ms / 1e3,
            overlap_copies=not args.serial_copies)
        cost = AnalyticCost(model, lookup(GPUS, args.gpu, "GPU"), cluster)
        if args.swap_ms_per_block is not None:
            cost.swap_s_per_block = args.swap_ms_per_block / 1e3
        gpu_blocks = args.num_gpu_blocks or cost.num_gpu_blocks
        host_blocks = cost.num_host_blocks if args.num_host_blocks is None else args.num_host_blocks
        return (cost, cost.profile(), gpu_blocks, host_blocks,
                args.max_model_len or model.max_model_len, cost.describe())
    if not args.profile_path:
        raise ValueError("give --profile FILE, or --model-shape and --gpu")
    from engine.policies.profile import PrefillProfile
    from engine.sim import CostModel

    profile = PrefillProfile.load(args.profile_path)
    cost = CostModel(profile, (args.swap_ms_per_block or 0.0) / 1e3, overlap=not args.serial_copies,
                     step_overhead_s=args.step_overhead_ms / 1e3)
    gpu_blocks = args.num_gpu_blocks or 128
    host_blocks = 4 * gpu_blocks if args.num_host_blocks is None else args.num_host_blocks
    return (cost, profile, gpu_blocks, host_blocks, args.max_model_len or 2048,
            {"profile": args.profile_path, "num_gpu_blocks": gpu_blocks,
             "num_host_blocks": host_blocks, "block_size": args.block_size})


def _items(args: argparse.Namespace, max_job: int) -> tuple[list[WorkItem], object, object]:
    """Lengths (arrivals at 0), a function rate -> timed items, and a function n -> n items
    of the same workload at t=0 (the capacity run; a trace gives what it has)."""
    if args.requests is not None:
        args.num_prompts = args.requests
    if args.workload is None and not args.model_shape:
        def lengths(n: int) -> tuple[list[WorkItem], list[float]]:
            return heavy_tailed(n, seed=args.seed, prompt_median=args.prompt_median,
                                prompt_p99=args.prompt_max, output_median=args.output_median,
                                output_p99=args.output_max, max_job_tokens=max_job)

        items, gaps = lengths(args.num_prompts)
        return items, lambda rate: with_rate(items, gaps, rate), lambda n: lengths(n)[0]
    args.workload = args.workload or "sharegpt"

    def fit(its: list[WorkItem]) -> list[WorkItem]:  # prompt + output within the context
        return [WorkItem(max(1, min(it.prompt_len, max_job - it.output_len)),
                         min(it.output_len, max_job - 1), it.arrival_s) for it in its]

    def at(rate: float, n: int | None = None) -> list[WorkItem]:
        return fit(build_workload(args.workload, args.num_prompts if n is None else n,
                                  rate=rate, seed=args.seed, burstiness=args.burstiness,
                                  max_input_len=args.max_input_len,
                                  max_output_len=args.max_output_len, input_len=args.input_len,
                                  output_len=args.output_len))

    base = at(math.inf)
    if args.workload.startswith("trace:"):  # a trace keeps its own times
        base = [WorkItem(it.prompt_len, it.output_len, 0.0) for it in base]
        return base, at, lambda n: base
    return base, at, lambda n: at(math.inf, n)


def run_simulate(args: argparse.Namespace) -> int:
    from engine.sim import simulate
    from engine.sim.simulator import build_scheduler, capacity_jobs, fcfs_capacity

    analytic = bool(args.model_shape or args.gpu)
    cost, profile, gpu_blocks, host_blocks, max_len, described = _cost(args)
    max_job = min(max_len, gpu_blocks * args.block_size)
    slo = SLO.parse(args.slo)
    max_seqs = args.max_num_seqs or (256 if analytic else SchedulerConfig().max_num_seqs)
    policies = args.scheduling_policy.split(",")
    # KEY=VALUE goes to every policy but fcfs (which has no knobs); NAME.KEY=VALUE to NAME.
    scoped = [(*key.rpartition(".")[::2], value) for key, value in args.policy_option]
    for scope, knob, _ in scoped:
        if scope and scope not in policies:
            raise ValueError(f"--policy-option {scope}.{knob}: {scope!r} is not one of the "
                             f"policies compared ({args.scheduling_policy})")
    no_knobs = {"fcfs", "orca-fcfs", "oracle-srpt"}

    def options_for(policy: str) -> tuple:
        return tuple((knob, value) for scope, knob, value in scoped
                     if scope == policy or (not scope and policy not in no_knobs))

    def core(policy: str, swap: str, capacity_run: bool = False):
        # The capacity run queues all its jobs at once: no admission cap may refuse them.
        limits = ({"max_waiting": 1 << 30, "max_waiting_tokens": None} if capacity_run
                  else {"max_waiting": args.max_waiting})
        cfg = SchedulerConfig(
            policy=policy, swap_policy=swap, max_num_seqs=max_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, **limits,
            eager_recompute=args.eager_recompute, policy_options=options_for(policy),
            swap_policy_options=tuple(args.swap_policy_option))
        return build_scheduler(cfg, gpu_blocks, host_blocks, args.block_size, profile)

    pairs = [(pol, swap) for pol in policies for swap in args.swap_policy.split(",")]
    for pol, swap in pairs:  # a bad name or knob fails before anything runs
        core(pol, swap)
    base, timed_at, sized = _items(args, max_job)
    rates = args.rate
    if rates is None:  # fractions of what fcfs sustains with a queue that never runs dry
        sample = sized(capacity_jobs(base, gpu_blocks * args.block_size, max_seqs))
        capacity = fcfs_capacity(
            core("fcfs", SchedulerConfig().swap_policy, capacity_run=True),
            sample, cost, max_model_len=max_len)
        rates = [f * capacity for f in args.load]
        print(json.dumps({"fcfs_capacity_req_s": round(capacity, 4),
                          "capacity_jobs": len(sample), "rate_req_s": round(rates[0], 4)}))
    oracle = (lambda it: it.output_len) if args.oracle_priority else None
    big = args.num_prompts > MAX_ROWS
    runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    for rate in rates:
        items = timed_at(rate)
        for pol, swap in pairs:
            r = simulate(core(pol, swap), items, cost, priority=oracle, max_model_len=max_len,
                         record_tokens=not big)
            entry = result_entry(r.records, rate, slo=slo, with_rows=not big)
            entry.update(steps=r.steps, preemptions=r.preemptions,
                         swap_out_blocks=r.swap_out_blocks, swap_in_blocks=r.swap_in_blocks,
                         proactive_blocks=r.proactive_blocks, recomputes=r.recomputes,
                         makespan_s=r.makespan)
            runs[(pol, swap)].append(entry)
            print(json.dumps({
                "scheduling_policy": pol, "swap_policy": swap, "request_rate": round(rate, 4),
                "completed": entry["completed"], "rejected": entry["rejected"],
                "mean_jct_s": round(entry["mean_jct_s"], 4),
                "p99_jct_s": round(entry["p99_jct_s"], 4),
                "mean_ttft_s": round(entry["mean_ttft_ms"] / 1e3, 4),
                "output_tok_s": round(r.throughput, 2), "makespan_s": round(r.makespan, 3),
                "steps": r.steps, "preemptions": r.preemptions,
                "swap_out_blocks": r.swap_out_blocks, "swap_in_blocks": r.swap_in_blocks,
                "proactive_blocks": r.proactive_blocks, "recomputes": r.recomputes}))
    if args.output:
        stem, ext = os.path.splitext(args.output)
        for (pol, swap), results in runs.items():
            path = args.output if len(pairs) == 1 else f"{stem}-{pol}-{swap}{ext or '.json'}"
            write_result(path, {
                "source": "simulate", "label": args.label or f"{pol}+{swap}",
                "scheduling_policy": pol, "swap_policy": swap, "workload": args.workload,
                "num_prompts": args.num_prompts, "seed": args.seed,
                "burstiness": args.burstiness, "max_model_len": max_len,
                "max_num_seqs": max_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                "max_waiting": args.max_waiting, "cost_model": described,
                "results": results})
    return 0


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fastserve simulate",
        description="Drive the real scheduler core on a virtual clock with an analytic or "
                    "measured cost model: one JSON line per policy pair and rate.")
    add_simulate_args(p)
    p.add_argument("--log-level", default="WARNING")
    return run_simulate(p.parse_args(argv))
