"""Engine side of the worker protocol: start the ranks, deliver every command to every rank.

One way to call the workers: ``await executor.call(kind, **fields)``; to keep several
steps in flight, ``handle = await executor.submit(kind, **fields)`` sends now and
``await handle`` waits for the answer later. A command is encoded once and sent, in order,
to every rank over one ROUTER socket that addresses each rank by its routing id (a PUSH
socket would round-robin plans between ranks, and the delta-encoded plans must reach every
rank exactly once, in order). Steps and profiles are answered by the driver only (the
last stage's TP rank 0); everything else by every rank.

Ranks are local processes (``mp``), ``fastserve worker`` processes that connect from other
hosts (``remote_ranks``), or Ray actors (``ray``, see ``engine.parallel.ray_backend``); all
run the same worker main. The reader also answers each rank's watchdog (``watch`` from a
``watch-...`` routing id) with this executor's instance id, so that a rank whose engine or
worker group is gone ends itself (``engine.parallel.worker.Watchdog``).

Failure: a local rank that exits, an error from any rank of a parallel world (its peers
may now be stuck in a collective), or a call past its deadline fails every pending call
with :class:`WorkerDiedError` instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from engine.config import ParallelConfig
from engine.logs import current_format
from engine.parallel.protocol import ProtocolError, decode, driver_rank, encode
from engine.parallel.worker import IPC_DIR_PREFIX, WATCH_PREFIX, rank_identity

log = logging.getLogger("fastserve.executor")

# Commands only the driver answers (every rank runs them).
DRIVER_ONLY = frozenset({"step", "profile"})


class WorkerError(RuntimeError):
    """A worker answered a command with an error; ``type`` is the exception's class name."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if type_name else message)
        self.type = type_name
        self.detail = message


class WorkerDiedError(RuntimeError):
    """A worker process exited or stopped answering."""


@dataclass
class _Call:
    kind: str
    deadline: float
    expect: set[int]
    future: asyncio.Future
    replies: dict[int, dict] = field(default_factory=dict)


class WorkerExecutor:
    """Owns the ``tp x pp`` worker ranks of one engine (local processes or Ray actors;
    remote ranks join by connecting to ``address``)."""

    def __init__(
        self,
        step_timeout_s: float = 120.0,
        startup_timeout_s: float = 300.0,
        parallel: ParallelConfig | None = None,
    ) -> None:
        self.parallel = parallel or ParallelConfig(step_timeout_s=step_timeout_s, startup_timeout_s=startup_timeout_s)
        self.step_timeout_s = step_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.world_size = self.parallel.world_size
        self.driver = driver_rank(self.parallel.tensor_parallel_size, self.parallel.pipeline_parallel_size)
        self._ctx = zmq.asyncio.Context()
        # A private directory for the ipc:// control socket (only when one is used): removed
        # at shutdown, or by the orphaned workers if this process is killed outright.
        self._dir = None if self.parallel.engine_address else tempfile.mkdtemp(prefix=IPC_DIR_PREFIX)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a missing rank raises, never drops
        bind = self.parallel.engine_address or f"ipc://{self._dir}/ctl"
        self._sock.bind(bind)
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._send_lock = asyncio.Lock()
        self._calls = itertools.count(1)
        self._pending: dict[int, _Call] = {}
        self._hello: dict[int, dict] = {}
        self._all_hello: asyncio.Event | None = None
        self._procs: dict[int, subprocess.Popen] = {}
        self._reader: asyncio.Task | None = None
        self._dead: str | None = None
        self._stopping = False  # shutdown() has begun: ranks exiting now are expected to
        self._last_send = time.monotonic()
        # Answer to the ranks' watchdogs; the id tells a rank whose group this executor is.
        self.instance = uuid.uuid4().hex[:12]
        self._alive = encode({"kind": "alive", "engine": self.instance})
        self._ray: Any = None  # engine.parallel.ray_backend.RayRanks with that backend
        # Called with each progress message a worker sends while a command runs.
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        self.died = asyncio.Event()  # set once the worker exited or missed a deadline

    @property
    def alive(self) -> bool:
        return (self._dead is None and bool(self._procs or self.parallel.remote_ranks)
                and all(p.poll() is None for p in self._procs.values()))

    @property
    def pids(self) -> dict[int, int]:
        """Rank -> pid of every rank that said hello (local and remote)."""
        return {r: int(h["pid"]) for r, h in self._hello.items()}

    async def start(self, init: dict[str, Any]) -> dict[str, Any]:
        """Start the local ranks, wait for every rank to connect, initialise them all and
        agree on the KV pool size (the smallest any rank can hold). Returns the driver's
        ``ready`` reply, with the agreed sizes and the summed per-block bytes."""
        pcfg = self.parallel
        self._all_hello = asyncio.Event()
        local = [r for r in range(self.world_size) if r not in pcfg.remote_ranks]
        env = dict(os.environ)
        if self.world_size > 1 and not pcfg.remote_ranks and sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks here: keep gloo on loopback
        level = logging.getLevelName(logging.getLogger("fastserve").getEffectiveLevel())
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        dist_host, dist_port = pcfg.dist_host, pcfg.dist_port
        if pcfg.distributed_executor_backend == "ray":
            dist_host, dist_port = await self._start_ray_ranks(init, level)
        for rank in local if pcfg.distributed_executor_backend == "mp" else ():
            cmd = [sys.executable, "-m", "engine.parallel.worker", "--engine", self.address,
                   "--rank", str(rank), "--parent-pid", str(os.getpid()), "--log-level", level,
                   "--log-format", current_format()]
            self._procs[rank] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)  # noqa: ASYNC220 -- fork+exec, no wait
        await asyncio.wait((asyncio.ensure_future(self._all_hello.wait()),), timeout=self.startup_timeout_s)
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        if not self._all_hello.is_set():
            missing = sorted(set(range(self.world_size)) - set(self._hello))
            self._fail_all(f"ranks {missing} did not connect to {self.address} within {self.startup_timeout_s:.0f} s")
            raise WorkerDiedError(self._dead)
        parallel = dict(init.get("parallel") or {})
        if self.world_size > 1 and not parallel.get("torch_threads"):
            parallel["torch_threads"] = max(1, (os.cpu_count() or 1) // max(1, len(local)))
        dist = {"host": dist_host, "port": dist_port or _free_port(dist_host)}
        readies = await self.call_all("init", timeout=self.startup_timeout_s,
                                      **{**init, "parallel": parallel, "dist": dist})
        n_gpu = min(r["num_gpu_blocks"] for r in readies.values())
        n_host = min(r["num_host_blocks"] for r in readies.values())
        if any((r["num_gpu_blocks"], r["num_host_blocks"]) != (n_gpu, n_host) for r in readies.values()):
            await self.call_all("resize_cache", timeout=self.startup_timeout_s,
                                num_gpu_blocks=n_gpu, num_host_blocks=n_host)
        ready = dict(readies[self.driver])
        ready.update(num_gpu_blocks=n_gpu, num_host_blocks=n_host,
                     block_bytes=sum(r["block_bytes"] for r in readies.values()),
                     ranks={r: {k: v[k] for k in ("pid", "device", "block_bytes")} for r, v in readies.items()})
        return ready

    async def _start_ray_ranks(self, init: dict[str, Any], level: str) -> tuple[str, int]:
        """Start every rank as a Ray actor (``engine.parallel.ray_backend``); returns the
        rendezvous store's host and port (on rank 0's node when the ranks span several)."""
        from engine.parallel.ray_backend import RayRanks

        pcfg = self.parallel
        device = str((init.get("model") or {}).get("device", "auto"))
        self._ray = RayRanks(pcfg, self.startup_timeout_s)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._ray.connect, device)
        use_gpu = await loop.run_in_executor(None, self._ray.uses_gpu, device)
        ips = await loop.run_in_executor(None, self._ray.place, use_gpu)
        dist_host, dist_port, env = pcfg.dist_host, pcfg.dist_port, {}
        if len(set(ips)) > 1:
            if self.address.startswith("ipc://") or "127.0.0.1" in self.address:
                raise WorkerDiedError(
                    f"Ray placed the ranks on several nodes ({sorted(set(ips))}); bind the control "
                    "socket where they can reach it (--engine-address tcp://THIS_HOST_IP:PORT)")
            if dist_host in ("127.0.0.1", "localhost"):
                dist_host = ips[0]  # rank 0 hosts the store, on its own node
                if not dist_port:
                    dist_port = await loop.run_in_executor(None, self._ray.free_port, 0)
        elif self.world_size > 1 and sys.platform.startswith("linux") and dist_host == "127.0.0.1":
            env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
        self._procs = dict(await loop.run_in_executor(
            None, self._ray.run, self.address, env, level, current_format()))
        log.info("started %d ranks as Ray actors on %s", self.world_size, ", ".join(sorted(set(ips))))
        return dist_host, dist_port

    async def submit(self, kind: str, timeout: float | None = None, **fields: Any) -> Awaitable[dict[str, Any]]:
        """Send a command to every rank now; the returned awaitable gives the driver's reply
        once every rank that answers ``kind`` has answered."""
        call_id = await self._send(kind, timeout, fields)
        return self._driver_reply(call_id)

    async def _driver_reply(self, call_id: int) -> dict[str, Any]:
        return (await self._wait(call_id))[self.driver]

    async def _send(self, kind: str, timeout: float | None, fields: dict[str, Any]) -> int:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        call_id = next(self._calls)
        expect = {self.driver} if kind in DRIVER_ONLY else set(range(self.world_size))
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        limit = timeout or self.step_timeout_s
        self._pending[call_id] = _Call(kind, time.monotonic() + limit, expect, fut)
        frames = encode({"kind": kind, "call": call_id, **fields})  # once, for every rank
        try:
            async with self._send_lock:  # whole commands, one after another, to every rank
                for rank in range(self.world_size):
                    await self._sock.send_multipart([rank_identity(rank), *frames], copy=False)
                self._last_send = time.monotonic()
        except zmq.ZMQError as e:
            self._fail_all(f"cannot send {kind!r} to a worker: {e}")
        return call_id

    async def _wait(self, call_id: int) -> dict[int, dict]:
        call = self._pending.get(call_id)
        if call is None:
            raise WorkerDiedError(self._dead or "call lost")
        try:
            return await call.future
        finally:
            self._pending.pop(call_id, None)

    async def call_all(self, kind: str, timeout: float | None = None, **fields: Any) -> dict[int, dict]:
        """One command, every rank; every answer by rank (only the driver's for steps)."""
        return await self._wait(await self._send(kind, timeout, fields))

    async def call(self, kind: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """One command, every rank; the driver's reply."""
        return await (await self.submit(kind, timeout=timeout, **fields))

    async def _read_loop(self) -> None:
        while self._dead is None:
            if await self._sock.poll(200):
                frames = await self._sock.recv_multipart(copy=False)
                if frames[0].bytes.startswith(WATCH_PREFIX):
                    await self._answer_watch(frames[0].bytes)
                    continue
                try:
                    msg = decode(frames[1:])
                except ProtocolError as e:
                    log.error("bad message from a worker: %s", e)
                    continue
                self._on_message(msg)
                continue
            for rank, proc in self._procs.items():
                if proc.poll() is not None:
                    if self._stopping:  # it obeyed our `shutdown`: not a failure to report
                        return
                    self._fail_all(f"worker rank {rank} exited with code {proc.returncode}")
                    return
            now = time.monotonic()
            if self.parallel.remote_ranks and self._all_hello is not None and self._all_hello.is_set() \
                    and now - self._last_send > self.parallel.heartbeat_s:
                await self._ping()
            for call in self._pending.values():
                if now > call.deadline and not call.future.done():
                    missing = sorted(call.expect - set(call.replies))
                    self._fail_all(f"worker ranks {missing} did not answer {call.kind!r} in time")
                    return

    async def _answer_watch(self, identity: bytes) -> None:
        """A rank's watchdog asks whether its engine lives (worker.Watchdog)."""
        async with self._send_lock:
            with contextlib.suppress(zmq.ZMQError):
                await self._sock.send_multipart([identity, *self._alive], copy=False)

    async def _ping(self) -> None:
        """Tell remote ranks the engine is alive (they exit after a silence of --idle-exit)."""
        ping = encode({"kind": "ping", "call": 0})
        async with self._send_lock:
            for rank in self.parallel.remote_ranks:
                with contextlib.suppress(zmq.ZMQError):
                    await self._sock.send_multipart([rank_identity(rank), *ping])
            self._last_send = time.monotonic()

    def _on_message(self, msg: dict) -> None:
        rank = msg.get("rank")
        if msg["kind"] == "progress":  # a rank loading or profiling: for the start-up report
            if self.on_progress is not None:
                self.on_progress(msg)
            return
        if msg["kind"] == "hello":
            if isinstance(rank, int) and 0 <= rank < self.world_size:
                self._hello[rank] = msg
                if len(self._hello) == self.world_size and self._all_hello is not None:
                    self._all_hello.set()
            return
        call = self._pending.get(msg.get("call"))  # type: ignore[arg-type]
        if msg["kind"] == "error":
            error = WorkerError(msg.get("message", "worker error"), msg.get("type", ""))
            if self.world_size > 1:
                # Its peers may be stuck in a collective or a stage transfer: nothing more
                # can run. Report the original error to the caller that caused it.
                if call is not None and not call.future.done():
                    call.future.set_exception(error)
                self._fail_all(f"worker rank {rank} failed: {error}")
            elif call is not None and not call.future.done():
                call.future.set_exception(error)
            return
        if call is None or call.future.done():
            return
        call.replies[rank] = msg  # type: ignore[index]
        if call.expect <= set(call.replies):
            call.future.set_result(call.replies)

    def _fail_all(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
            log.error("%s", why)
        self.died.set()
        if self._all_hello is not None:
            self._all_hello.set()
        for call in self._pending.values():
            if not call.future.done():
                call.future.set_exception(WorkerDiedError(why))

    async def shutdown(self, timeout: float = 10.0) -> None:
        healthy = self._dead is None
        self._stopping = True
        if healthy and self._procs:
            with contextlib.suppress(WorkerDiedError, WorkerError):
                await self.call_all("shutdown", timeout=timeout)
        else:
            # Ranks still alive after a failure may be stuck in a collective: say goodbye
            # (remote ranks leave on it) without waiting; local ones are killed at once.
            bye = encode({"kind": "shutdown", "call": 0})
            for rank in range(self.world_size):
                with contextlib.suppress(zmq.ZMQError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._sock.send_multipart([rank_identity(rank), *bye]), 0.2)
        if self._dead is None:
            self._dead = "executor shut down"
        self._fail_all(self._dead)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        procs = list(self._procs.values())
        loop = asyncio.get_running_loop()
        if procs:
            # A group that failed (a rank died, missed a deadline, or hangs) gets no grace period.
            await loop.run_in_executor(None, _reap, procs, timeout if healthy else 0)
        if self._ray is not None:
            await loop.run_in_executor(None, self._ray.stop)
        self._sock.close()
        self._ctx.term()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _reap(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _free_port(host: str) -> int:
    """A port free right now on ``host`` (for the rendezvous store rank 0 will host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
