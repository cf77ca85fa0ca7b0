"""Worker settings derived from the host: threads, dtype, OpenMP wait policy."""

from __future__ import annotations

import os

import torch

from engine.parallel import cpu
from engine.parallel.worker import resolve_dtype


def test_one_thread_per_physical_core_never_more_than_the_cpus_we_may_use():
    assert 1 <= cpu.physical_cores() <= len(os.sched_getaffinity(0))


def test_auto_dtype_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    cpu_dev = torch.device("cpu")
    want = torch.bfloat16 if cpu.native_bf16() else torch.float32
    assert resolve_dtype("auto", cpu_dev) == want
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu_dev) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float32", cpu_dev) == torch.float32  # explicit always wins
