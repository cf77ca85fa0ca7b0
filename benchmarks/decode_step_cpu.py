"""Where a decode step's milliseconds go: the bundled model in one worker-side ModelRunner.

No engine, no sockets: the script loads the bundled model (``load_model(None, dtype, 'cpu')``),
builds a ``ModelRunner`` over a KV pool, prefills ``--batches`` jobs of ``--prompt-len``
random tokens, then times ``--steps`` greedy decode steps through ``ModelRunner.step`` (the
call the worker makes). Per batch size it reports:

- ms per step (median and p90 over the timed steps, after ``--warmup`` untimed ones), wall
  clock and process CPU time (all threads): on a shared machine the CPU time is the steadier
  measure of the work a step does, the wall time what a user waits;
- aten ops per step (torch.profiler): every aten event, and the top-level ones (those not
  called from inside another aten op: what Python dispatches);
- a breakdown of one step: linear layers (forward hooks on every ``*Linear`` module), paged
  attention (the whole ``paged_attention`` call: KV write, gather, SDPA), the per-forward
  plan (``AttentionPlan.build``) and rotary tables, the LM head (``compute_logits``), the
  sampler, and the rest (norms, activations, residuals, embedding, the runner's batch
  assembly and Python), in process CPU time. The hooks cost a little themselves, so the
  breakdown comes from separate steps and its total is a bit above the clean median.

The machine is shared: repeat a run and compare medians, not single numbers. Set
``OMP_WAIT_POLICY`` as the worker does (``ParallelConfig.omp_wait_policy``, passive by
default): it is read when torch loads, so it has to come from the environment here.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD .venv/bin/python benchmarks/decode_step_cpu.py \
        [--dtype float32] [--threads 2] [--batches 1,8] [--steps 32] [--prompt-len 128] \
        [--out benchmarks/results/decode_step_cpu.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.memory.kv_cache import KVCachePool
from engine.models import layers
from engine.models.loader import load_model
from engine.parallel.runner import ModelRunner

BLOCK_SIZE = 16
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "logprobs": None}


class DecodeBench:
    """Jobs prefilled once, then decoded one token per step; each call is one runner step."""

    def __init__(self, runner: ModelRunner, batch: int, prompt_len: int, max_steps: int,
                 seed: int = 0) -> None:
        self.runner, self.batch = runner, batch
        per_job = -(-(prompt_len + max_steps + 2) // BLOCK_SIZE)
        if batch * per_job > runner.gpu_pool.num_blocks:
            raise ValueError("KV pool too small for this batch; raise --kv-blocks")
        g = torch.Generator().manual_seed(seed)
        self.ids = [f"bench{batch}_{i}" for i in range(batch)]
        prompts = [torch.randint(100, 40000, (prompt_len,), generator=g).tolist() for _ in self.ids]
        tables = [list(range(i * per_job, (i + 1) * per_job)) for i in range(batch)]
        self.pos = prompt_len
        self._step = 0
        self._call(
            new=[{"id": j, "prompt": p, "params": GREEDY} for j, p in zip(self.ids, prompts)],
            seqs=[[j, 0, prompt_len, t, True, True] for j, t in zip(self.ids, tables)],
        )

    def _call(self, new: list | None = None, seqs: list | None = None,
              free: list | None = None) -> dict[str, Any]:
        self._step += 1
        return self.runner.step({"step": self._step, "free": free or [], "new": new or [],
                                 "swap_out": [], "swap_in": [], "seqs": seqs or []})

    def decode(self) -> tuple[float, float]:
        """One decode step of every job; returns its (wall, process CPU) time in seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        self._call(seqs=[[j, self.pos, 1, [], False, True] for j in self.ids])
        self.pos += 1
        return time.perf_counter() - t0, time.process_time() - c0

    def close(self) -> None:
        self._call(free=self.ids)


class Breakdown:
    """CPU time of named parts of a step, from wrappers and module hooks (synchronous CPU)."""

    def __init__(self, model: torch.nn.Module, runner: ModelRunner) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []
        self._wrap_attr(layers, "paged_attention", "attention")
        for mod in list(_modules_using(model, "paged_attention")):
            self._wrap_attr(mod, "paged_attention", "attention")
        self._wrap_attr(layers.AttentionPlan, "build", "plan + rotary", classmethod_=True)
        if hasattr(model, "rotary"):
            self._wrap_attr(model, "rotary", "plan + rotary")
        self._wrap_attr(model, "compute_logits", "lm head")
        self._wrap_attr(runner.sampler, "sample", "sampling")
        self._wrap_attr(runner, "step", "step")
        starts: dict[int, float] = {}
        for m in model.modules():
            if "Linear" in type(m).__name__:
                pre = m.register_forward_pre_hook(
                    lambda mod, _a: starts.__setitem__(id(mod), time.process_time()))
                post = m.register_forward_hook(lambda mod, _a, _o: self._add(
                    "linear layers", time.process_time() - starts[id(mod)]))
                self._undo += [pre.remove, post.remove]

    def _add(self, name: str, dt_s: float) -> None:
        self.totals[name] += dt_s

    def _wrap_attr(self, owner: Any, attr: str, name: str, classmethod_: bool = False) -> None:
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._add(name, time.process_time() - t0)

        if classmethod_:
            setattr(owner, attr, staticmethod(timed))
            self._undo.append(lambda: setattr(owner, attr, raw))
        elif isinstance(owner, type) or not hasattr(owner, "__dict__") or attr not in vars(owner):
            setattr(owner, attr, timed)
            self._undo.append(lambda: delattr(owner, attr))
        else:
            setattr(owner, attr, timed)
            self._undo.append(lambda: setattr(owner, attr, original))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()

    def per_step(self, steps: int) -> dict[str, float]:
        ms = {k: 1000 * v / steps for k, v in self.totals.items()}
        step = ms.pop("step", 0.0)
        ms["rest (norms, act, residual, runner, Python)"] = step - sum(ms.values())
        ms["step"] = step
        return ms


def _modules_using(model: torch.nn.Module, name: str) -> Iterator[Any]:
    import sys

    seen = set()
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None and id(mod) not in seen and hasattr(mod, name) and mod is not layers:
            seen.add(id(mod))
            yield mod


def count_ops(bench: DecodeBench, steps: int) -> tuple[float, float]:
    """(aten events per step, top-level aten events per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            bench.decode()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events
           if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(events) / steps, len(top) / steps


def measure(runner: ModelRunner, model: torch.nn.Module, batch: int, args: argparse.Namespace
            ) -> dict[str, Any]:
    total = args.warmup + args.steps + args.profile_steps * 2
    bench = DecodeBench(runner, batch, args.prompt_len, total)
    for _ in range(args.warmup):
        bench.decode()
    both = [bench.decode() for _ in range(args.steps)]
    times, cpu = sorted(w for w, _ in both), sorted(c for _, c in both)
    ops, top_ops = count_ops(bench, args.profile_steps)
    parts = Breakdown(model, runner)
    try:
        for _ in range(args.profile_steps):
            bench.decode()
    finally:
        parts.close()
    bench.close()
    median = statistics.median(times)
    return {
        "batch": batch,
        "median_ms": 1000 * median,
        "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))],
        "cpu_ms": 1000 * statistics.median(cpu),
        "tok_s": batch / median,
        "aten_ops": ops,
        "top_ops": top_ops,
        "parts": parts.per_step(args.profile_steps),
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load_s: float) -> str:
    lines = [
        f"## decode step, {args.dtype}, {torch.get_num_threads()} threads, prompt {args.prompt_len}",
        "",
        (
            f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
            f"{_cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        ),
        f"- command: `{args.command}`; model load {load_s:.1f} s",
        "",
        "| batch | median ms/step | p90 ms/step | CPU ms/step | tok/s | aten ops | top-level ops |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['cpu_ms']:.1f} | "
                     f"{r['tok_s']:.1f} | {r['aten_ops']:.0f} | {r['top_ops']:.0f} |")
    names = list(rows[0]["parts"])
    lines += ["", "Breakdown (process CPU ms per step, hooked steps):", "",
              "| part | " + " | ".join(f"batch {r['batch']}" for r in rows) + " |",
              "|---|" + "---:|" * len(rows)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['parts'].get(name, 0.0):.2f}"
                                                 for r in rows) + " |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=512)
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    args.command = "python benchmarks/decode_step_cpu.py " + " ".join(sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.parallel.worker import resolve_dtype

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    args.dtype = str(dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    model, info = load_model(None, dtype, "cpu")
    load_s = time.perf_counter() - t0
    pool = KVCachePool(info.num_layers, args.kv_blocks, BLOCK_SIZE, info.num_kv_heads,
                       info.head_dim, dtype, "cpu")
    runner = ModelRunner(model, pool, None, BLOCK_SIZE, torch.device("cpu"))
    rows = [measure(runner, model, int(b), args) for b in args.batches.split(",")]
    text = report(rows, args, load_s)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
