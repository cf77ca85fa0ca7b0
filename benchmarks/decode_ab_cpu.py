"""Decode speed of several ``fastserve serve`` configurations, interleaved on a shared machine.

Issue #12's first two rows (``benchmarks/cpu_vs_llamacpp.py``: one request of 128 output
tokens, and 8 concurrent ones, streaming, token-id prompts, ``ignore_eos``), measured for
each configuration in turn, round after round, so that load from other processes on a busy
machine falls on every configuration alike; the report gives each one's median and its
range over the rounds. All servers are started first and stay up (an idle server costs
nothing); each is warmed up before the first round.

    .venv/bin/python benchmarks/decode_ab_cpu.py --rounds 5 \\
        --config "sync=--overlap-steps off" --config "overlap=" --out results/x.md

A ``--config`` is ``LABEL=ARGS``: ARGS are extra ``fastserve serve`` arguments (shell
words) on top of ``--max-num-seqs 8 --torch-threads 2`` (``--threads``).
``--llama-server PATH`` adds llama.cpp's own server as one more configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_llamacpp import (
    DECODE_PROMPT_TOKENS,
    Prompts,
    check,
    decode_rate,
    fastserve_server,
    gather_requests,
    git_commit,
    llama_server,
    running,
)

from engine.config import SchedulerConfig
from engine.models.loader import default_model_path


async def decode_1(base: str, prompts: Prompts, tokens: int, problems: list[str]) -> float:
    res, _ = await gather_requests(base, [(prompts(DECODE_PROMPT_TOKENS), tokens, 0.0)])
    check(res, "decode 1", problems)
    return decode_rate(res[0])


async def decode_n(base: str, prompts: Prompts, tokens: int, n: int, problems: list[str]) -> float:
    res, _ = await gather_requests(base, [(prompts(DECODE_PROMPT_TOKENS), tokens, 0.0)
                                          for _ in range(n)])
    check(res, f"decode {n}", problems)
    span = max(r.last for r in res) - min(r.first for r in res)
    return (sum(r.completion_tokens for r in res) - 1) / span


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="LABEL=extra fastserve args")
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="Markdown report (and .json beside it)")
    ap.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    model = os.path.abspath(args.model or default_model_path())
    configs = [c.partition("=") for c in args.config] or [("default", "", "")]
    servers = []
    for label, _, extra in configs:
        ns = argparse.Namespace(parallel=args.parallel, threads=args.threads,
                                scheduling_policy=SchedulerConfig().policy,
                                fastserve_arg=shlex.split(extra))
        servers.append((label, fastserve_server(model, ns)))
    if args.llama_server:
        ns = argparse.Namespace(parallel=args.parallel, threads=args.threads, llama_arg=[])
        servers.append(("llama-server", llama_server(Path(args.llama_server), model, ns)))
    problems: list[str] = []
    results: dict[str, dict[str, list[float]]] = {label: {"decode_1": [], "decode_n": []}
                                                  for label, _ in servers}
    loads = []
    with tempfile.TemporaryDirectory(prefix="decode_ab-") as logs:
        async with contextlib.AsyncExitStack() as stack:
            bases = {}
            for label, srv in servers:
                srv.name = f"{srv.name}-{label}"
                bases[label] = await stack.enter_async_context(running(srv, Path(logs)))
                print(f"[{label}] up: {shlex.join(srv.argv[3:])}", flush=True)
            prompts = Prompts(model, 4321)
            for label, base in bases.items():  # warm-up
                await decode_1(base, prompts, 16, problems)
                await decode_n(base, prompts, 16, args.parallel, problems)
            order = list(bases)
            for r in range(args.rounds):
                loads.append(os.getloadavg()[0])
                for label in order[r % len(order):] + order[:r % len(order)]:
                    d1 = await decode_1(bases[label], prompts, args.tokens, problems)
                    dn = await decode_n(bases[label], prompts, args.tokens, args.parallel, problems)
                    results[label]["decode_1"].append(d1)
                    results[label]["decode_n"].append(dn)
                    print(f"round {r} [{label}] decode 1: {d1:.1f} tok/s, decode "
                          f"{args.parallel}: {dn:.1f} tok/s", flush=True)
    text = report(args, servers, results, loads, problems)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"args": vars(args), "results": results, "loadavg": loads,
             "argv": {label: srv.argv for label, srv in servers}}, indent=1) + "\n")
    return 1 if problems else 0


def report(args, servers, results, loads, problems) -> str:
    def cell(vals: list[float]) -> str:
        return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"

    lines = [
        "# Decode tok/s, configurations interleaved (median, range over rounds)", "",
        (f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; fastserve commit "
         f"{git_commit()}; {args.rounds} rounds, {args.tokens} output tokens, 16-token prompts"),
        f"- load average (1 min) at each round's start: {', '.join(f'{x:.1f}' for x in loads)}",
        *([f"- note: {args.note}"] if args.note else []),
        "", f"| configuration | decode, 1 request | decode, {args.parallel} concurrent |",
        "|---|---:|---:|",
    ]
    for label, srv in servers:
        res = results[label]
        lines.append(f"| {label} | {cell(res['decode_1'])} | {cell(res['decode_n'])} |")
    lines += ["", "Servers:", ""]
    lines += [f"- {label}: `{shlex.join(srv.argv[3:] if 'fastserve' in srv.name else srv.argv)}`"
              for label, srv in servers]
    if problems:
        lines += ["", "**Checks failed:**", ""] + [f"- {p}" for p in problems[:20]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
