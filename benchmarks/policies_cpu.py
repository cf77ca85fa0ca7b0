"""Scheduling and swap policies under a heavy-tailed online workload, on this CPU, in one run.

One workload, one seed, every configuration in the same run, one engine at a time:

* scheduling: fcfs, mlfq and skip-join-mlfq, each with the engine's default swap policy;
* swap: proactive, reactive and recompute, each under skip-join-mlfq (the reactive row
  is the skip-join row above: the engine default, run once).

Workload. ``--requests`` jobs with log-normal prompt and output lengths (heavy tail):
median ``--prompt-median`` / ``--output-median`` tokens, sigma chosen so that the 99th
percentile lands on ``--prompt-max`` / ``--output-max``, then clipped to [4, max] / [1, max]
and to what the model's context and the KV pool can hold. Prompts are random token ids;
decoding is greedy with EOS ignored, so every job produces exactly its output length.

Capacity and arrivals. First, on a fresh fcfs engine with the benchmark's KV pool and
batch cap, the whole workload is submitted at t=0. Capacity is what fcfs served while it
was saturated: the window ends when the last request gets its first token (until then some
request was waiting), and the work done in it is counted in requests, a finished one as 1
and a running one as the fraction of its output produced (``engine.bench.metrics.
saturated_capacity``). Arrivals are then Poisson at ``--load`` x capacity: the seed fixes
unit-rate exponential gaps (the first job arrives at t=0) and the measured rate only scales
them, so every configuration sees the same arrival times.

Predictions. Before any timed run, the simulator (``engine.sim``: the same scheduler core
and policies on a virtual clock, steps priced from the profile measured here, copies at
``--sim-swap-ms-per-block`` each, added to the step as on this CPU, plus a per-step
overhead fitted so that the simulated capacity run lasts as long as the measured one) runs
every configuration on the same timed workload; its mean JCT is printed next to the measured one.
It also runs fcfs and skip-join on ``--sim-seeds`` other seeds of the same workload shape, to
show how much the ratio depends on the one seed the real run uses.

Metrics, measured on the client with ``time.perf_counter``: JCT = completion - scheduled
arrival; TTFT = first token - scheduled arrival; throughput = output tokens / makespan
(first arrival to last completion); p99 is nearest-rank. Preemptions and swapped blocks are
the engine's counters (``Engine.stats()``) over the measured run only (warm-up excluded);
recomputes are summed from the jobs' final stats.

Engine sizing, chosen so that the batch cap and memory bind on this CPU: a batch of
``--max-num-seqs`` 4 (a full-batch decode step costs ~1.6x a single-job one here, so larger
batches buy little), a KV pool of ``--num-gpu-blocks`` 96 (1536 tokens: one largest job,
or about four p90-sized ones), and a host pool 4x larger, so swapping seldom has to fall back
to recompute. Whoever a policy lets into those four slots decides who waits.

MLFQ quantum. Unless ``--base-quantum`` is given, queue 0's quantum is twice the measured
time of one decode iteration at a full batch (``--max-num-seqs``), taken from the profile
that skip-join uses (measured once, at start, on the capacity engine and handed to each
skip-join engine as a stored profile, so none of them re-profiles).

    .venv/bin/python benchmarks/policies_cpu.py [--requests 120] [--load 0.9] [--quick]

``--quick`` is a smoke run (8 short requests); it prints its table and writes a file only
if ``--out`` is given, so it never overwrites the committed results.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.api import Engine
from engine.bench.metrics import nearest_rank, saturated_capacity
from engine.bench.workload import WorkItem, heavy_tailed, with_rate
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.models.loader import default_model_path, load_model_info
from engine.policies.profile import PrefillProfile
from engine.sampling import SamplingParams
from engine.sim import CostModel, simulate
from engine.sim.simulator import build_scheduler, calibrate_overhead

DEFAULT_OUT = "benchmarks/results/policies_cpu.md"
# Prefill lengths profiled for skip-join (capped at the longest prompt, which is added).
PROFILE_LENGTHS = (1, 32, 128, 512, 1024)
# Queue 0 gets this many full-batch decode iterations unless --base-quantum is given.
QUANTUM_ITERATIONS = 2.0


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int
    arrival_s: float  # seconds after the run starts


@dataclass
class Result:
    jct: list[float]
    ttft: list[float]
    makespan: float
    output_tokens: int
    preemptions: int
    swap_out_blocks: int
    swap_in_blocks: int
    proactive_blocks: int  # of the swapped blocks, moved ahead of need (out + in)
    recomputes: int
    swap_seconds: float  # worker-measured copy time
    token_times: list[list[float]]  # per request, seconds after the start


def workload_shape(args: argparse.Namespace, seed: int, max_job_tokens: int):
    return heavy_tailed(args.requests, seed=seed, prompt_median=args.prompt_median,
                        prompt_p99=args.prompt_max, output_median=args.output_median,
                        output_p99=args.output_max, max_job_tokens=max_job_tokens)


def to_requests(items: list[WorkItem], vocab: int, seed: int) -> list[Request]:
    """Random prompt token ids for each item (seeded apart from the lengths)."""
    rng = random.Random(f"prompts-{seed}")
    return [Request([rng.randrange(100, vocab - 100) for _ in range(it.prompt_len)],
                    it.output_len, it.arrival_s) for it in items]


async def run(engine: Engine, reqs: list[Request]) -> Result:
    """Submit each request at its arrival time (open loop); wait for all of them."""
    before = await engine.stats()
    n = len(reqs)
    jct, ttft, produced, recomputes = [0.0] * n, [0.0] * n, [0] * n, [0] * n
    times: list[list[float]] = [[] for _ in range(n)]
    t0 = time.perf_counter()

    async def one(i: int, r: Request) -> None:
        await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
        params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(r.prompt, params):
            now = time.perf_counter() - t0
            if out.token_ids and not produced[i]:
                ttft[i] = now - r.arrival_s
            produced[i] += len(out.token_ids)
            times[i] += [now] * len(out.token_ids)
            if out.finished and out.stats:
                recomputes[i] = out.stats.get("recomputes", 0)
        jct[i] = time.perf_counter() - t0 - r.arrival_s

    await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    makespan = time.perf_counter() - t0
    assert produced == [r.max_tokens for r in reqs], "a job did not produce exactly max_tokens"
    after = await engine.stats()

    def delta(key: str) -> int:
        return int(after["memory"][key] - before["memory"][key])

    return Result(
        jct, ttft, makespan, sum(produced),
        preemptions=after["num_preemptions"] - before["num_preemptions"],
        swap_out_blocks=delta("swap_out_blocks"),
        swap_in_blocks=delta("swap_in_blocks"),
        proactive_blocks=delta("proactive_out_blocks") + delta("proactive_in_blocks"),
        recomputes=sum(recomputes),
        swap_seconds=after["memory"]["swap_seconds"] - before["memory"]["swap_seconds"],
        token_times=times,
    )


async def warm_up(engine: Engine, vocab: int) -> None:
    """First forwards pay for allocation and kernel selection; keep that out of the numbers."""
    rng = random.Random(-1)
    lengths = (16, 64, 64, 256)
    await run(engine, [Request([rng.randrange(100, vocab - 100) for _ in range(n)], 4, 0.0)
                       for n in lengths])


def engine_config(args: argparse.Namespace, policy: str, swap: str, policy_options: dict,
                  profile_path: str | None, eager_recompute: bool = False) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(num_gpu_blocks_override=args.num_gpu_blocks,
                          num_host_blocks_override=args.num_host_blocks),
        scheduler=SchedulerConfig(
            policy=policy,
            swap_policy=swap,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy_options=tuple(sorted(policy_options.items())),
            profile_path=profile_path,
            eager_recompute=eager_recompute,
        ),
        parallel=ParallelConfig(torch_threads=args.torch_threads),
    )


def build_parser(doc: str | None, default_out: str) -> argparse.ArgumentParser:
    """The workload, engine and simulator options, shared with the other CPU policy
    benchmarks."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--requests", type=int, default=None, help="requests (default 120; 8 with --quick)")
    a("--load", type=float, default=0.9, help="arrival rate / measured fcfs capacity")
    a("--seed", type=int, default=0, help="seeds lengths, prompt tokens and arrival gaps")
    a("--prompt-median", type=int, default=64)
    a("--prompt-max", type=int, default=None,
      help="p99 and clip of prompt length (default 1024; 256 with --quick)")
    a("--output-median", type=int, default=16)
    a("--output-max", type=int, default=None,
      help="p99 and clip of output length (default 512; 64 with --quick)")
    a("--num-gpu-blocks", type=int, default=96,
      help="KV pool in 16-token blocks (default %(default)s: 1536 tokens)")
    a("--num-host-blocks", type=int, default=None,
      help="host (swap) pool in blocks (default 4x --num-gpu-blocks)")
    a("--max-num-seqs", type=int, default=4, help="batch-size cap (default %(default)s)")
    a("--max-num-batched-tokens", type=int,
      default=SchedulerConfig().max_num_batched_tokens, help="default %(default)s")
    a("--base-quantum", type=float, default=None,
      help=f"queue-0 quantum, s (default {QUANTUM_ITERATIONS:g}x the full-batch decode step)")
    a("--quantum-ratio", type=float, default=2.0)
    a("--num-queues", type=int, default=8)
    a("--starvation-limit", type=float, default=30.0, help="MLFQ starvation guard, s")
    a("--torch-threads", type=int, default=None, help="worker torch threads (default: torch's)")
    a("--sim-swap-ms-per-block", type=float, default=0.21,
      help="copy cost of one KV block in the simulator (default: measured on the 2-core "
           "machine, %(default)s ms)")
    a("--sim-seeds", type=int, default=10,
      help="other workload seeds the simulator runs fcfs and skip-join on (0: none)")
    a("--quick", action="store_true", help="smoke run: 8 short requests; no file unless --out")
    a("--out", default=None, help=f"markdown results (default {default_out}; none with --quick)")
    return ap


def finish_args(args: argparse.Namespace, default_out: str) -> argparse.Namespace:
    """Fill the defaults that depend on --quick or on other options."""
    q = args.quick
    args.requests = args.requests or (8 if q else 120)
    args.prompt_max = args.prompt_max or (256 if q else 1024)
    args.output_max = args.output_max or (64 if q else 512)
    if args.num_host_blocks is None:
        args.num_host_blocks = 4 * args.num_gpu_blocks
    if args.out is None and not q:
        args.out = default_out
    return args


def parse_args() -> argparse.Namespace:
    return finish_args(build_parser(__doc__, DEFAULT_OUT).parse_args(), DEFAULT_OUT)


async def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="policies_cpu_") as tmp:
        await bench(args, os.path.join(tmp, "profile.json"))


class Simulator:
    """The benchmark's engine configurations on the virtual clock (``engine.sim``)."""

    def __init__(self, args: argparse.Namespace, profile: PrefillProfile, mlfq: dict) -> None:
        self.args, self.profile, self.mlfq = args, profile, mlfq
        # On this CPU the copies share the cores with the forward: they add to the step.
        self.cost = CostModel(profile, args.sim_swap_ms_per_block / 1e3, overlap=False)

    def core(self, policy: str, swap: str, eager_recompute: bool = False):
        a = self.args
        options = () if policy == "fcfs" else tuple(sorted(self.mlfq.items()))
        cfg = SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=a.max_num_seqs,
                              max_num_batched_tokens=a.max_num_batched_tokens,
                              policy_options=options, eager_recompute=eager_recompute)
        return build_scheduler(cfg, a.num_gpu_blocks, a.num_host_blocks,
                               CacheConfig().block_size, self.profile)

    def calibrate(self, swap: str, items: list[WorkItem], measured_makespan_s: float) -> float:
        """Fit the per-step overhead to the measured fcfs run with every item at t=0."""
        overhead = calibrate_overhead(self.core("fcfs", swap), items, self.cost,
                                      measured_makespan_s)
        self.cost = self.cost.with_overhead(overhead)
        return overhead

    def run(self, policy: str, swap: str, items: list[WorkItem], eager_recompute: bool = False):
        return simulate(self.core(policy, swap, eager_recompute), items, self.cost)

    def ratio_on_seed(self, seed: int, max_job_tokens: int, swap: str) -> float:
        """fcfs / skip-join mean JCT on another seed, at the same load of simulated capacity."""
        items, gaps = workload_shape(self.args, seed, max_job_tokens)
        capacity = self.run("fcfs", swap, items).saturated_capacity
        timed = with_rate(items, gaps, self.args.load * capacity)
        return self.run("fcfs", swap, timed).mean_jct / self.run("skip-join-mlfq", swap,
                                                                 timed).mean_jct


@dataclass
class Baseline:
    """The shared first phase: workload, profile, measured fcfs capacity, timed arrivals."""

    vocab_size: int
    max_job_tokens: int
    items: list[WorkItem]  # lengths, arrivals at unit rate
    reqs: list[Request]  # prompts, everything at t=0 (the capacity run)
    profile: PrefillProfile
    cap: Result  # the capacity run
    capacity: float  # requests/s
    rate: float  # arrivals/s
    step_s: float  # profiled decode step at a full batch
    base_quantum: float
    timed_items: list[WorkItem]
    timed: list[Request]
    mlfq: dict  # options of the MLFQ-based policies
    default_swap: str
    started: float  # perf_counter at the start of the benchmark
    load_before: float


async def measure_capacity(args: argparse.Namespace, profile_path: str) -> Baseline:
    """On one fcfs engine: profile once (saved to ``profile_path`` for skip-join), then
    measure capacity with every request at t=0; arrivals at ``--load`` x capacity."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    info = load_model_info(default_model_path())
    max_job_tokens = min(info.max_model_len - 1, args.num_gpu_blocks * CacheConfig().block_size)
    items, gaps = workload_shape(args, args.seed, max_job_tokens)
    reqs = to_requests(items, info.vocab_size, args.seed)
    default_swap = SchedulerConfig().swap_policy
    engine = await Engine.create(engine_config(args, "fcfs", default_swap, {}, None))
    try:
        longest = max(len(r.prompt) for r in reqs)
        lengths = sorted({n for n in PROFILE_LENGTHS if n < longest} | {longest})
        batches = sorted({1, max(1, args.max_num_seqs // 2), args.max_num_seqs})
        measured = await engine.profile(lengths=lengths, batch_sizes=batches)
        profile = PrefillProfile.from_dict(measured)
        profile.save(profile_path)
        await warm_up(engine, info.vocab_size)
        cap = await run(engine, reqs)
    finally:
        await engine.shutdown()
    capacity = saturated_capacity(cap.token_times, [r.max_tokens for r in reqs])
    rate = args.load * capacity
    step_s = profile.decode_step_time(args.max_num_seqs)
    base_quantum = args.base_quantum or QUANTUM_ITERATIONS * step_s
    print(f"capacity {capacity:.3f} req/s (saturated fcfs; all at t=0 finished in "
          f"{cap.makespan:.1f} s); arrivals {rate:.3f} req/s; decode step at batch "
          f"{args.max_num_seqs}: {step_s * 1e3:.1f} ms; base quantum {base_quantum:.3f} s",
          flush=True)
    timed_items = with_rate(items, gaps, rate)
    timed = [Request(r.prompt, r.max_tokens, it.arrival_s) for r, it in zip(reqs, timed_items,
                                                                             strict=True)]
    mlfq = {"base_quantum_s": base_quantum, "quantum_ratio": args.quantum_ratio,
            "num_queues": args.num_queues, "starvation_limit_s": args.starvation_limit}
    return Baseline(info.vocab_size, max_job_tokens, items, reqs, profile, cap, capacity, rate,
                    step_s, base_quantum, timed_items, timed, mlfq, default_swap, started,
                    load_before)


async def bench(args: argparse.Namespace, profile_path: str) -> None:
    # 1) On one fcfs engine: profile once, then measure capacity with everything at t=0.
    b = await measure_capacity(args, profile_path)
    default_swap, mlfq, timed, timed_items = b.default_swap, b.mlfq, b.timed, b.timed_items
    configs = [("fcfs", default_swap), ("mlfq", default_swap), ("skip-join-mlfq", default_swap)]
    configs += [("skip-join-mlfq", s) for s in ("proactive", "reactive", "recompute")
                if s != default_swap]

    # 2) Predictions, before any timed run: every configuration on the virtual clock, on
    #    the same timed workload; and the fcfs / skip-join ratio on other seeds.
    sim = Simulator(args, b.profile, mlfq)
    overhead_s = sim.calibrate(default_swap, b.items, b.cap.makespan)
    print(f"simulator: {overhead_s * 1e3:.1f} ms per step calibrated on the capacity run",
          flush=True)
    predicted = {c: sim.run(*c, timed_items) for c in configs}
    for (policy, swap), r in predicted.items():
        print(f"predicted {policy:15s} {swap:10s} mean JCT {r.mean_jct:6.2f} s", flush=True)
    seed_ratios = {seed: sim.ratio_on_seed(seed, b.max_job_tokens, default_swap)
                   for seed in range(args.seed + 1, args.seed + 1 + args.sim_seeds)}

    # 3) Every configuration on the same timed workload, a fresh engine each.
    results: dict[tuple[str, str], Result] = {}
    for policy, swap in configs:
        options = {} if policy == "fcfs" else mlfq
        stored = profile_path if policy == "skip-join-mlfq" else None
        engine = await Engine.create(engine_config(args, policy, swap, options, stored))
        try:
            await warm_up(engine, b.vocab_size)
            res = results[(policy, swap)] = await run(engine, timed)
        finally:
            await engine.shutdown()
        print(f"{policy:15s} {swap:10s} mean JCT {statistics.mean(res.jct):6.2f} s  "
              f"p99 {nearest_rank(res.jct, 0.99):6.2f} s  makespan {res.makespan:5.1f} s",
              flush=True)

    meta = Meta(timed, b.cap, b.capacity, b.rate, b.step_s, b.base_quantum, default_swap,
                b.load_before, time.perf_counter() - b.started, predicted, seed_ratios,
                overhead_s)
    report = render(args, meta, results)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


@dataclass(frozen=True)
class Meta:
    """What the report says about the run besides the per-configuration rows."""

    reqs: list[Request]  # with their arrival times
    capacity_run: Result
    capacity: float  # requests/s
    rate: float  # arrivals/s
    step_s: float  # profiled decode step at a full batch
    base_quantum: float
    default_swap: str
    load_before: float
    elapsed_s: float
    predicted: dict  # (policy, swap) -> SimResult on the same timed workload
    seed_ratios: dict[int, float]  # other seed -> simulated fcfs / skip-join mean JCT
    step_overhead_s: float  # calibrated per-step overhead of the simulator's cost model


def header_lines(args: argparse.Namespace, m: Meta, results: list[Result], title: str,
                 script: str) -> list[str]:
    """Title, then how, where and on what the run was made (shared by the CPU policy
    benchmarks)."""
    prompts = [len(r.prompt) for r in m.reqs]
    outputs = [r.max_tokens for r in m.reqs]
    threads = args.torch_threads or torch.get_num_threads()
    cmd = shlex.join([".venv/bin/python", script, *sys.argv[1:]])
    cap = m.capacity_run

    def dist(xs: list[int]) -> str:
        return (f"median {statistics.median(xs):g}, mean {statistics.mean(xs):.1f}, "
                f"p99 {nearest_rank(xs, 0.99):g}, max {max(xs)}")

    if args.base_quantum:
        quantum_src = "--base-quantum"
    else:
        quantum_src = (f"{QUANTUM_ITERATIONS:g} x the profiled decode step at batch "
                       f"{args.max_num_seqs}, {m.step_s * 1e3:.0f} ms")
    swapped = sum(r.swap_out_blocks + r.swap_in_blocks for r in results)
    copy_s = sum(r.swap_seconds for r in results)
    copy_ms = f"{copy_s / swapped * 1e3:.3f} ms" if swapped else "n/a (nothing swapped)"
    return [
        title,
        "",
        f"- date: {dt.date.today().isoformat()}",
        (f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, shared (load average "
         f"{m.load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end); {platform.system()} "
         f"{platform.release()}; torch {torch.__version__}, {threads} threads; no GPU"),
        ("- model: SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized to fp32), greedy, "
         "EOS ignored"),
        f"- command: `{cmd}` (whole run {m.elapsed_s / 60:.1f} min)",
        (f"- workload: {len(m.reqs)} requests, seed {args.seed}, random token-id prompts; "
         f"log-normal lengths (p99 set to the max, then clipped): prompt {dist(prompts)}; "
         f"output {dist(outputs)}"),
        (f"- engine: KV pool {args.num_gpu_blocks} blocks x 16 tokens, host pool "
         f"{args.num_host_blocks} blocks, max_num_seqs {args.max_num_seqs}, "
         f"max_num_batched_tokens {args.max_num_batched_tokens}"),
        (f"- capacity: fcfs ({m.default_swap}) with all {len(m.reqs)} requests at t=0 served "
         f"{m.capacity:.3f} req/s while saturated (until the last first token); all finished "
         f"in {cap.makespan:.1f} s ({len(m.reqs) / cap.makespan:.3f} req/s counting the drain)"),
        (f"- arrivals: Poisson at {args.load:g} x capacity = {m.rate:.3f} req/s, the same times "
         f"for every row (last arrival at {m.reqs[-1].arrival_s:.1f} s)"),
        (f"- MLFQ: base quantum {m.base_quantum * 1e3:.0f} ms ({quantum_src}), ratio "
         f"{args.quantum_ratio:g}, {args.num_queues} queues, starvation limit "
         f"{args.starvation_limit:g} s; skip-join reads the profile measured once at start"),
        (f"- predicted: the simulator (same scheduler core, virtual clock, the profile above, "
         f"{args.sim_swap_ms_per_block:g} ms per copied block added to the step, and "
         f"{m.step_overhead_s * 1e3:.1f} ms per step for what the profile does not see, fitted "
         f"so that the simulated capacity run takes as long as the measured one) on the same "
         f"timed workload, computed before the timed runs; measured copy time in the runs "
         f"below: {copy_ms} per block"),
    ]


# The measured columns of a result row, after the columns that name the configuration.
RESULT_COLUMNS = ("mean JCT (s) | predicted mean JCT (s) | p50 JCT (s) | p99 JCT (s) "
                  "| mean TTFT (s) | output tok/s | makespan (s) | preemptions "
                  "| swapped blocks out / in (proactive) | recomputes |")
RESULT_ALIGN = "---:|" * 10


def result_cells(r: Result, predicted_mean_jct: float) -> str:
    return (f"{statistics.mean(r.jct):.2f} | {predicted_mean_jct:.2f} "
            f"| {statistics.median(r.jct):.2f} | {nearest_rank(r.jct, 0.99):.2f} "
            f"| {statistics.mean(r.ttft):.2f} | {r.output_tokens / r.makespan:.1f} "
            f"| {r.makespan:.1f} | {r.preemptions} "
            f"| {r.swap_out_blocks} / {r.swap_in_blocks} ({r.proactive_blocks}) "
            f"| {r.recomputes} |")


def render(args: argparse.Namespace, m: Meta, results: dict[tuple[str, str], Result]) -> str:
    lines = header_lines(args, m, list(results.values()),
                         "# Scheduling and swap policies on CPU: heavy-tailed online workload",
                         "benchmarks/policies_cpu.py")
    lines += ["", f"| scheduling | swap | {RESULT_COLUMNS}", f"|---|---|{RESULT_ALIGN}"]
    for key, r in results.items():
        policy, swap = key
        lines.append(f"| {policy} | {swap} | {result_cells(r, m.predicted[key].mean_jct)}")

    def ratio(table: dict, policy: str) -> float:
        def mean(x) -> float:
            return statistics.mean(x.jct)

        return mean(table[("fcfs", m.default_swap)]) / mean(table[(policy, m.default_swap)])

    lines += [
        "",
        (f"fcfs mean JCT / skip-join-mlfq mean JCT = {ratio(results, 'skip-join-mlfq'):.2f} "
         f"(predicted {ratio(m.predicted, 'skip-join-mlfq'):.2f}); fcfs / mlfq = "
         f"{ratio(results, 'mlfq'):.2f} (predicted {ratio(m.predicted, 'mlfq'):.2f}); swap "
         f"policy {m.default_swap} for all three"),
    ]
    if m.seed_ratios:
        rs = sorted(m.seed_ratios.values())
        lines += [
            "",
            (f"Simulated fcfs / skip-join-mlfq mean JCT on {len(rs)} other seeds of the same "
             f"workload shape (each at {args.load:g} x its own simulated fcfs capacity): median "
             f"{statistics.median(rs):.2f}, min {rs[0]:.2f}, max {rs[-1]:.2f}; per seed: "
             + ", ".join(f"{k}: {v:.2f}" for k, v in m.seed_ratios.items())),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    asyncio.run(main())
