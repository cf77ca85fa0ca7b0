"""Analytic cost model: a step's time from a GPU's bandwidth and FLOP/s and a model's
shape, under tensor (TP) x pipeline (PP) parallelism. No measurement needed.

A step (the scheduler's ``StepPlan``) feeds ``T`` tokens, samples ``S`` of them, reads the
KV of every context it attends to and writes the KV of its new tokens. Per step:

* memory: weights ``W`` once, plus KV read and written, spread over the ``TP`` GPUs of a
  stage (stages run one after another for one batch), at ``hbm`` x peak bandwidth;
* compute: ``2 x params x T`` for the linear layers (the LM head only for sampled
  tokens) plus ``4 x layers x hidden x sum(context)`` for attention, at ``flops`` x peak;
* the forward takes the larger of the two (roofline on the whole step);
* TP: two all-reduces of ``T x hidden`` activations per layer (ring: ``2 (TP-1)/TP`` of
  the bytes over NVLink, or the network when TP spans nodes, plus a fixed latency);
* PP: ``PP - 1`` sends of the activations between stages (the network when the stages
  span more than one node).

Pipeline stages in flight (the layout names are the distributed work's: ``pp`` batches
in flight). The scheduler core plans one batch per iteration; with ``pipeline_in_flight``
(the default) a plan is priced as ``PP`` equal micro-batches that fill the pipeline: one
round moves every job in the plan one token and takes ``PP`` stage-times of a micro-batch,
so the KV and compute terms shrink by ``PP`` while every stage still reads its weights
once per micro-batch. This is an approximation of the distributed scheduler, which
forms the micro-batches itself: it assumes they are balanced and ignores the fill and
drain bubbles. Without it, a plan goes through the stages one after another (what a
core without in-flight batches does, leaving ``(PP-1)/PP`` of the GPUs idle).

Swapping moves a block's KV (``block_size x kv_bytes_per_token``, split evenly over all
``TP x PP`` GPUs, each on its own PCIe link) at ``pcie`` x peak. KV capacity is what is
left of ``gpu_memory_utilization`` x memory after the weights and an activation reserve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.plan import StepPlan
from engine.policies.profile import PrefillProfile
from engine.sim.cost import StepCost
from engine.sim.hardware import GIB, GPU, Efficiency, ModelShape


@dataclass(frozen=True)
class ClusterConfig:
    """How the model is laid out and how memory is split. Defaults: vLLM's."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_in_flight: bool = True
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: float = 2 * GIB  # per GPU: activations, workspace, graphs
    host_kv_bytes_per_gpu: float = 64 * GIB  # pinned host memory for swapped KV
    block_size: int = 16
    step_overhead_s: float = 0.0  # scheduling and launch time per step, off the GPU
    overlap_copies: bool = True  # proactive copies overlap the forward (copy engine)


class AnalyticCost:
    """Prices a ``StepPlan`` for ``model`` on ``gpu`` x TP x PP (see the module notes).
    Same interface as :class:`engine.sim.cost.CostModel`."""

    def __init__(self, model: ModelShape, gpu: GPU, cluster: ClusterConfig | None = None,
                 eff: Efficiency | None = None) -> None:
        cluster = cluster or ClusterConfig()
        eff = eff or Efficiency()
        tp, pp = cluster.tensor_parallel_size, cluster.pipeline_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError("tensor and pipeline parallel sizes must be >= 1")
        if model.num_layers % pp:
            raise ValueError(f"{model.name} has {model.num_layers} layers: not divisible by PP={pp}")
        if model.num_heads % tp or model.num_kv_heads % tp and tp % model.num_kv_heads:
            raise ValueError(f"{model.name}'s heads do not split over TP={tp}")
        self.model, self.gpu, self.cluster, self.eff = model, gpu, cluster, eff
        self.tp, self.pp = tp, pp
        self.num_gpus = tp * pp
        per_gpu_weights = model.weight_bytes / self.num_gpus
        usable = gpu.memory_bytes * cluster.gpu_memory_utilization - cluster.activation_reserve_bytes
        kv_per_gpu = usable - per_gpu_weights
        if kv_per_gpu <= 0:
            raise ValueError(
                f"{model.name} ({model.weight_bytes / 1e9:.0f} GB of weights) does not fit "
                f"{self.num_gpus} x {gpu.name} (TP={tp}, PP={pp}): {per_gpu_weights / 1e9:.1f} GB "
                f"of weights per GPU, {usable / 1e9:.1f} GB usable")
        block_bytes = cluster.block_size * model.kv_bytes_per_token
        self.kv_bytes = kv_per_gpu * self.num_gpus
        self.num_gpu_blocks = int(self.kv_bytes // block_bytes)
        self.num_host_blocks = int(cluster.host_kv_bytes_per_gpu * self.num_gpus // block_bytes)
        self.swap_s_per_block = block_bytes / self.num_gpus / (gpu.pcie_bytes_s * eff.pcie)
        self.step_overhead_s = cluster.step_overhead_s
        self.overlap = cluster.overlap_copies
        self._m = pp if cluster.pipeline_in_flight else 1
        multi_node = self.num_gpus > eff.gpus_per_node
        self._tp_link = (eff.network_bytes_s * eff.network if tp > eff.gpus_per_node
                         else gpu.nvlink_bytes_s * eff.nvlink)
        self._pp_link = (eff.network_bytes_s * eff.network if multi_node
                         else gpu.nvlink_bytes_s * eff.nvlink)
        self._lin_flops_per_token = 2 * model.num_layers * model.layer_params
        self._head_flops = 2 * model.vocab * model.hidden
        self._attn_flops = 4 * model.num_layers * model.hidden
        self._bw = tp * gpu.hbm_bytes_s * eff.hbm
        self._fl = tp * gpu.bf16_flop_s * eff.flops

    def with_overhead(self, step_overhead_s: float) -> AnalyticCost:
        return AnalyticCost(self.model, self.gpu, replace(self.cluster, step_overhead_s=step_overhead_s),
                            self.eff)

    def forward_time(self, tokens: int, sampled: int, context: float, attended: float) -> float:
        """Seconds for a step feeding ``tokens`` (``sampled`` of them sampled) that reads
        ``context`` tokens of KV and has ``attended`` (query, key) pairs in attention."""
        m, mdl = self._m, self.model
        mem = (mdl.weight_bytes + mdl.kv_bytes_per_token * (context + tokens) / m) / self._bw
        flops = (self._lin_flops_per_token * tokens + self._head_flops * sampled
                 + self._attn_flops * attended)
        t = max(mem, flops / m / self._fl)
        act = tokens / m * mdl.hidden * mdl.dtype_bytes
        if self.tp > 1:
            ring = 2 * (self.tp - 1) / self.tp
            t += 2 * mdl.num_layers * (self.eff.collective_latency_s + ring * act / self._tp_link)
        if self.pp > 1:
            t += (self.pp - 1) * (self.eff.p2p_latency_s + act / self._pp_link)
        return t

    def forward_s(self, plan: StepPlan) -> float:
        # The scheduler adds these up as it forms the batch; whole numbers, far below 2**53,
        # so as floats they are exactly what a walk over the seqs would sum.
        t = plan.summed()
        return self.forward_time(t.tokens, t.sampled, float(t.context), float(t.attended))

    def step(self, plan: StepPlan) -> StepCost:
        forward = self.forward_s(plan) if plan.batch() else 0.0
        demand = (len(plan.swap_out) + len(plan.swap_in)) * self.swap_s_per_block
        proactive = (len(plan.offload) + len(plan.prefetch)) * self.swap_s_per_block
        body = max(forward, proactive) if self.overlap else forward + proactive
        overhead = self.step_overhead_s if plan.batch() else 0.0
        return StepCost(overhead + demand + body, forward, demand, proactive)

    def profile(self, decode_context: int = 512) -> PrefillProfile:
        """The curve a worker would measure (``fastserve profile``): prefill time by prompt
        length, decode-step time by batch size at ``decode_context`` tokens of context.
        Skip-join reads its prefill times from this."""
        lens = sorted({1, 2, 4, 8, *range(16, self.model.max_model_len + 1, 16)})
        prefill = [(n, self.forward_time(n, 1, 0, n * (n + 1) / 2)) for n in lens]
        decode = [(b, self.forward_time(b, b, b * decode_context, b * (decode_context + 1)))
                  for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
        return PrefillProfile(prefill, decode)

    def describe(self) -> dict:
        return {
            "model_shape": self.model.name, "gpu": self.gpu.name,
            "tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp,
            "pipeline_in_flight": self.cluster.pipeline_in_flight,
            "num_gpu_blocks": self.num_gpu_blocks, "num_host_blocks": self.num_host_blocks,
            "block_size": self.cluster.block_size,
            "kv_cache_tokens": self.num_gpu_blocks * self.cluster.block_size,
            "swap_ms_per_block": self.swap_s_per_block * 1e3,
            "decode_step_ms_batch1": self.forward_time(1, 1, 512, 513) * 1e3,
        }
