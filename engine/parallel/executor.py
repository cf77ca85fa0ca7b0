"""Engine side of the worker protocol: start worker processes and call them.

One way to call a worker: ``await executor.call(kind, **fields)``. Replies are matched to
calls by id; a reply that does not come within the deadline, or a worker process that
exits, fails every pending call with :class:`WorkerDiedError` instead of hanging it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from engine.logs import current_format
from engine.parallel.protocol import ProtocolError, decode, encode

log = logging.getLogger("fastserve.executor")


class WorkerError(RuntimeError):
    """A worker answered a command with an error; ``type`` is the exception's class name."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if type_name else message)
        self.type = type_name
        self.detail = message


class WorkerDiedError(RuntimeError):
    """A worker process exited or stopped answering."""


class WorkerExecutor:
    """Owns one worker process (a pipeline of one stage, tensor-parallel size one)."""

    def __init__(self, step_timeout_s: float = 120.0, startup_timeout_s: float = 300.0) -> None:
        self.step_timeout_s = step_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._ctx = zmq.asyncio.Context()
        self._dir = tempfile.mkdtemp(prefix="fastserve-")
        self.cmd_addr = f"ipc://{self._dir}/cmd"
        self.result_addr = f"ipc://{self._dir}/result"
        self._cmd = self._ctx.socket(zmq.PUSH)
        self._cmd.setsockopt(zmq.LINGER, 0)
        self._cmd.bind(self.cmd_addr)
        self._res = self._ctx.socket(zmq.PULL)
        self._res.setsockopt(zmq.LINGER, 0)
        self._res.bind(self.result_addr)
        self._calls = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._proc: subprocess.Popen | None = None
        self._reader: asyncio.Task | None = None
        self._dead: str | None = None
        # Called with each progress message a worker sends while a command runs.
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        self.died = asyncio.Event()  # set once the worker exited or missed a deadline

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc is not None and self._proc.poll() is None

    async def start(self, init: dict[str, Any]) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "engine.parallel.worker", "--cmd", self.cmd_addr,
               "--result", self.result_addr, "--parent-pid", str(os.getpid()),
               "--log-level", logging.getLevelName(logging.getLogger("fastserve").getEffectiveLevel()),
               "--log-format", current_format()]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)  # noqa: ASYNC220 -- fork+exec, no wait
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return await self.call("init", timeout=self.startup_timeout_s, **init)

    async def call(self, kind: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        call_id = next(self._calls)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        limit = timeout or self.step_timeout_s
        try:
            await self._cmd.send_multipart(encode({"kind": kind, "call": call_id, **fields}), copy=False)
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that races with the reply (CPython gh-86296), and then an actor never stops.
            await asyncio.wait((fut,), timeout=limit)
            if not fut.done():
                self._fail_all(f"worker did not answer {kind!r} within {limit:.0f} s")
                fut.exception()  # the failure _fail_all set: retrieved, raised below
                raise WorkerDiedError(self._dead)
            reply = fut.result()
        finally:
            self._pending.pop(call_id, None)
        if reply["kind"] == "error":
            raise WorkerError(reply.get("message", "worker error"), reply.get("type", ""))
        return reply

    async def _read_loop(self) -> None:
        while self._dead is None:
            if await self._res.poll(500):
                try:
                    msg = decode(await self._res.recv_multipart(copy=False))
                except ProtocolError as e:
                    log.error("bad message from worker: %s", e)
                    continue
                if msg.get("kind") == "progress":
                    if self.on_progress is not None:
                        self.on_progress(msg)
                    continue
                fut = self._pending.get(msg.get("call"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif self._proc is not None and self._proc.poll() is not None:
                self._fail_all(f"worker process exited with code {self._proc.returncode}")

    def _fail_all(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
            log.error("%s", why)
        self.died.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(WorkerDiedError(why))

    async def shutdown(self, timeout: float = 10.0) -> None:
        proc = self._proc
        healthy = self._dead is None
        if proc is not None and proc.poll() is None and healthy:
            try:
                await self.call("shutdown", timeout=timeout)
            except (WorkerDiedError, WorkerError):
                pass
        if self._dead is None:
            self._dead = "executor shut down"
        self._fail_all(self._dead)
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        if proc is not None:
            # A worker that failed (missed a deadline, or hangs) gets no grace period.
            await asyncio.get_running_loop().run_in_executor(None, _reap, proc, timeout if healthy else 0)
        self._cmd.close()
        self._res.close()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def _reap(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
