"""Step-timeline tracer for ``benchmarks/decode_timeline.py`` (never imported by the engine).

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has one,
so putting this directory on ``PYTHONPATH`` reaches every process of a server: the engine
and the worker it spawns. With ``FASTSERVE_STEPTRACE=DIR`` set, the functions listed below
are wrapped as soon as their module is imported: each call records ``(name, start, end,
thread CPU seconds)`` with ``time.perf_counter`` (CLOCK_MONOTONIC on Linux, so the
processes' clocks agree), and at exit each process writes ``DIR/trace-<pid>.json``.
Without the variable nothing is wrapped.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.util
import inspect
import json
import os
import sys
import time

_DIR = os.environ.get("FASTSERVE_STEPTRACE")
_RECORDS: list[tuple[str, float, float, float]] = []

# module -> [(qualified attribute, span name)]
_TARGETS: dict[str, list[tuple[str, str]]] = {
    # engine.parallel.worker runs as __main__ (python -m), so the worker is traced through
    # the modules it imports: the codec (its names are bound at import) and the runner.
    "engine.parallel.protocol": [("encode", "encode"), ("decode", "decode"),
                                 ("plan_to_message", "plan_to_message")],
    "engine.scheduler": [("Scheduler.schedule", "schedule"),
                         ("Scheduler.schedule_continuation", "schedule"),
                         ("Scheduler.update", "update")],
    "engine.actors.scheduler": [("SchedulerActor._complete_oldest", "complete_oldest")],
    "engine.parallel.executor": [("WorkerExecutor._send", "send"),
                                 ("WorkerExecutor._on_message", "reply_in")],
    "engine.actors.frontend": [("FrontendActor.on_events", "frontend_events")],
    "engine.detokenizer": [("IncrementalDetokenizer.step", "detok")],
    "engine.server.openai_routes": [("GenerationRoutes._send", "sse_write")],
    "engine.parallel.runner": [("ModelRunner.step", "runner_step"),
                               ("ModelRunner._assemble", "assemble")],
    "engine.sampler": [("Sampler.sample", "sample")],
}


def _wrap(fn, name: str):
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def traced_async(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                _RECORDS.append((name, t0, time.perf_counter(), time.thread_time() - c0))
        return traced_async

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _RECORDS.append((name, t0, time.perf_counter(), time.thread_time() - c0))
    return traced


def _patch(module) -> None:
    for attr, name in _TARGETS.get(module.__name__, ()):
        owner, _, leaf = attr.rpartition(".")
        obj = getattr(module, owner) if owner else module
        if not hasattr(obj, leaf):  # e.g. schedule_continuation exists only on some branches
            continue
        wrapped = _wrap(getattr(obj, leaf), name)
        if isinstance(inspect.getattr_static(obj, leaf), staticmethod):
            wrapped = staticmethod(wrapped)
        setattr(obj, leaf, wrapped)
    if module.__name__ == "engine.parallel.runner":  # the model's own forward and head
        init = module.ModelRunner.__init__

        def traced_init(self, model, *args, **kwargs):
            init(self, model, *args, **kwargs)
            model.forward = _wrap(model.forward, "model_forward")
            model.compute_logits = _wrap(model.compute_logits, "logits")
        module.ModelRunner.__init__ = traced_init


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
        loader.exec_module = exec_and_patch
        return spec


def _dump() -> None:
    path = os.path.join(_DIR, f"trace-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "argv": sys.argv, "records": _RECORDS}, f)


if _DIR:
    sys.meta_path.insert(0, _Finder())
    atexit.register(_dump)
    _os_exit = os._exit

    def _exit_after_dump(code: int) -> None:  # `fastserve serve` ends with os._exit
        _dump()
        _os_exit(code)
    os._exit = _exit_after_dump
