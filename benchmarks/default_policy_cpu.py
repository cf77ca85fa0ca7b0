"""The default configuration against FCFS on the real server: does the paper's design, as
shipped (``fastserve serve`` with no policy flags: skip-join MLFQ, proactive swapping,
quantum derived from the cached profile), beat the old default (fcfs, reactive swapping)
on mean JCT and mean TTFT under a heavy-tailed online workload on this CPU?

Everything goes through ``fastserve serve`` subprocesses and HTTP: streamed
``/v1/completions`` with token-id prompts, greedy, EOS ignored (``ignore_eos``), so each job
produces exactly its output length. Workload, capacity and arrivals as in
``benchmarks/policies_cpu.py`` (its helpers are reused): log-normal prompt and output
lengths, capacity measured on an fcfs server with every request at t=0, then Poisson
arrivals at ``--load`` x capacity with the same arrival times for both rows.

Order of runs, a fresh server each: the default with an empty profile cache (measures the
profile once: cold start); then per workload seed (``--seeds 0,1,2``; one seed's mean JCT
moves by several percent with the arrival draw, so several are pooled): fcfs (capacity),
fcfs (timed), default (cached profile: warm start, timed) -- the two timed runs back to
back, so machine drift hurts both alike. Start-up seconds (process start to the ready
line) are reported for each server.

    .venv/bin/python benchmarks/default_policy_cpu.py [--seeds 0,1,2] [--requests 120]
        [--load 0.9] [--quick]

``--quick`` is a smoke run (8 short requests, no file unless ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policies_cpu import (
    Request,
    build_parser,
    finish_args,
    to_requests,
    workload_shape,
)

from engine.bench.metrics import nearest_rank, saturated_capacity
from engine.bench.workload import with_rate
from engine.config import CacheConfig
from engine.models.loader import default_model_path, load_model_info

DEFAULT_OUT = "benchmarks/results/default_policy_cpu.md"
FCFS = ("--scheduling-policy", "fcfs", "--swap-policy", "reactive")
READY_TIMEOUT_S = 600.0


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    startup_s: float
    banner: dict


def start_server(args: argparse.Namespace, policy_flags: tuple[str, ...], cache_dir: str,
                 log_path: str) -> Server:
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--zmq-address", "off",
           "--log-format", "json", "--disable-log-requests", "--log-stats-interval", "0",
           "--num-gpu-blocks", str(args.num_gpu_blocks),
           "--num-host-blocks", str(args.num_host_blocks),
           "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--profile-cache-dir", cache_dir, *policy_flags]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    started = time.perf_counter()
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 -- lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True)
    banner: dict = {}
    deadline = started + READY_TIMEOUT_S
    assert proc.stderr is not None
    for line in proc.stderr:  # the JSON log lines, until the ready one
        log.write(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "banner":
            banner = record
        if record.get("event") == "ready":
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
            return Server(proc, record["url"], time.perf_counter() - started, banner)
        if time.perf_counter() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"server did not become ready; see {log_path}")


def _drain(proc: subprocess.Popen, log) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        log.write(line)
    log.close()


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


@dataclass
class Result:
    jct: list[float]
    ttft: list[float]
    makespan: float
    output_tokens: int
    preemptions: int
    token_times: list[list[float]]


async def run(url: str, reqs: list[Request]) -> Result:
    """Open loop over HTTP: each request streamed at its arrival time."""
    n = len(reqs)
    jct, ttft = [0.0] * n, [0.0] * n
    times: list[list[float]] = [[] for _ in range(n)]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        async with http.get(f"{url}/v1/scheduler") as r:
            before = (await r.json())["num_preemptions"]
        t0 = time.perf_counter()

        async def one(i: int, req: Request) -> None:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
            body = {"prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "logprobs": 0}
            async with http.post(f"{url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter() - t0
                    for choice in json.loads(line[6:])["choices"]:
                        k = len((choice.get("logprobs") or {}).get("tokens") or [])
                        if k and not times[i]:
                            ttft[i] = now - req.arrival_s
                        times[i] += [now] * k
            jct[i] = time.perf_counter() - t0 - req.arrival_s

        await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        makespan = time.perf_counter() - t0
        async with http.get(f"{url}/v1/scheduler") as r:
            after = (await r.json())["num_preemptions"]
    produced = [len(t) for t in times]
    assert produced == [r.max_tokens for r in reqs], "a job did not produce exactly max_tokens"
    return Result(jct, ttft, makespan, sum(produced), after - before, times)


async def warm_up(url: str, vocab: int) -> None:
    """First forwards pay for allocation; keep that out of the numbers."""
    import random

    rng = random.Random(-1)
    await run(url, [Request([rng.randrange(100, vocab - 100) for _ in range(n)], 4, 0.0)
                    for n in (16, 64, 64, 256)])


def row(name: str, server: Server, r: Result) -> str:
    return (f"| {name} | {statistics.mean(r.jct):.2f} | {statistics.median(r.jct):.2f} "
            f"| {nearest_rank(r.jct, 0.99):.2f} | {statistics.mean(r.ttft):.2f} "
            f"| {nearest_rank(r.ttft, 0.99):.2f} | {r.output_tokens / r.makespan:.1f} "
            f"| {r.makespan:.1f} | {r.preemptions} | {server.startup_s:.1f} |")


def knobs(banner: dict) -> str:
    policy, swap = banner.get("policy", {}), banner.get("swap_policy", {})
    return (f"{policy.get('name')} (base quantum {1e3 * policy.get('base_quantum_s', 0):.0f} ms, "
            f"{policy.get('quantum_source')}; starvation limit "
            f"{policy.get('starvation_limit_s', 0):.1f} s) + {swap.get('name')}")


@dataclass
class SeedRun:
    seed: int
    reqs: list[Request]
    capacity: float
    rate: float
    fcfs: tuple[Server, Result]
    default: tuple[Server, Result]


async def bench_seed(args: argparse.Namespace, seed: int, cache: str, log: str,
                     info) -> SeedRun:
    """One workload seed: capacity on an fcfs server, then fcfs and the default timed."""
    max_job = min(info.max_model_len - 1, args.num_gpu_blocks * CacheConfig().block_size)
    items, gaps = workload_shape(args, seed, max_job)
    reqs = to_requests(items, info.vocab_size, seed)
    cap_server = start_server(args, FCFS, cache, log)
    try:
        await warm_up(cap_server.url, info.vocab_size)
        cap = await run(cap_server.url, reqs)
    finally:
        stop_server(cap_server)
    capacity = saturated_capacity(cap.token_times, [r.max_tokens for r in reqs])
    rate = args.load * capacity
    timed = [Request(r.prompt, r.max_tokens, it.arrival_s)
             for r, it in zip(reqs, with_rate(items, gaps, rate), strict=True)]
    print(f"seed {seed}: capacity {capacity:.3f} req/s; arrivals {rate:.3f} req/s", flush=True)
    results = {}
    for name, flags in (("fcfs", FCFS), ("default", ())):
        server = start_server(args, flags, cache, log)
        try:
            await warm_up(server.url, info.vocab_size)
            results[name] = (server, await run(server.url, timed))
        finally:
            stop_server(server)
        r = results[name][1]
        print(f"seed {seed} {name}: mean JCT {statistics.mean(r.jct):.2f} s, mean TTFT "
              f"{statistics.mean(r.ttft):.2f} s", flush=True)
    return SeedRun(seed, reqs, capacity, rate, results["fcfs"], results["default"])


def ratio_line(label: str, f: list[Result], d: list[Result]) -> str:
    def mean(rs: list[Result], key: str) -> float:
        return statistics.mean(x for r in rs for x in getattr(r, key))

    return (f"| {label} | {mean(f, 'jct') / mean(d, 'jct'):.2f}x "
            f"| {mean(f, 'ttft') / mean(d, 'ttft'):.2f}x |")


async def bench(args: argparse.Namespace, tmp: str) -> str:
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    info = load_model_info(default_model_path())
    cache, log = os.path.join(tmp, "cache"), os.path.join(tmp, "servers.log")
    cold = start_server(args, (), cache, log)  # measures and caches the profile once
    stop_server(cold)
    runs = [await bench_seed(args, seed, cache, log, info) for seed in args.seeds]

    ds = runs[0].default[0]
    dtype, weights = ds.banner.get("dtype", "?"), ds.banner.get("weight_bytes") or 0
    cmd = " ".join([".venv/bin/python", "benchmarks/default_policy_cpu.py", *sys.argv[1:]])
    lines = [
        "# The default configuration vs FCFS on the real server (CPU, heavy-tailed workload)",
        "",
        f"- command: `{cmd}` (whole run {(time.perf_counter() - started) / 60:.1f} min)",
        (f"- machine: {os.cpu_count()} CPU cores, load average {load_before:.2f} at start, "
         f"{os.getloadavg()[0]:.2f} at end; {time.strftime('%Y-%m-%d', time.gmtime())}"),
        (f"- model: SmolLM2-135M-Instruct (bundled Q4_1 GGUF, default --quantization auto: "
         f"{weights / 2**20:.0f} MiB of weights in memory; compute {dtype}), greedy, EOS "
         "ignored; `fastserve serve` subprocesses, streamed /v1/completions"),
        (f"- workload per seed: {args.requests} requests, log-normal prompt (median "
         f"{args.prompt_median}, p99 and clip {args.prompt_max}) and output (median "
         f"{args.output_median}, p99 and clip {args.output_max}) lengths"),
        (f"- engine: {args.num_gpu_blocks} device / {args.num_host_blocks} host KV blocks, "
         f"max_num_seqs {args.max_num_seqs}"),
        ("- per seed: capacity measured on an fcfs server with every request at t=0; then "
         f"Poisson arrivals at {args.load:g} x capacity, the same times for both rows"),
        f"- default as shipped: {knobs(ds.banner)}",
        (f"- start-up to ready: default cold (measures the profile) {cold.startup_s:.1f} s; "
         "warm starts (cached profile) in the table"),
        "",
        ("| seed | configuration | mean JCT (s) | p50 JCT (s) | p99 JCT (s) | mean TTFT (s) "
         "| p99 TTFT (s) | output tok/s | makespan (s) | preemptions | start-up (s) |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r.seed} " + row("fcfs + reactive (old default)", *r.fcfs))
        lines.append(f"| {r.seed} " + row("default (skip-join-mlfq + proactive)", *r.default))
    lines += ["", ("fcfs / default (above 1: the default wins; pooled: means over every "
                   "request of every seed):"), "", "| seeds | mean JCT | mean TTFT |",
              "|---|---:|---:|"]
    for r in runs:
        lines.append(ratio_line(str(r.seed), [r.fcfs[1]], [r.default[1]]))
    if len(runs) > 1:
        lines.append(ratio_line("pooled", [r.fcfs[1] for r in runs],
                                [r.default[1] for r in runs]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = build_parser(__doc__, DEFAULT_OUT)
    parser.set_defaults(sim_seeds=0)
    parser.add_argument("--seeds", default=None,
                        help="comma-separated workload seeds, each a full comparison "
                             "(default: --seed only)")
    args = finish_args(parser.parse_args(), DEFAULT_OUT)
    args.seeds = ([int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed])
    with tempfile.TemporaryDirectory(prefix="default_policy_cpu_") as tmp:
        report = asyncio.run(bench(args, tmp))
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
