"""Speed work must not change what the simulator computes.

The scheduler core and the simulator were made faster (per-job hot paths, plan totals
added up while the batch is formed, no per-step dicts in the simulator loop). These runs
were recorded with main's code without that work (commit a850b71, which has the admission
rules of the preemption work; the speed work was first checked against 9fb72b2, before
them, the same way): every decision (steps,
preemptions, blocks swapped each way, recomputes) and every time (mean and p99 JCT, mean
TTFT, makespan, the sum of every job's token times) must come out exactly the same. A
preemption-heavy setup is used on purpose (a KV pool of a few hundred blocks for
ShareGPT-like jobs), so that eviction, swapping and recompute paths all run.
"""

from __future__ import annotations

import math

import pytest

from engine.bench.workload import build_workload, heavy_tailed, with_rate
from engine.config import SchedulerConfig
from engine.policies.profile import PrefillProfile
from engine.sim import CostModel, simulate
from engine.sim.analytic import AnalyticCost, ClusterConfig
from engine.sim.hardware import GPUS, MODELS
from engine.sim.simulator import build_scheduler

# (policy, swap, max_num_seqs, gpu blocks, host blocks, eager_recompute)
ANALYTIC_CASES = [
    ("skip-join-mlfq", "proactive", 32, 300, 600, False),
    ("skip-join-mlfq", "reactive", 64, 200, 40, False),
    ("mlfq", "recompute", 32, 300, 600, True),
    ("fcfs", "reactive", 256, 400, 100, False),
    ("orca-fcfs", "reactive", 32, 300, 600, False),
    ("oracle-srpt", "proactive", 64, 200, 40, False),
    ("priority", "proactive", 32, 300, 600, False),
]
# (policy, swap, pipeline depth): the measured cost model, batches in flight
PROFILE_CASES = [
    ("mlfq", "proactive", 2),
    ("skip-join-mlfq", "reactive", 3),
    ("fcfs", "recompute", 1),
]

# Recorded at a850b71, without the speed work: (steps, forward steps, preemptions,
# swapped-out blocks, swapped-in blocks, proactive blocks, recomputes, rejected) and
# (mean JCT, p99 JCT, mean TTFT, makespan, sum of all token times).
EXPECTED: dict[tuple, tuple[tuple[int, ...], tuple[float, ...]]] = {
    ('skip-join-mlfq', 'proactive', 32, 300, 600, False): ((4597, 4596, 205, 2071, 2071, 17, 63, 6),
        (41.32742813688705, 72.5901520382815, 6.469958833556356, 87.75866231101779, 2056505.939810167)),
    ('skip-join-mlfq', 'reactive', 64, 200, 40, False): ((7640, 7639, 404, 515, 515, 0, 351, 0),
        (71.32637153942089, 123.43341300817706, 6.033090301373088, 140.9858261811507, 3631155.9686868014)),
    ('mlfq', 'recompute', 32, 300, 600, True): ((4650, 4649, 116, 0, 0, 0, 116, 0),
        (39.01112077900343, 82.56531689099232, 9.648675263211983, 90.15767085491309, 1711321.17183857)),
    ('fcfs', 'reactive', 256, 400, 100, False): ((3589, 3588, 987, 6531, 6531, 0, 20, 0),
        (32.95590759602401, 60.34337718603335, 21.166065404784067, 75.97218200009087, 1961917.0748817066)),
    ('orca-fcfs', 'reactive', 32, 300, 600, False): ((23920, 23919, 0, 0, 0, 0, 0, 21),
        (184.3607052581126, 372.9774181406686, 178.8184791135914, 387.31271091306155, 9260210.065921053)),
    ('oracle-srpt', 'proactive', 64, 200, 40, False): ((7623, 7622, 428, 1605, 1605, 16, 275, 0),
        (37.87190288540152, 130.34599444318312, 24.41130717533879, 137.9383484071039, 2970907.695706371)),
    ('priority', 'proactive', 32, 300, 600, False): ((4617, 4616, 1285, 11218, 11218, 36, 0, 0),
        (27.49911370288034, 80.66944547093264, 13.064878796495938, 96.12805344632503, 2204743.521994629)),
    ('mlfq', 'proactive', 2): ((531, 523, 1, 14, 14, 0, 0, 0),
        (0.8056585219771493, 4.685907522455416, 0.15184675411219206, 19.675192999125922, 17190.335568716142)),
    ('skip-join-mlfq', 'reactive', 3): ((665, 652, 0, 0, 0, 0, 0, 0),
        (0.7772906917840385, 4.545429457213544, 0.1502359478946022, 19.606687825944427, 17136.995364472124)),
    ('fcfs', 'recompute', 1): ((378, 376, 3, 0, 0, 0, 3, 0),
        (1.3818944460189586, 4.79050411267276, 0.6583701001852361, 21.242320722170312, 18023.46326209078)),
}


def _analytic_run(policy, swap, seqs, gpu, host, eager, record_tokens=True):
    cost = AnalyticCost(MODELS["opt-13b"], GPUS["a100-80gb"], ClusterConfig())
    items = build_workload("sharegpt", 160, rate=12.0, seed=5, max_input_len=1024,
                           max_output_len=512)
    cfg = SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=seqs,
                          max_num_batched_tokens=2048, max_waiting=100,
                          eager_recompute=eager)
    core = build_scheduler(cfg, gpu, host, 16, cost.profile())
    oracle = (lambda it: it.output_len) if policy == "priority" else None
    return simulate(core, items, cost, max_model_len=2048, priority=oracle,
                    record_tokens=record_tokens)


def _profile_run(policy, swap, depth):
    profile = PrefillProfile(prefill=[(1, 0.030), (128, 0.130), (512, 0.600)],
                             decode=[(1, 0.030), (8, 0.060), (32, 0.080)])
    items, gaps = heavy_tailed(120, seed=3, prompt_median=32, prompt_p99=256,
                               output_median=8, output_p99=96, max_job_tokens=500)
    opts = () if policy == "fcfs" else (("base_quantum_s", 0.1), ("num_queues", 6),
                                        ("starvation_limit_s", 3.0))
    cfg = SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=6,
                          max_num_batched_tokens=256, max_waiting=100, policy_options=opts)
    core = build_scheduler(cfg, 40, 120, 16, profile, pipeline_depth=depth)
    return simulate(core, with_rate(items, gaps, 6.0), CostModel(profile, 0.002), check_every=5)


def fingerprint(res) -> tuple[tuple[int, ...], tuple[float, ...]]:
    counts = (res.steps, res.forward_steps, res.preemptions, res.swap_out_blocks,
              res.swap_in_blocks, res.proactive_blocks, res.recomputes, len(res.rejected))
    times = (res.mean_jct, res.p99_jct, res.mean_ttft, res.makespan,
             math.fsum(t for ts in res.token_times for t in ts))
    return counts, times


@pytest.mark.parametrize("case", ANALYTIC_CASES, ids=lambda c: f"{c[0]}+{c[1]}-{c[2]}x{c[3]}")
def test_analytic_runs_decide_and_time_exactly_as_before(case):
    counts, times = fingerprint(_analytic_run(*case))
    want_counts, want_times = EXPECTED[case]
    assert counts == want_counts
    assert times == want_times  # exact: the same float operations in the same order


@pytest.mark.parametrize("case", PROFILE_CASES, ids=lambda c: f"{c[0]}+{c[1]}-depth{c[2]}")
def test_profile_runs_with_batches_in_flight_decide_and_time_exactly_as_before(case):
    counts, times = fingerprint(_profile_run(*case))
    want_counts, want_times = EXPECTED[case]
    assert counts == want_counts
    assert times == want_times


def test_first_and_last_token_times_without_recording_every_token():
    # Large runs keep only each job's first and last token time: they must be the first
    # and last of the full record.
    case = ANALYTIC_CASES[0]
    full = _analytic_run(*case, record_tokens=True)
    ends = _analytic_run(*case, record_tokens=False)
    assert ends.token_times == [ts[:1] if len(ts) == 1 else [ts[0], ts[-1]]
                                for ts in full.token_times]
    assert ends.jct == full.jct
