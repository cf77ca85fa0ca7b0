"""Soak: minutes of mixed traffic against a real ``fastserve serve`` process, one worker
kill in the middle, and the server's resources sampled all along.

Traffic (``--clients`` concurrent loops, each request drawn at random, seeded):

* 45 % streamed completions read to the end, 20 % non-streamed, 10 % chat streams;
* 15 % streams the client aborts after a few tokens (closes the connection);
* 10 % requests the client disconnects from before the first token.

Half-way through, the worker process is SIGKILLed. Every few seconds the script records
the server's and the worker's resident memory, open file descriptors and threads (from
``/proc``), the server's asyncio tasks (``fastserve:event_loop_tasks`` on ``/metrics``), and
the free KV blocks in both pools (``/v1/scheduler``). Each request ends as one of:

* served: it completed (or was aborted by the client, as intended);
* failed: the server answered with an error: allowed only for requests in flight at the kill
  or sent while the engine was restarting (503);
* lost: no answer within its bound (``--request-timeout``): must be 0.

Output: ``benchmarks/results/soak.md`` (counts, and each resource at start, at the end, its
min and max after warm-up) and ``benchmarks/results/soak.png`` (the resources over time).

    .venv/bin/python benchmarks/soak.py [--duration 600] [--clients 6] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["river", "stone", "light", "winter", "garden", "market", "engine", "paper", "window", "silver", "music", "forest", "ocean", "mountain", "letter", "story", "morning", "yellow", "quiet", "bridge"]


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    result: str  # served | failed | lost
    detail: str = ""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    kill_at: float | None = None
    healed_at: float | None = None
    restarting: tuple[float, float] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), open fds and threads of one process, from /proc."""
    out = {"rss_mib": 0.0, "fds": 0.0, "threads": 0.0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mib"] = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    out["threads"] = float(line.split()[1])
        out["fds"] = float(len(os.listdir(f"/proc/{pid}/fd")))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return kids


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))


async def one_request(session: aiohttp.ClientSession, base: str, rng: random.Random,
                      run: Run, t0: float, timeout: float) -> None:
    kind = rng.choices(["stream", "plain", "chat", "abort", "disconnect"], [45, 20, 10, 15, 10])[0]
    max_tokens = rng.randint(4, 48)
    body: dict = {"model": "soak", "max_tokens": max_tokens, "temperature": 0.7,
                  "seed": rng.randrange(1 << 30)}
    route = "/v1/completions"
    if kind == "chat":
        route = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt(rng)}]
        body["stream"] = True
    else:
        body["prompt"] = prompt(rng)
        body["stream"] = kind != "plain"
    start = time.monotonic() - t0
    result, detail = "served", ""
    try:
        async with asyncio.timeout(timeout):
            async with session.post(base + route, json=body) as r:
                if kind == "disconnect":
                    pass  # leave before reading anything: the server sees the client go
                elif r.status != 200:
                    result, detail = "failed", f"status {r.status}"
                    # A well-behaved client waits as told before it comes back.
                    await asyncio.sleep(float(r.headers.get("Retry-After", 0)))
                elif not body["stream"]:
                    await r.json()
                else:
                    stop_after = rng.randint(1, 4) if kind == "abort" else None
                    seen = 0
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            if b'"error"' in line:
                                result, detail = "failed", "error event"
                            seen += 1
                            if stop_after is not None and seen >= stop_after:
                                break
    except TimeoutError:
        result, detail = "lost", "no answer in time"
    except aiohttp.ClientError as e:
        result, detail = "failed", f"{type(e).__name__}"
    run.outcomes.append(Outcome(kind, start, time.monotonic() - t0, result, detail))


async def client_loop(base: str, seed: int, run: Run, t0: float, until: float,
                      timeout: float) -> None:
    rng = random.Random(seed)
    conn = aiohttp.TCPConnector(limit=4, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        while time.monotonic() - t0 < until:
            await one_request(session, base, rng, run, t0, timeout)
            await asyncio.sleep(rng.uniform(0, 0.2))


async def sampler(base: str, server_pid: int, run: Run, t0: float, until: float,
                  every: float) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        while time.monotonic() - t0 < until:
            sample: dict = {"t": time.monotonic() - t0}
            sample.update({f"server_{k}": v for k, v in proc_stats(server_pid).items()})
            workers = children(server_pid)
            stats = [proc_stats(w) for w in workers]
            sample["worker_rss_mib"] = sum(x["rss_mib"] for x in stats)
            sample["worker_fds"] = sum(x["fds"] for x in stats)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with s.get(base + "/metrics") as r:
                    for line in (await r.text()).splitlines():
                        if line.startswith("fastserve:event_loop_tasks{"):
                            sample["tasks"] = float(line.rsplit(" ", 1)[1])
                async with s.get(base + "/v1/scheduler") as r:
                    if r.status == 200:
                        sched = await r.json()
                        sample["free_gpu_blocks"] = sched["num_free_gpu_blocks"]
                        sample["free_host_blocks"] = sched["num_free_host_blocks"]
                        sample["jobs"] = len(sched["jobs"])
            run.samples.append(sample)
            await asyncio.sleep(every)


async def killer(base: str, server_pid: int, run: Run, t0: float, at: float) -> None:
    await asyncio.sleep(at)
    workers = children(server_pid)
    if not workers:
        raise RuntimeError("no worker process to kill")
    run.kill_at = time.monotonic() - t0
    for w in workers:
        os.kill(w, signal.SIGKILL)
    print(f"[{run.kill_at:6.1f} s] killed worker(s) {workers}", flush=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(base + "/health") as r:
                    if r.status == 200 and children(server_pid) and \
                            children(server_pid) != workers:
                        break
            await asyncio.sleep(0.2)
    run.healed_at = time.monotonic() - t0
    print(f"[{run.healed_at:6.1f} s] healthy again", flush=True)


async def soak(args: argparse.Namespace, base: str, server_pid: int) -> Run:
    run = Run()
    t0 = time.monotonic()
    tasks = [sampler(base, server_pid, run, t0, args.duration, args.sample_every),
             killer(base, server_pid, run, t0, args.duration / 2)]
    tasks += [client_loop(base, args.seed + i, run, t0, args.duration, args.request_timeout)
              for i in range(args.clients)]
    await asyncio.gather(*tasks)
    # Let the last frees land, then one more sample: the pools must be whole.
    await asyncio.sleep(2)
    final: dict = {"t": time.monotonic() - t0}
    async with aiohttp.ClientSession() as s, s.get(base + "/v1/scheduler") as r:
        sched = await r.json()
        final.update(free_gpu_blocks=sched["num_free_gpu_blocks"],
                     free_host_blocks=sched["num_free_host_blocks"],
                     total_gpu_blocks=sched["num_gpu_blocks"],
                     total_host_blocks=sched["num_host_blocks"], jobs=len(sched["jobs"]))
    run.samples.append({**final, **{f"server_{k}": v for k, v in proc_stats(server_pid).items()}})
    return run


def classify(run: Run) -> dict[str, int]:
    """Failures are allowed only for requests in flight at the kill or sent before the
    engine was healthy again."""
    kill, healed = run.kill_at or float("inf"), run.healed_at or float("inf")
    counts = {"served": 0, "failed_at_kill": 0, "failed_otherwise": 0, "lost": 0}
    for o in run.outcomes:
        if o.result == "served":
            counts["served"] += 1
        elif o.result == "lost":
            counts["lost"] += 1
        elif o.end >= kill and o.start <= healed:
            counts["failed_at_kill"] += 1
        else:
            counts["failed_otherwise"] += 1
    return counts


METRICS = [
    ("server_rss_mib", "server RSS (MiB)"),
    ("worker_rss_mib", "worker RSS (MiB)"),
    ("server_fds", "server open fds"),
    ("worker_fds", "worker open fds"),
    ("server_threads", "server threads"),
    ("tasks", "server asyncio tasks"),
    ("free_gpu_blocks", "free device KV blocks"),
    ("free_host_blocks", "free host KV blocks"),
]


def report(args: argparse.Namespace, run: Run, command: str) -> str:
    counts = classify(run)
    warm = [s for s in run.samples[:-1] if s["t"] >= args.warmup]
    idle_before, final = run.samples[0], run.samples[-1]
    lines = [
        "# Soak: mixed traffic, one worker kill, resources over time",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"- command: `{command}`",
        (f"- {args.duration:.0f} s of traffic from {args.clients} clients (45 % streams, 20 % "
         "plain, 10 % chat streams, 15 % aborted after 1-4 tokens, 10 % disconnected before "
         f"the first token), worker SIGKILLed at {run.kill_at:.0f} s, healthy again at "
         f"{run.healed_at:.0f} s ({run.healed_at - run.kill_at:.1f} s later)"),
        "",
        "| requests | count |",
        "|---|---:|",
        f"| served (completed, or aborted by the client as intended) | {counts['served']} |",
        f"| failed, in flight at the kill or sent while restarting | {counts['failed_at_kill']} |",
        f"| failed otherwise | {counts['failed_otherwise']} |",
        f"| lost (no answer within {args.request_timeout:.0f} s) | {counts['lost']} |",
        "",
        (f"Resources sampled every {args.sample_every:.0f} s; statistics after a "
         f"{args.warmup:.0f} s warm-up. Free KV blocks move with the load while traffic "
         "runs; what matters is the line below the table: after the traffic stops, both "
         "pools are whole again."),
        "",
        "| resource | first (warm) | last (warm) | min | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in METRICS:
        vals = [s[key] for s in warm if key in s]
        if vals:
            lines.append(f"| {label} | {vals[0]:.1f} | {vals[-1]:.1f} | {min(vals):.1f} "
                         f"| {max(vals):.1f} |")
    lines += [
        "",
        (f"After the traffic: free device blocks {final.get('free_gpu_blocks')} of "
         f"{final.get('total_gpu_blocks')}, free host blocks {final.get('free_host_blocks')} of "
         f"{final.get('total_host_blocks')}, jobs left {final.get('jobs')}; server RSS "
         f"{final.get('server_rss_mib', 0):.0f} MiB (at start "
         f"{idle_before.get('server_rss_mib', 0):.0f} MiB), fds {final.get('server_fds', 0):.0f}."),
        "",
        "![resources over time](soak.png)",
        "",
    ]
    return "\n".join(lines)


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = run.samples[:-1]
    fig, axes = plt.subplots(4, 2, figsize=(11, 10), sharex=True)
    for ax, (key, label) in zip(axes.flat, METRICS):
        pts = [(s["t"], s[key]) for s in samples if key in s]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        if run.kill_at is not None:
            ax.axvline(run.kill_at, color="red", ls="--", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0)
    for ax in axes[-1]:
        ax.set_xlabel("seconds (red: worker killed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--model", default=None, help="model path (default: the bundled GGUF)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/soak.md"))
    ap.add_argument("--quick", action="store_true", help="60 s smoke run, printed only")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for fastserve serve (repeatable)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup, args.sample_every = 60.0, 10.0, 3.0
    port = free_port()
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "soak", "--log-level", "ERROR", *args.server_arg]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.5)
        run = asyncio.run(soak(args, base, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    command = " ".join(["benchmarks/soak.py", *sys.argv[1:]])
    text = report(args, run, command)
    print(text)
    print(json.dumps(classify(run)))
    if not args.quick:
        out = Path(args.out)
        out.write_text(text)
        plot(run, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    counts = classify(run)
    return 0 if counts["lost"] == 0 and counts["failed_otherwise"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
