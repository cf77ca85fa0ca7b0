"""Worker process main: one per device. Connects to the engine, runs what it is told.

Started as ``python -m engine.parallel.worker --engine ADDR --rank R`` (or
``fastserve worker``). The engine binds its control socket; the worker connects, so the same
command works on another node with a ``tcp://`` address. A worker whose engine goes away
exits by itself, even in the middle of a command (:class:`Watchdog`: parent gone, or the
engine silent for ``--watchdog-timeout`` seconds when remote), or when idle for
``--idle-exit`` seconds without a command (remote).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from engine.config import ParallelConfig
from engine.logs import LOG_FORMATS, setup_logging
from engine.parallel.protocol import PROTOCOL_VERSION, ProtocolError, decode, encode

log = logging.getLogger("fastserve.worker")

IPC_DIR_PREFIX = "fastserve-"  # the executor's private directory for its ipc:// socket
DEFAULT_WATCHDOG_TIMEOUT_S = ParallelConfig.watchdog_timeout_s

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


class Worker:
    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.runner: Any = None
        self.dist: Any = None  # engine.parallel.distributed.Distributed once initialised
        self.moved_blocks = 0  # KV blocks this rank copied for swap plans (all kinds)
        self.step_s = 0.0  # time spent running steps (benchmarks: per-stage busy time)
        self.num_steps = 0
        self.max_model_len: int | None = None
        self.full_threads = 1  # intra-op threads of an ordinary step; set by init
        self.small_step_rows = 0  # ParallelConfig.small_step_rows as resolved for this rank
        self.small_steps = 0  # steps run on one thread (the engine marked them one_thread)
        # progress(stage, done, total): reported to the engine while a long command runs
        # (model loading, profiling); set per command by serve().
        self.progress: Callable[[str, int, int], None] = _no_progress

    @property
    def replies_to_steps(self) -> bool:
        """Only the driver (last stage, TP rank 0) answers steps and profiles."""
        return self.dist is None or self.dist.layout.is_driver

    def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        kind = msg["kind"]
        if kind == "step":
            self.moved_blocks += sum(len(msg.get(k) or ()) for k in ("swap_out", "swap_in", "offload", "prefetch"))
            if self.small_step_rows:
                self._set_threads(msg)
            t0 = time.perf_counter()
            reply = self.runner.step(msg)
            self.step_s += time.perf_counter() - t0
            self.num_steps += 1
            return reply if self.replies_to_steps else None
        if kind == "init":
            return self.init(msg)
        if kind == "ping":  # the engine's heartbeat to remote ranks: nothing to answer
            return None
        if kind == "resize_cache":
            return self.allocate(int(msg["num_gpu_blocks"]), int(msg["num_host_blocks"]))
        if kind == "health":
            return {"kind": "healthy", "pid": os.getpid(), "rank": self.rank, "moved_blocks": self.moved_blocks,
                    "step_s": self.step_s, "num_steps": self.num_steps,
                    "small_steps": self.small_steps,
                    "wait_s": self.dist.wait_s if self.dist is not None else 0.0}
        if kind == "profile":
            from engine.parallel.profile import profile_runner

            args = msg.get("args", {})
            result = {"kind": "profiled",
                      **profile_runner(self.runner, **args, progress=self._profile_progress,
                                       max_len=self.max_model_len)}
            return result if self.replies_to_steps else None
        if kind == "shutdown":
            if self.dist is not None:
                self.dist.close()
            return {"kind": "bye"}
        raise ValueError(f"unknown command kind {kind!r}")

    def _profile_progress(self, done: int, total: int) -> None:
        self.progress("profile", done, total)

    def _set_threads(self, msg: dict[str, Any]) -> None:
        """One intra-op thread for a step the engine overlaps because it is small (it marks
        it ``one_thread``), all of them otherwise (``small_step_rows``)."""
        import torch

        small = bool(msg.get("one_thread"))
        self.small_steps += small
        want = 1 if small else self.full_threads
        if want != torch.get_num_threads():
            torch.set_num_threads(want)

    def init(self, msg: dict[str, Any]) -> dict[str, Any]:
        set_omp_wait_policy(msg["parallel"].get("omp_wait_policy"))
        import torch

        from engine.memory.kv_cache import block_bytes
        from engine.models.base import PipelineStage
        from engine.models.linear import SINGLE_DEVICE, TPInfo
        from engine.models.loader import (
            count_tensors,
            load_hf_config,
            load_model,
            resolve_model_path,
        )
        from engine.parallel.cpu import physical_cores
        from engine.parallel.distributed import Distributed, RankLayout

        if msg.get("version") != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {msg.get('version')} != {PROTOCOL_VERSION}")
        mcfg, ccfg, pcfg = msg["model"], msg["cache"], msg["parallel"]
        self._cache_cfg = ccfg
        layout = RankLayout(self.rank, int(pcfg.get("tensor_parallel_size", 1)),
                            int(pcfg.get("pipeline_parallel_size", 1)))
        # Intra-op threads: one per physical core unless told otherwise (the executor gives
        # each of several local ranks its share).
        torch.set_num_threads(int(pcfg.get("torch_threads") or physical_cores()))
        torch.manual_seed(int(mcfg.get("seed", 0)))
        device = resolve_device(mcfg.get("device", "auto"), layout)
        self.full_threads = torch.get_num_threads()
        self.small_step_rows = small_step_rows(pcfg.get("small_step_rows"), device,
                                               layout.world_size, self.full_threads)
        dtype = resolve_dtype(mcfg.get("dtype", "auto"), device)
        stage = None
        if layout.pp_size > 1:
            num_layers = int(load_hf_config(resolve_model_path(mcfg.get("path")))["num_hidden_layers"])
            stage = PipelineStage.split(num_layers, layout.pp_size, layout.stage)
        if layout.world_size > 1:
            dist_cfg = msg["dist"]
            self.dist = Distributed(layout, device, pcfg.get("dist_backend", "auto"), dist_cfg["host"],
                                    int(dist_cfg["port"]), float(pcfg.get("step_timeout_s", 120.0)),
                                    float(pcfg.get("startup_timeout_s", 300.0)))
            self.dist.dtype = dtype
        tp = SINGLE_DEVICE
        if layout.tp_size > 1:
            tp = TPInfo(layout.tp_rank, layout.tp_size, self.dist.tp_group)
        path = mcfg.get("path")
        what = "load" if not str(path).endswith(".gguf") else "load+dequantize"
        total = count_tensors(path)  # a pipeline stage reads fewer: the bar ends early
        loaded = iter(range(1, total + 1))
        self.progress(what, 0, total)
        model, info = load_model(path, dtype, device, tp,
                                 quantization=mcfg.get("quantization", "auto"), stage=stage,
                                 on_tensor=lambda _name: self.progress(what, next(loaded), total))
        model.eval()
        self.max_model_len = info.max_model_len
        self._model, self._device, self._dtype = model, device, dtype
        bs = int(ccfg["block_size"])
        # This rank's share of a block: its stage's layers, its KV heads.
        self._geometry = (model.stage.num_layers, bs, model.num_kv_heads, info.head_dim)
        per_block = block_bytes(*self._geometry, dtype)
        if ccfg.get("num_gpu_blocks_override"):
            n_gpu = int(ccfg["num_gpu_blocks_override"])
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            n_gpu = int(free * float(ccfg["gpu_memory_utilization"]) // per_block)
        else:
            n_gpu = int(ccfg["kv_cache_memory"]) // per_block
        n_host = ccfg.get("num_host_blocks_override")
        n_host = int(n_host) if n_host is not None else int(ccfg["host_kv_cache_memory"]) // per_block
        if n_gpu <= 0:
            raise ValueError(f"KV budget too small for one block of {per_block} bytes")
        self.allocate(n_gpu, n_host)
        return {
            "kind": "ready",
            "pid": os.getpid(),
            "rank": self.rank,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "num_gpu_blocks": n_gpu,
            "num_host_blocks": n_host,
            "block_bytes": per_block,
            "device_name": device_name(device),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "small_step_rows": self.small_step_rows,
            "num_params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.__dict__.items()},
        }

    def allocate(self, n_gpu: int, n_host: int) -> dict[str, Any]:
        """(Re)build this rank's KV pools: the engine sizes every rank to the smallest."""
        import torch

        from engine.memory.kv_cache import KVCachePool
        from engine.parallel.runner import ModelRunner

        if self.runner is not None and self.runner.jobs:
            raise RuntimeError("cannot resize the KV cache while jobs hold blocks")
        self.runner = None  # drop the old pools before allocating new ones
        layers, bs, heads, head_dim = self._geometry
        device, dtype = self._device, self._dtype
        gpu_pool = KVCachePool(layers, n_gpu, bs, heads, head_dim, dtype, device)
        host_pool = None
        if n_host > 0:
            host_pool = KVCachePool(layers, n_host, bs, heads, head_dim, dtype, torch.device("cpu"),
                                    pin_memory=device.type == "cuda")
        self.runner = ModelRunner(self._model, gpu_pool, host_pool, bs, device)
        self.runner.dist = self.dist
        return {"kind": "resized", "rank": self.rank, "num_gpu_blocks": n_gpu, "num_host_blocks": n_host}


SMALL_STEP_ROWS = 4  # the default where small steps are on; see ParallelConfig.small_step_rows


def small_step_rows(configured: int | None, device: Any, world_size: int, threads: int) -> int:
    """``ParallelConfig.small_step_rows`` resolved for one rank: 0 (off) on CUDA and with one
    thread; None (auto) is on for a single CPU rank whose threads fill the physical cores."""
    from engine.parallel.cpu import physical_cores

    if device.type != "cpu" or threads <= 1:
        return 0
    if configured is not None:
        return int(configured)
    return SMALL_STEP_ROWS if world_size == 1 and threads >= physical_cores() else 0


def set_omp_wait_policy(policy: str | None) -> None:
    """libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it: set it before that."""
    if policy is None:
        return
    if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").lower() != policy:
        log.warning("torch is already loaded: OpenMP wait policy %r not applied", policy)
        return
    os.environ["OMP_WAIT_POLICY"] = policy.upper()


def resolve_device(name: str, layout: Any = None) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and layout is not None and layout.world_size > 1:
        device = torch.device("cuda", layout.rank % torch.cuda.device_count())  # one GPU per rank
    return device


def device_name(device: Any) -> str:
    """What the device is, for cache keys and the banner: the GPU model, or the CPU's."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        from engine.parallel.cpu import auto_dtype

        return auto_dtype(device)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(_DTYPES.values()))}")
    return getattr(torch, _DTYPES[name])


# Exit status of a rank its watchdog ended (the engine went away while it ran).
WATCHDOG_EXIT_CODE = 3
# Routing ids of watchdog connections start with this (rank connections: rank_identity).
WATCH_PREFIX = b"watch-"


class Watchdog:
    """Ends this process when its engine is gone, even while the main thread is stuck: an
    NCCL collective whose peer died never returns, gloo's only after its timeout, and a rank
    on another host cannot be killed by the engine.

    A thread with its own socket to the engine's control address says ``watch`` every
    ``interval_s``; the engine's reader answers ``alive`` with its executor's instance id.
    The process exits (``os._exit``: no cleanup can be trusted while the main thread hangs;
    a rank has no children) with ``WATCHDOG_EXIT_CODE`` when

    - ``parent_pid`` is given and is no longer this process's parent (a local rank), or
    - ``timeout_s`` is given, the engine has answered once, and then not for ``timeout_s``,
      or answers with another instance id (a new worker group on the same address: this
      rank's group is over).
    """

    def __init__(
        self,
        address: str,
        rank: int,
        parent_pid: int | None,
        timeout_s: float | None,
        interval_s: float | None = None,
    ) -> None:
        self.address, self.rank, self.parent_pid, self.timeout_s = address, rank, parent_pid, timeout_s
        self.interval_s = interval_s or (min(1.0, timeout_s / 5) if timeout_s else 1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-rank-{rank}", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        if not self.timeout_s:  # a local rank: its parent is all there is to watch
            while not self._stop.wait(self.interval_s):
                self._check_parent()
            return
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queued for an engine not (yet) there
        sock.setsockopt(zmq.IDENTITY, WATCH_PREFIX + f"{self.rank}-{os.getpid()}".encode())
        sock.connect(self.address)
        instance: str | None = None
        last_answer = time.monotonic()
        ask = encode({"kind": "watch", "rank": self.rank, "pid": os.getpid()})
        try:
            while not self._stop.is_set():
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart(ask, flags=zmq.NOBLOCK)
                deadline = time.monotonic() + self.interval_s
                while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                    if not sock.poll(int(left * 1000) + 1):
                        continue
                    try:
                        msg = decode(sock.recv_multipart(copy=False))
                    except ProtocolError as e:
                        log.warning("rank %d: bad watchdog answer ignored: %s", self.rank, e)
                        continue
                    seen = str(msg.get("engine", ""))
                    if instance is not None and seen != instance:
                        self._exit(f"a different worker group now answers at {self.address}")
                    instance, last_answer = seen, time.monotonic()
                if self._stop.is_set():
                    return
                self._check_parent()
                silent = time.monotonic() - last_answer
                if self.timeout_s and instance is not None and silent > self.timeout_s:
                    self._exit(f"engine at {self.address} has not answered for {silent:.1f} s")
        finally:
            sock.close(0)
            ctx.term()

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            # Whichever notices first (this thread or the idle main loop) cleans up what
            # the dead engine cannot: its private socket directory.
            remove_orphaned_socket_dir(self.address)
            self._exit(f"engine process {self.parent_pid} is gone")

    def _exit(self, why: str) -> None:
        log.error("rank %d: %s; watchdog ends worker pid %d", self.rank, why, os.getpid())
        for handler in logging.getLogger().handlers + log.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(WATCHDOG_EXIT_CODE)


def serve(
    engine_addr: str,
    rank: int,
    parent_pid: int | None,
    idle_exit_s: float | None,
    watchdog_timeout_s: float | None = None,
) -> int:
    """Connect to the engine's control socket as ``rank`` and run commands until shutdown.

    Every rank receives every command, in order, on its own connection (the engine's ROUTER
    addresses each rank by its routing id), so the delta-encoded plans stay consistent.
    A :class:`Watchdog` ends the process if the engine goes away while a command hangs.
    """
    watchdog = Watchdog(engine_addr, rank, parent_pid, watchdog_timeout_s).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.IDENTITY, rank_identity(rank))
    sock.connect(engine_addr)
    # The engine learns the connection from this first message; it sends nothing before.
    sock.send_multipart(encode({"kind": "hello", "rank": rank, "pid": os.getpid()}), copy=False)
    worker = Worker(rank)
    last_msg = time.monotonic()
    try:
        while True:
            if not sock.poll(1000):
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.warning("engine process is gone; worker exits")
                    remove_orphaned_socket_dir(engine_addr)
                    return 1
                if idle_exit_s is not None and time.monotonic() - last_msg > idle_exit_s:
                    log.warning("no command for %.0f s; worker exits", idle_exit_s)
                    return 1
                continue
            last_msg = time.monotonic()
            call = None
            try:
                msg = decode(sock.recv_multipart(copy=False))
                call = msg.get("call")
                worker.progress = _reporter(sock, call, rank)
                reply = worker.handle(msg)
            except Exception as e:  # noqa: BLE001 -- reported to the engine, which fails the owning requests
                log.error("rank %d: command failed: %s", rank, traceback.format_exc())
                reply = {"kind": "error", "type": type(e).__name__, "message": str(e)}
            if reply is not None:
                reply["call"] = call
                reply["rank"] = rank
                sock.send_multipart(encode(reply), copy=False)
                if reply["kind"] == "bye":
                    return 0
    finally:
        watchdog.stop()
        sock.close()
        ctx.term()


def remove_orphaned_socket_dir(engine_addr: str) -> None:
    """The engine died without its shutdown (SIGKILL): remove the private directory its
    ``ipc://`` control socket lives in, which nobody else would clean up. Only a directory
    the executor made for itself (``fastserve-*`` holding nothing but the socket); every
    rank may try, the first one wins."""
    if not engine_addr.startswith("ipc://"):
        return
    path = engine_addr.removeprefix("ipc://")
    directory = os.path.dirname(path)
    if not os.path.basename(directory).startswith(IPC_DIR_PREFIX):
        return
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        os.rmdir(directory)  # only if empty: never a tree someone else owns
    except OSError:
        pass


def rank_identity(rank: int) -> bytes:
    """The ZeroMQ routing id a rank connects with."""
    return f"rank-{rank}".encode()


def _reporter(out: Any, call: Any, rank: int) -> Callable[[str, int, int], None]:
    """Progress of command ``call`` over the result channel, at most ~10 messages/s."""
    last = [0.0]

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done not in (0, total) and now - last[0] < 0.1:
            return
        last[0] = now
        msg = {"kind": "progress", "call": call, "rank": rank, "stage": stage, "done": done,
               "total": total}
        out.send_multipart(encode(msg), copy=False)

    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastserve worker", description="Run one FastServe worker process.")
    p.add_argument("--engine", required=True,
                   help="the engine's control address (engine binds, workers connect), e.g. tcp://HOST:PORT")
    p.add_argument("--rank", type=int, default=0, help="this worker's rank (stage * tp + tp rank)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer our parent")
    p.add_argument("--idle-exit", type=float, default=None,
                   help="exit after this many seconds without a message from the engine (default: 60 "
                        "without --parent-pid; the engine pings remote ranks every few seconds)")
    p.add_argument("--watchdog-timeout", type=float, default=None,
                   help="exit when the engine, once seen, has not answered this rank's watchdog for "
                        "this many seconds, even in the middle of a command (default: 10 without "
                        "--parent-pid; 0 disables it)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS)
    args = p.parse_args(argv)
    if args.parent_pid is not None:
        # Ctrl-C in a terminal signals the whole foreground process group: the engine
        # (our parent) stops us in order -- drain, then a `shutdown` command -- and a
        # worker that died of KeyboardInterrupt first would fail the requests it is
        # draining and print a traceback. A worker started by hand keeps Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(args.log_level, args.log_format)
    idle_exit = args.idle_exit if args.idle_exit is not None or args.parent_pid else 60.0
    watchdog = args.watchdog_timeout
    if watchdog is None and args.parent_pid is None:
        watchdog = DEFAULT_WATCHDOG_TIMEOUT_S
    return serve(args.engine, args.rank, args.parent_pid, idle_exit, watchdog or None)


if __name__ == "__main__":
    sys.exit(main())
