"""SIGTERM on a real ``fastserve serve`` process (tiny model, worker process, HTTP and
ZeroMQ): admission stops at once (new requests and /health get 503), requests in flight
drain until ``--shutdown-timeout``, the rest end with ``finish_reason: "abort"`` and
``[DONE]``, and the whole process tree exits within 5 s of the deadline, leaving no child
process and no socket file. A second SIGTERM skips the wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.timeout(180)

STARTUP_S = 120  # model load on a busy 2-core machine
EXIT_AFTER_DEADLINE_S = 5.0  # the promise: the tree is gone this long after the deadline
STREAMS = 12
SERVING = re.compile(r"serving \S+ on (http://127\.0\.0\.1:\d+)")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    tmp: str  # TMPDIR of the server: the worker's sockets and the ZeroMQ frontend's live here
    shm_before: set[str]  # /dev/shm before the server started
    stderr: list[str]  # everything the server wrote to stderr (read by a thread)

    def children(self) -> list[int]:
        return _children(self.proc.pid)

    def shm_in_use(self) -> set[str]:
        """Shared-memory files the server or its workers have open or mapped right now."""
        return _shm_of([self.proc.pid, *self.children()])


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _sockets_under(path: str) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if stat.S_ISSOCK(os.lstat(full).st_mode):
                found.append(full)
    return found


SHM = "/dev/shm"


def _shm_files() -> set[str]:
    return set(os.listdir(SHM)) if os.path.isdir(SHM) else set()


def _shm_of(pids: list[int]) -> set[str]:
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                found |= {line.split(SHM + "/", 1)[1].split()[0] for line in f if SHM + "/" in line}
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(SHM + "/"):
                    found.add(target.removeprefix(SHM + "/").split()[0])
        except OSError:  # the process exited meanwhile
            continue
    return found


def assert_no_segment_left(server: Server, seen: set[str]) -> None:
    """Nothing in /dev/shm that the server's process tree used, or that is named after us,
    outlives it (files other programs on the machine make come and go: not ours)."""
    new = _shm_files() - server.shm_before
    leaked = {n for n in new if n in seen or "fastserve" in n}
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"


def start_server(model_path: str, tmp: str, shutdown_timeout: float,
                 own_group: bool = False) -> Server:
    """``own_group``: the server leads a new process group, as a shell's foreground job
    does (a terminal's Ctrl-C goes to the whole group)."""
    env = {**os.environ, "TMPDIR": tmp, "PYTHONPATH": os.getcwd()}
    shm_before = _shm_files()
    cmd = [
        sys.executable, "-m", "engine.cli", "serve", "--model", model_path,
        "--dtype", "float32", "--block-size", "4", "--num-gpu-blocks", "256",
        "--host-kv-cache-memory", "16M", "--torch-threads", "1", "--max-num-seqs", "1",
        "--port", "0", "--zmq-address", f"ipc://{tmp}/front.ipc", "--served-model-name", "tiny",
        "--shutdown-timeout", str(shutdown_timeout), "--log-level", "INFO",
        # Pinned: the drain scenario assumes jobs run to completion one at a time. Under
        # the default (skip-join MLFQ, a tiny model's sub-millisecond quantum) the probe
        # request overtakes the streams and the loop is busy swapping them.
        "--scheduling-policy", "fcfs", "--swap-policy", "reactive",
    ]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=own_group)
    deadline = time.monotonic() + STARTUP_S
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), True)
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = SERVING.search(line)
        if m:  # keep reading: a full pipe would block the server's logging
            threading.Thread(target=_collect, args=(proc.stderr, lines), daemon=True).start()
            return Server(proc, m.group(1), tmp, shm_before, lines)
    proc.kill()
    proc.wait(10)
    raise AssertionError("server did not start:\n" + "".join(lines))


def _collect(stream, lines: list[str]) -> None:
    lines.extend(stream)  # line by line, as the server writes them


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:  # a failed test must not leave a server behind
        if s.proc.poll() is None:
            for pid in s.children():
                os.kill(pid, signal.SIGKILL)
            s.proc.kill()
            s.proc.wait(10)


async def read_stream(s: aiohttp.ClientSession, base: str, first: asyncio.Event) -> dict:
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 240,
            "ignore_eos": True, "stream": True}
    reasons, done, tokens = [], False, 0
    async with s.post(base + "/v1/completions", json=body) as r:
        assert r.status == 200
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            first.set()
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for c in chunk["choices"]:
                tokens += 1
                if c["finish_reason"]:
                    reasons.append(c["finish_reason"])
    return {"reasons": reasons, "done": done, "chunks": tokens}


async def _drain_and_check(server: Server, *, signals: int, deadline_s: float) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        first = asyncio.Event()
        streams = [asyncio.ensure_future(read_stream(s, server.base, first))
                   for _ in range(STREAMS)]
        await asyncio.wait_for(first.wait(), 60)  # generation is under way
        children = server.children()
        assert children, "the worker process should be a child of the server"
        shm_seen = server.shm_in_use()
        server.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # Admission is closed at once: new work and health probes get 503.
        async with s.post(server.base + "/v1/completions",
                          json={"model": "tiny", "prompt": "hi", "max_tokens": 1}) as r:
            assert r.status == 503 and r.headers["Retry-After"]
            assert (await r.json())["error"]["code"] == "shutting_down"
        async with s.get(server.base + "/health") as r:
            assert r.status == 503
        if signals == 2:  # only now: two signals sent back to back may arrive as one
            server.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*streams), deadline_s + 60)
    code = await asyncio.to_thread(server.proc.wait, deadline_s + EXIT_AFTER_DEADLINE_S + 30)
    exited_after = time.monotonic() - sent
    assert code == 0
    assert exited_after <= deadline_s + EXIT_AFTER_DEADLINE_S, exited_after
    assert not [p for p in children if _alive(p)], "a child process outlived the server"
    assert _sockets_under(server.tmp) == []
    assert not [d for d in os.listdir(server.tmp) if d.startswith("fastserve-")]
    assert_no_segment_left(server, shm_seen)
    for r in results:  # every stream ended properly, one way or the other
        assert r["done"] and len(r["reasons"]) == 1 and r["reasons"][0] in ("length", "abort")
    return results


async def test_sigterm_drains_then_aborts_at_the_deadline_and_leaves_nothing(
    model_path, tmp_path, servers
):
    server = start_server(model_path, str(tmp_path), shutdown_timeout=0.5)
    servers.append(server)
    results = await _drain_and_check(server, signals=1, deadline_s=0.5)
    # One job runs at a time (max-num-seqs 1): twelve 240-token jobs outlast a 0.5 s drain, so
    # the last ones were aborted at the deadline rather than cut off without a word.
    assert any(r["reasons"] == ["abort"] for r in results)


async def test_second_sigterm_aborts_at_once_instead_of_waiting_out_the_timeout(
    model_path, tmp_path, servers
):
    server = start_server(model_path, str(tmp_path), shutdown_timeout=600.0)
    servers.append(server)
    # The bound is the hard stop's (deadline 0), far below the 600 s drain it skipped.
    results = await _drain_and_check(server, signals=2, deadline_s=0.0)
    assert any(r["reasons"] == ["abort"] for r in results)


async def test_ctrl_c_on_the_process_group_stops_the_workers_in_order_without_a_traceback(
    model_path, tmp_path, servers
):
    # A terminal's Ctrl-C sends SIGINT to the server and its workers at once. The workers
    # must leave stopping to the engine (drain, then `shutdown`), not die of
    # KeyboardInterrupt under requests still draining.
    server = start_server(model_path, str(tmp_path), shutdown_timeout=30.0, own_group=True)
    servers.append(server)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        first = asyncio.Event()
        body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 24,
                "ignore_eos": True, "stream": True}

        async def short_stream() -> dict:
            reasons, done = [], False
            async with s.post(server.base + "/v1/completions", json=body) as r:
                assert r.status == 200
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        first.set()
                        if line == "data: [DONE]":
                            done = True
                            continue
                        chunk = json.loads(line.removeprefix("data: "))
                        if "error" in chunk:  # the stream failed (a worker died under it)
                            reasons.append("error: " + chunk["error"]["message"])
                            continue
                        reasons += [c["finish_reason"] for c in chunk["choices"]
                                    if c["finish_reason"]]
            return {"reasons": reasons, "done": done}

        streams = [asyncio.ensure_future(short_stream()) for _ in range(3)]
        await asyncio.wait_for(first.wait(), 60)
        children = server.children()
        assert children
        shm_seen = server.shm_in_use()
        os.killpg(server.proc.pid, signal.SIGINT)
        results = await asyncio.wait_for(asyncio.gather(*streams), 90)
    code = await asyncio.to_thread(server.proc.wait, 60)
    assert code == 0
    # The drain had room for these short streams: a worker that died of the SIGINT would
    # have failed them instead.
    assert all(r["done"] and r["reasons"] == ["length"] for r in results), results
    assert not [p for p in children if _alive(p)], "a worker outlived the server"
    stderr = "".join(server.stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "worker rank" not in stderr, stderr[-3000:]  # no "worker rank 0 exited with ..."
    assert _sockets_under(server.tmp) == []
    assert_no_segment_left(server, shm_seen)


async def test_server_killed_outright_leaves_no_worker_no_worker_socket_and_no_segment(
    model_path, tmp_path, servers
):
    # SIGKILL: nothing of the server runs its shutdown. Its workers notice the parent is
    # gone, exit, and remove the engine's private control-socket directory.
    server = start_server(model_path, str(tmp_path), shutdown_timeout=1.0)
    servers.append(server)
    children = server.children()
    assert children
    shm_seen = server.shm_in_use()
    server.proc.kill()
    await asyncio.to_thread(server.proc.wait, 10)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30  # a worker polls for its parent every second
    while [p for p in children if _alive(p)] and loop.time() < deadline:
        await asyncio.sleep(0.1)
    assert not [p for p in children if _alive(p)], "a worker outlived its killed server"
    assert not [d for d in os.listdir(server.tmp) if d.startswith("fastserve-")]
    # Only the ZeroMQ frontend's socket file, at the path the user chose, can outlive a
    # SIGKILL (nothing of the server runs); the next server's bind replaces it.
    assert _sockets_under(server.tmp) in ([], [f"{server.tmp}/front.ipc"])
    assert_no_segment_left(server, shm_seen)
