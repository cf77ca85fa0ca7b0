"""Named GPUs and model shapes for the analytic cost model (``fastserve simulate --gpu
NAME --model-shape NAME``).

GPU figures are the vendor's peak numbers (SXM parts), from the datasheets cited in
``docs/benchmarks.md``; what a kernel achieves is a named fraction of the peak
(:class:`Efficiency`). Model shapes are the published architectures (layers, hidden size,
heads, FFN size, vocabulary); parameter and KV sizes are derived from them, in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float
    hbm_bytes_s: float  # peak HBM bandwidth
    bf16_flop_s: float  # peak dense bf16 tensor-core throughput
    nvlink_bytes_s: float  # per GPU, one direction (NVLink total / 2)
    pcie_bytes_s: float  # host <-> GPU, one direction (x16)


# Sources (docs/benchmarks.md, "Hardware figures"): NVIDIA A100 datasheet (2021):
# 40GB: 1,555 GB/s HBM2, 80GB: 2,039 GB/s HBM2e; bf16 312 TFLOPS dense; NVLink 600 GB/s;
# PCIe Gen4 64 GB/s (both directions). NVIDIA H100 datasheet (SXM5): 3.35 TB/s HBM3, bf16
# 989 TFLOPS dense (1,979 with sparsity), NVLink 900 GB/s, PCIe Gen5 128 GB/s. NVIDIA H200
# product brief (SXM): 141 GB HBM3e at 4.8 TB/s, same compute and links as H100.
GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", 40 * GIB, 1555 * GB, 312e12, 300 * GB, 32 * GB),
    "a100-80gb": GPU("a100-80gb", 80 * GIB, 2039 * GB, 312e12, 300 * GB, 32 * GB),
    "h100": GPU("h100", 80 * GIB, 3350 * GB, 989e12, 450 * GB, 64 * GB),
    "h200": GPU("h200", 141 * GB, 4800 * GB, 989e12, 450 * GB, 64 * GB),
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that real kernels reach, and fixed latencies. Defaults are the
    round figures serving papers report for large models on these GPUs: memory-bound
    decode GEMMs at ~80 % of HBM peak, large prefill GEMMs at ~60 % of tensor-core peak,
    NCCL all-reduce at ~70 % of NVLink bandwidth, pinned-memory copies at ~80 % of PCIe."""

    hbm: float = 0.8
    flops: float = 0.6
    nvlink: float = 0.7
    pcie: float = 0.8
    network: float = 0.8
    collective_latency_s: float = 10e-6  # per NCCL all-reduce on NVLink
    p2p_latency_s: float = 20e-6  # per pipeline-stage send
    # Inter-node link per GPU for pipeline stages on different nodes (8 GPUs a node):
    # 400 Gb/s (p4de EFA share, or one HDR/NDR InfiniBand rail).
    network_bytes_s: float = 50 * GB
    gpus_per_node: int = 8


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    ffn: int
    vocab: int
    gated_mlp: bool  # SwiGLU: three FFN matrices instead of two
    tied_embeddings: bool
    max_model_len: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def layer_params(self) -> int:
        kv = self.num_kv_heads * self.head_dim
        attn = self.hidden * (self.hidden + 2 * kv) + self.hidden * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.ffn
        return attn + mlp

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.embed_params

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


# OPT: Zhang et al. 2022, Table 1; GPT-3: Brown et al. 2020, Table 2.1; Llama 3: Meta's
# model cards (config.json of Meta-Llama-3-8B / -70B).
MODELS: dict[str, ModelShape] = {
    "opt-13b": ModelShape("opt-13b", 40, 5120, 40, 40, 20480, 50272, False, True, 2048),
    "opt-66b": ModelShape("opt-66b", 64, 9216, 72, 72, 36864, 50272, False, True, 2048),
    "opt-175b": ModelShape("opt-175b", 96, 12288, 96, 96, 49152, 50272, False, True, 2048),
    "gpt3-175b": ModelShape("gpt3-175b", 96, 12288, 96, 96, 49152, 50257, False, True, 2048),
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 32, 8, 14336, 128256, True, False, 8192),
    "llama3-70b": ModelShape("llama3-70b", 80, 8192, 64, 8, 28672, 128256, True, False, 8192),
}


def lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(table)}") from None
