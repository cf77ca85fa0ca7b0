"""Cost model: how long one planned iteration takes, from a measured profile.

A step's forward is priced from the profile the worker measures (``fastserve profile``):
``decode_step_time(batch)`` for the jobs that feed one token and ``prefill_time(tokens)``
for the prompt (or recompute) tokens fed by the others. When a step has both, the fixed
per-forward overhead (the 1-job decode step) is counted once, not twice. Copies between
the pools cost ``swap_s_per_block`` each: demand moves (``swap_out``/``swap_in``) sit on
the critical path before the forward; proactive moves (``offload``/``prefetch``) overlap it
when ``overlap`` is set (a GPU's copy engine), and add to it otherwise (copies competing
for the same cores). ``step_overhead_s`` is added to every step that runs a forward, for
what the profile does not see (scheduling, messages to the worker, batch assembly); the
policies benchmark calibrates it so that a simulated fcfs run lasts as long as the
measured one.
"""

from __future__ import annotations

from typing import NamedTuple

from engine.plan import StepPlan
from engine.policies.profile import PrefillProfile


class StepCost(NamedTuple):  # one per simulated step: a tuple is the cheapest record
    seconds: float  # wall time of the step, copies included
    forward_s: float
    demand_copy_s: float
    proactive_copy_s: float


class CostModel:
    def __init__(
        self,
        profile: PrefillProfile,
        swap_s_per_block: float = 0.0,
        overlap: bool = True,
        step_overhead_s: float = 0.0,
    ) -> None:
        if not profile.decode_points:
            raise ValueError("the cost model needs a profile with decode points")
        if swap_s_per_block < 0:
            raise ValueError(f"swap_s_per_block must be >= 0, got {swap_s_per_block}")
        if step_overhead_s < 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {step_overhead_s}")
        self.profile = profile
        self.swap_s_per_block = swap_s_per_block
        self.overlap = overlap
        self.step_overhead_s = step_overhead_s

    def with_overhead(self, step_overhead_s: float) -> CostModel:
        return CostModel(self.profile, self.swap_s_per_block, self.overlap, step_overhead_s)

    def forward_s(self, plan: StepPlan) -> float:
        decode = sum(1 for job, start, n, *_ in plan.batch()
                     if n == 1 and start >= job.num_prompt_tokens)
        prefill = plan.num_tokens - decode
        p = self.profile
        if decode and prefill:
            return p.decode_step_time(decode) + p.prefill_time(prefill) - p.decode_step_time(1)
        if decode:
            return p.decode_step_time(decode)
        return p.prefill_time(prefill)

    def step(self, plan: StepPlan) -> StepCost:
        forward = self.forward_s(plan) if plan.batch() else 0.0
        demand = (len(plan.swap_out) + len(plan.swap_in)) * self.swap_s_per_block
        proactive = (len(plan.offload) + len(plan.prefetch)) * self.swap_s_per_block
        body = max(forward, proactive) if self.overlap else forward + proactive
        overhead = self.step_overhead_s if plan.batch() else 0.0
        return StepCost(overhead + demand + body, forward, demand, proactive)
