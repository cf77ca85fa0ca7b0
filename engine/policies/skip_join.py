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

from engine.policies.mlfq import MLFQPolicy, check_int, check_number
from engine.policies.profile import PrefillProfile, ProfileLike
from engine.request import Job

# Used only until a measured profile is handed over: roughly the bundled 135M model's
# prefill cost per prompt token on a few CPU cores (~0.5 ms), so a 100-token prompt
# estimates at 0.05 s (queue 0 at the default quantum) and a 1000-token one at 0.5 s.
DEFAULT_PREFILL_S_PER_TOKEN = 5e-4
# With a profile and no explicit base_quantum_s, queue 0's quantum is this many decode
# iterations at this batch size, as the profile prices them: a short job gets about two
# busy iterations before anything that has already run longer, on whatever device the
# profile was measured (a constant in seconds would suit one machine only).
DEFAULT_QUANTUM_STEPS = 2.0
DEFAULT_QUANTUM_BATCH = 8
# ...and with no explicit starvation_limit_s, the guard waits this many times the last
# queue's quantum, so it only rescues jobs stuck behind a stream of short ones.
DEFAULT_STARVATION_QUANTA = 2.0


class SkipJoinMLFQPolicy(MLFQPolicy):
    """MLFQ whose first queue is chosen from the job's estimated prefill time.

    Knobs: ``profile`` (``None``): a :class:`PrefillProfile`, its dict form, or a path to
    its JSON file; ``prefill_s_per_token`` (5e-4): the linear estimate used while no
    profile is set; ``quantum_steps`` (2) and ``quantum_batch`` (8): without an explicit
    ``base_quantum_s``, a profile with decode points sets it to ``quantum_steps`` decode
    iterations at batch ``quantum_batch``, and (without an explicit
    ``starvation_limit_s``) the starvation limit to twice the last queue's quantum; plus
    every :class:`MLFQPolicy` knob (``base_quantum_s``, ``quantum_ratio``, ``num_queues``,
    ``starvation_limit_s``, ``pin_promoted``).
    """

    name = "skip-join-mlfq"

    def __init__(
        self,
        profile: ProfileLike = None,
        prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
        quantum_steps: float = DEFAULT_QUANTUM_STEPS,
        quantum_batch: int = DEFAULT_QUANTUM_BATCH,
        **mlfq_options: Any,
    ) -> None:
        super().__init__(**mlfq_options)
        self.prefill_s_per_token = check_number("prefill_s_per_token", prefill_s_per_token)
        self.quantum_steps = check_number("quantum_steps", quantum_steps)
        self.quantum_batch = check_int("quantum_batch", quantum_batch, minimum=1)
        self._derive_quantum = "base_quantum_s" not in mlfq_options
        self._derive_starvation = (
            "starvation_limit_s" not in mlfq_options and self.num_queues is not None)
        self.quantum_source = "option" if not self._derive_quantum else "default"
        self.profile: PrefillProfile | None = None
        self.set_profile(profile)

    def set_profile(self, profile: ProfileLike) -> None:
        """Use ``profile`` (e.g. measured by the worker at start-up) for jobs admitted from
        now on; jobs already queued keep their level. ``None`` restores the linear estimate.
        Knobs left to their defaults are derived from the profile (see the class notes)."""
        self.profile = PrefillProfile.coerce(profile)
        if self.profile is None or not self.profile.decode_points:
            return
        step = self.profile.decode_step_time(self.quantum_batch)
        if self._derive_quantum and step > 0:
            self.base_quantum_s = self.quantum_steps * step
            self.quantum_source = (
                f"profile: {self.quantum_steps:g} decode steps at batch {self.quantum_batch}")
            if self._derive_starvation:
                assert self.num_queues is not None
                self.starvation_limit_s = (
                    DEFAULT_STARVATION_QUANTA * self.quantum(self.num_queues - 1))

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
            "quantum_source": self.quantum_source,
        }
