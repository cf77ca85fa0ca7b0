"""Worker process main: one per device. Connects to the engine, runs what it is told.

Started as ``python -m engine.parallel.worker --cmd ADDR --result ADDR`` (or
``fastserve worker``). The engine binds both sockets; the worker connects, so the same
command works on another node with ``tcp://`` addresses. A worker whose engine goes away
(parent gone, or no command for ``--idle-exit`` seconds when remote) exits by itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from engine.logs import LOG_FORMATS, setup_logging
from engine.parallel.protocol import PROTOCOL_VERSION, decode, encode

log = logging.getLogger("fastserve.worker")

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


class Worker:
    def __init__(self) -> None:
        self.runner: Any = None
        self.max_model_len: int | None = None
        # progress(stage, done, total): reported to the engine while a long command runs
        # (model loading, profiling); set per command by serve().
        self.progress: Callable[[str, int, int], None] = _no_progress

    def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        kind = msg["kind"]
        if kind == "step":
            return self.runner.step(msg)
        if kind == "init":
            return self.init(msg)
        if kind == "health":
            return {"kind": "healthy", "pid": os.getpid()}
        if kind == "profile":
            from engine.parallel.profile import profile_runner

            args = msg.get("args", {})
            return {"kind": "profiled",
                    **profile_runner(self.runner, **args, progress=self._profile_progress,
                                     max_len=self.max_model_len)}
        if kind == "shutdown":
            return {"kind": "bye"}
        raise ValueError(f"unknown command kind {kind!r}")

    def _profile_progress(self, done: int, total: int) -> None:
        self.progress("profile", done, total)

    def init(self, msg: dict[str, Any]) -> dict[str, Any]:
        import torch

        from engine.memory.kv_cache import KVCachePool, block_bytes
        from engine.models.loader import count_tensors, load_model
        from engine.parallel.runner import ModelRunner

        if msg.get("version") != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {msg.get('version')} != {PROTOCOL_VERSION}")
        mcfg, ccfg, pcfg = msg["model"], msg["cache"], msg["parallel"]
        if pcfg.get("torch_threads"):
            torch.set_num_threads(int(pcfg["torch_threads"]))
        torch.manual_seed(int(mcfg.get("seed", 0)))
        device = resolve_device(mcfg.get("device", "auto"))
        dtype = resolve_dtype(mcfg.get("dtype", "auto"), device)
        path = mcfg.get("path")
        stage = "load" if not str(path).endswith(".gguf") else "load+dequantize"
        total = count_tensors(path)
        loaded = iter(range(1, total + 1))
        self.progress(stage, 0, total)
        model, info = load_model(path, dtype, device,
                                 on_tensor=lambda _name: self.progress(stage, next(loaded), total))
        model.eval()
        self.max_model_len = info.max_model_len
        bs = int(ccfg["block_size"])
        per_block = block_bytes(info.num_layers, bs, info.num_kv_heads, info.head_dim, dtype)
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
        geometry = (info.num_layers, bs, info.num_kv_heads, info.head_dim, dtype)
        gpu_pool = KVCachePool(info.num_layers, n_gpu, bs, info.num_kv_heads, info.head_dim, dtype, device)
        host_pool = None
        if n_host > 0:
            host_pool = KVCachePool(
                *geometry[:1], n_host, *geometry[1:], torch.device("cpu"), pin_memory=device.type == "cuda"
            )
        self.runner = ModelRunner(model, gpu_pool, host_pool, bs, device)
        return {
            "kind": "ready",
            "pid": os.getpid(),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "num_gpu_blocks": n_gpu,
            "num_host_blocks": n_host,
            "block_bytes": per_block,
            "device_name": device_name(device),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "num_params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.__dict__.items()},
        }


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(_DTYPES.values()))}")
    return getattr(torch, _DTYPES[name])


def serve(cmd_addr: str, result_addr: str, parent_pid: int | None, idle_exit_s: float | None) -> int:
    ctx = zmq.Context()
    cmd = ctx.socket(zmq.PULL)
    cmd.setsockopt(zmq.LINGER, 0)
    cmd.connect(cmd_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(result_addr)
    worker = Worker()
    last_msg = time.monotonic()
    try:
        while True:
            if not cmd.poll(1000):
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.warning("engine process is gone; worker exits")
                    return 1
                if idle_exit_s is not None and time.monotonic() - last_msg > idle_exit_s:
                    log.warning("no command for %.0f s; worker exits", idle_exit_s)
                    return 1
                continue
            last_msg = time.monotonic()
            call = None
            try:
                msg = decode(cmd.recv_multipart(copy=False))
                call = msg.get("call")
                worker.progress = _reporter(out, call)
                reply = worker.handle(msg)
            except Exception as e:  # noqa: BLE001 -- reported to the engine, which fails the owning requests
                log.error("command failed: %s", traceback.format_exc())
                reply = {"kind": "error", "type": type(e).__name__, "message": str(e)}
            if reply is not None:
                reply["call"] = call
                out.send_multipart(encode(reply), copy=False)
                if reply["kind"] == "bye":
                    return 0
    finally:
        cmd.close()
        out.close()
        ctx.term()


def _reporter(out: Any, call: Any) -> Callable[[str, int, int], None]:
    """Progress of command ``call`` over the result channel, at most ~10 messages/s."""
    last = [0.0]

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done not in (0, total) and now - last[0] < 0.1:
            return
        last[0] = now
        msg = {"kind": "progress", "call": call, "stage": stage, "done": done, "total": total}
        out.send_multipart(encode(msg), copy=False)

    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastserve worker", description="Run one FastServe worker process.")
    p.add_argument("--cmd", required=True, help="engine's command address (engine binds, worker connects)")
    p.add_argument("--result", required=True, help="engine's result address")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer our parent")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many seconds without a command")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS)
    args = p.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return serve(args.cmd, args.result, args.parent_pid, args.idle_exit)


if __name__ == "__main__":
    sys.exit(main())
