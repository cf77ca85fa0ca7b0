"""What the host CPU offers a worker: physical cores for its threads, native bf16 for its dtype.

Measured on a 2-core AVX-512-BF16 machine with the bundled SmolLM2-135M
(``benchmarks/decode_step_cpu.py``, results in ``benchmarks/results/decode_step_cpu.md``):
bf16 weights and KV cache take 1.23x less CPU time per decode step than fp32 at batch 1 and
1.45x less at batch 8, because a decode step is bound by reading the weights and bf16 halves
those bytes. Without native bf16 instructions the bf16 kernels convert to fp32 on the fly,
which has not been measured here; ``auto`` stays fp32 there, the safe reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings count once).

    One intra-op thread per physical core: a second thread on an SMT sibling shares the
    core's vector units and memory bandwidth, which a memory-bound decode step cannot use.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(cpus)  # no topology (some containers): one thread per CPU
        cores.add((package, core))
    return max(1, len(cores))


def native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX) through oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def auto_dtype(device: torch.device) -> torch.dtype:
    """``--dtype auto``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and native_bf16():
        return torch.bfloat16
    return torch.float32
