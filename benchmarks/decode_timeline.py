"""Where one decode step's milliseconds go, end to end, on a real ``fastserve serve``.

Starts ``fastserve serve`` on the bundled GGUF (or ``--model``) with the step tracer of
``benchmarks/steptrace/sitecustomize.py`` on ``PYTHONPATH``: every process of the server
(the engine and its worker) records spans of the engine's plan, send, the worker's receive,
tensor build, forward, logits, sampling and reply, the engine's receive, scheduler update,
detokenizing and the SSE write, all on one clock (``time.perf_counter``, CLOCK_MONOTONIC).
After a warm-up request, one streaming request of ``--tokens`` output tokens is measured;
the client stamps every chunk on the same clock. The server is stopped, the spans of the
measured request are matched step by step, and the medians (with 10th / 90th percentiles)
of each phase over the steady decode steps are printed, with the CPU seconds per token that
each process (engine, worker, this client) used.

    .venv/bin/python benchmarks/decode_timeline.py [--tokens 128] [--fastserve-arg=--torch-threads=1]

A measurement tool: the tracer is never imported by the engine itself.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_llamacpp import (
    REPO,
    Prompts,
    Server,
    free_port,
    running,
)

from engine.models.loader import default_model_path

TRACER_DIR = Path(__file__).resolve().parent / "steptrace"


def server(model: str, args: argparse.Namespace, trace_dir: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--zmq-address", "off", "--max-num-seqs", str(args.max_num_seqs),
            "--torch-threads", str(args.threads), *args.fastserve_arg]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TRACER_DIR), str(REPO), env.get("PYTHONPATH")) if p)
    env["FASTSERVE_STEPTRACE"] = trace_dir
    return Server("fastserve", argv, port, env=env, cwd=str(REPO))


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            out += [int(c) for c in f.read().split()]
    return out


async def one_request(base: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    chunks: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        sent = time.perf_counter()
        async with s.post(base + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for raw in resp.content:
                line = raw.strip()
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    chunks.append(time.perf_counter())
        done = time.perf_counter()
    return {"sent": sent, "chunks": chunks, "done": done}


def load_traces(trace_dir: str) -> dict[str, list[tuple[str, float, float, float]]]:
    """Spans by process role: "engine" (the serve process) and "worker"."""
    out: dict[str, list] = {}
    for path in Path(trace_dir).glob("trace-*.json"):
        data = json.loads(path.read_text())
        argv0 = data["argv"][0] if data["argv"] else ""
        role = "worker" if argv0.endswith(os.path.join("parallel", "worker.py")) else "engine"
        out.setdefault(role, []).extend(tuple(r) for r in data["records"])
    for recs in out.values():
        recs.sort(key=lambda r: r[1])
    return out


class Spans:
    def __init__(self, records: list, lo: float, hi: float) -> None:
        self.by: dict[str, list[tuple[float, float, float]]] = {}
        for name, t0, t1, cpu in records:
            if lo <= t0 <= hi:
                self.by.setdefault(name, []).append((t0, t1, cpu))

    def all(self, name: str) -> list[tuple[float, float, float]]:
        return self.by.get(name, [])

    def first_after(self, name: str, t: float) -> tuple[float, float, float] | None:
        spans = self.all(name)
        i = bisect.bisect_left([s[0] for s in spans], t)
        return spans[i] if i < len(spans) else None

    def last_before(self, name: str, t: float) -> tuple[float, float, float] | None:
        spans = self.all(name)
        i = bisect.bisect_right([s[0] for s in spans], t)
        return spans[i - 1] if i else None

    def within(self, name: str, t0: float, t1: float) -> float:
        return sum(s[1] - s[0] for s in self.all(name) if t0 <= s[0] and s[1] <= t1)


def analyse(traces: dict, req: dict[str, Any]) -> dict[str, list[float]]:
    """Per worker step of the measured request (prefill and the first/last two skipped):
    the phases of its timeline, in ms."""
    lo, hi = req["sent"], req["done"]
    e, w = Spans(traces.get("engine", []), lo, hi), Spans(traces.get("worker", []), lo, hi)
    steps = w.all("runner_step")
    phases: dict[str, list[float]] = {}

    def add(key: str, value: float | None) -> None:
        if value is not None:
            phases.setdefault(key, []).append(value * 1e3)

    for k in range(2, len(steps) - 3):
        h0, h1, hcpu = steps[k]
        n0 = steps[k + 1][0]
        dec, enc = w.last_before("decode", h0), w.first_after("encode", h1)
        ndec = w.last_before("decode", n0)
        if not (dec and enc and ndec):
            continue
        add("period (worker step start to next)", n0 - h0)
        add("worker: decode plan", dec[1] - dec[0])
        add("worker: runner.step", h1 - h0)
        add("worker: runner.step CPU (main thread)", hcpu)
        add("worker:   assemble inputs", w.within("assemble", h0, h1))
        add("worker:   model forward", w.within("model_forward", h0, h1))
        add("worker:   logits (LM head)", w.within("logits", h0, h1))
        add("worker:   sample", w.within("sample", h0, h1))
        add("worker: encode + send reply", enc[1] - enc[0])
        add("worker: idle (reply sent -> next plan decoding)", ndec[0] - enc[1])
        reply = e.first_after("reply_in", enc[1])
        nsend = e.last_before("send", ndec[0])
        if reply:
            add("zmq w->e (reply sent -> engine reads it)", reply[0] - enc[1])
            upd = e.first_after("update", reply[0])
            if upd:
                add("engine: reply read -> update starts", upd[0] - reply[1])
                add("engine: update", upd[1] - upd[0])
                fe = e.first_after("frontend_events", upd[1])
                if fe:
                    add("engine: update -> frontend starts", fe[0] - upd[1])
                    add("engine: frontend on_events", fe[1] - fe[0])
                    add("engine:   detokenize", e.within("detok", fe[0], fe[1]))
                    sse = e.first_after("sse_write", fe[1])
                    if sse:
                        add("engine: frontend -> SSE write starts", sse[0] - fe[1])
                        add("engine: SSE write", sse[1] - sse[0])
                        add("reply read -> SSE written", sse[1] - reply[0])
                        i = bisect.bisect_left(req["chunks"], sse[1])
                        if i < len(req["chunks"]):
                            add("client: SSE written -> chunk parsed", req["chunks"][i] - sse[1])
        if nsend:
            sched = e.last_before("schedule", nsend[0])
            pm = e.last_before("plan_to_message", nsend[0])
            if sched:
                add("engine: schedule (next plan)", sched[1] - sched[0])
            if pm:
                add("engine: plan_to_message", pm[1] - pm[0])
            add("engine: send (encode + zmq)", nsend[1] - nsend[0])
            if nsend[1] > enc[1]:  # the worker had to wait for this plan
                add("waited: reply sent -> next plan sent", nsend[1] - enc[1])
                add("zmq e->w (plan sent -> worker decoding)", ndec[0] - nsend[1])
            else:
                add("queued: next plan sent before the reply (ms ahead)", enc[1] - nsend[1])
    return phases


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--fastserve-arg", action="append", default=[])
    ap.add_argument("--json", default=None, help="write the run and its phases here")
    ap.add_argument("--trace-dir", default=None, help="keep the raw spans here (default: a "
                    "temporary directory)")
    ap.add_argument("--analyse", default=None, metavar="JSON",
                    help="only re-analyse a --json file written with --trace-dir")
    args = ap.parse_args(argv)
    if args.analyse:
        run = json.loads(Path(args.analyse).read_text())
        run["phases"] = analyse(load_traces(run["trace_dir"]), run["request"])
        print_run(run)
        return 0
    model = os.path.abspath(args.model or default_model_path())
    prompts = Prompts(model, 1234)
    with contextlib.ExitStack() as stack:
        trace_dir = args.trace_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="steptrace-"))
        os.makedirs(trace_dir, exist_ok=True)
        srv = server(model, args, trace_dir)
        with tempfile.TemporaryDirectory() as logs:
            async with running(srv, Path(logs)) as base:
                engine_pid = int(next(
                    p.name for p in Path("/proc").iterdir() if p.name.isdigit()
                    and _cmd(p).startswith(srv.argv[0]) and f"--port {srv.port} " in _cmd(p)))
                worker_pid = next(c for c in children(engine_pid)
                                  if "engine.parallel.worker" in _cmd(Path(f"/proc/{c}")))
                await one_request(base, prompts(16), 8)  # warm-up
                c0 = (proc_cpu(engine_pid), proc_cpu(worker_pid), time.process_time())
                load = os.getloadavg()[0]
                req = await one_request(base, prompts(16), args.tokens)
                c1 = (proc_cpu(engine_pid), proc_cpu(worker_pid), time.process_time())
        n = len(req["chunks"])
        run = {
            "server": srv.argv, "load": load, "request": req, "trace_dir": args.trace_dir,
            "rate": (n - 1) / (req["chunks"][-1] - req["chunks"][0]),
            "cpu_ms_per_token": {who: (b - a) / n * 1e3 for who, a, b in
                                 zip(("engine", "worker", "client"), c0, c1, strict=True)},
            "phases": analyse(load_traces(trace_dir), req),
        }
    print_run(run)
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1))
    return 0


def print_run(run: dict[str, Any]) -> None:
    print(f"fastserve {' '.join(run['server'][3:])}")
    print(f"load average at start {run['load']:.2f}; {len(run['request']['chunks'])} chunks; "
          f"decode {run['rate']:.1f} tok/s ({1e3 / run['rate']:.2f} ms/token)")
    for who, ms in run["cpu_ms_per_token"].items():
        print(f"CPU per token, {who}: {ms:.2f} ms")
    phases = run["phases"]
    if not phases:
        print("no spans matched (was the tracer on PYTHONPATH?)")
        return
    width = max(len(k) for k in phases)
    print(f"{'phase':<{width}}  median    p10    p90      n  (ms)")
    for key, vals in phases.items():
        print(f"{key:<{width}}  {statistics.median(vals):6.2f} {pct(vals, .1):6.2f} "
              f"{pct(vals, .9):6.2f} {len(vals):6d}")


def _cmd(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
