"""Skip-join MLFQ (FastServe, Wu et al., arXiv 2305.05920).

Plain MLFQ puts every new job in queue 0, so a job with a long prompt, whose first
iteration (the prefill) alone outlasts several quanta, is demoted level by level right
after its first iteration and delays every short job in each queue on the way down. The
prefill time is known from the input length before the job runs, so skip-join places a
new job directly in the highest-priority queue whose quantum is at least its estimated
prefill time, skipping the queues above (a job longer than every quantum joins the last
queue). After admission it is plain MLFQ: demotion, FIFO per queue, starvation guard.
"""

from __future__ import annotations

from typing import Any

from engine.policies.mlfq import MLFQPolicy, check_number
from engine.policies.profile import PrefillProfile, ProfileLike
from engine.request import Job

# Used only until a measured profile is handed over: roughly the bundled 135M model's
# prefill cost per prompt token on a few CPU cores (~0.5 ms), so a 100-token prompt
# estimates at 0.05 s (queue 0 at the default quantum) and a 1000-token one at 0.5 s.
DEFAULT_PREFILL_S_PER_TOKEN = 5e-4


class SkipJoinMLFQPolicy(MLFQPolicy):
    """MLFQ whose first queue is chosen from the job's estimated prefill time.

    Knobs: ``profile`` (``None``): a :class:`PrefillProfile`, its dict form, or a path to
    its JSON file; ``prefill_s_per_token`` (5e-4): the linear estimate used while no
    profile is set; plus every :class:`MLFQPolicy` knob (``base_quantum_s``,
    ``quantum_ratio``, ``num_queues``, ``starvation_limit_s``).
    """

    name = "skip-join-mlfq"

    def __init__(
        self,
        profile: ProfileLike = None,
        prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        **mlfq_options: Any,
    ) -> None:
        super().__init__(**mlfq_options)
        self.prefill_s_per_token = check_number("prefill_s_per_token", prefill_s_per_token)
        self.profile: PrefillProfile | None = None
        self.set_profile(profile)

    def set_profile(self, profile: ProfileLike) -> None:
        """Use ``profile`` (e.g. measured by the worker at start-up) for jobs admitted from
        now on; jobs already queued keep their level. ``None`` restores the linear estimate."""
        self.profile = PrefillProfile.coerce(profile)

    def estimate_prefill_s(self, num_tokens: int) -> float:
        if self.profile is not None:
            return self.profile.prefill_time(num_tokens)
        return self.prefill_s_per_token * max(0, num_tokens)

    def initial_level(self, job: Job, now: float) -> int:
        # The pending tokens are the prompt on admission (all of it must be prefilled).
        return self.level_for(self.estimate_prefill_s(job.num_pending_tokens))

    def describe(self) -> dict:
        return {
            **super().describe(),
            "prefill_estimate": "profile" if self.profile is not None else "linear",
            "prefill_s_per_token": self.prefill_s_per_token,
        }
