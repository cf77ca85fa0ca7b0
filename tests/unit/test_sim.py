"""The workload generator and the simulator: the real scheduler core on a virtual clock."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest

from engine.bench.metrics import nearest_rank, saturated_capacity
from engine.bench.workload import WorkItem, heavy_tailed, with_rate
from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.policies.profile import PrefillProfile
from engine.policies.registry import create_scheduling_policy, create_swap_policy
from engine.scheduler import Scheduler
from engine.sim import CostModel, simulate
from engine.sim.simulator import calibrate_decode_line, calibrate_overhead

# A made-up but CPU-shaped profile: prefill ~1 ms/token above a 30 ms floor, decode
# steps grow slowly with the batch.
PROFILE = PrefillProfile(
    prefill=[(1, 0.030), (128, 0.130), (512, 0.600)],
    decode=[(1, 0.030), (8, 0.060), (32, 0.080)],
)
MLFQ = {"base_quantum_s": 0.1, "quantum_ratio": 2.0, "num_queues": 6, "starvation_limit_s": 30.0}


def scheduler(policy: str = "fcfs", swap: str = "reactive", *, seqs: int = 4,
              gpu: int = 32, host: int = 128, depth: int = 1) -> Scheduler:
    opts = {} if policy in ("fcfs", "priority") else dict(MLFQ)
    if policy == "skip-join-mlfq":
        opts["profile"] = PROFILE
    return Scheduler(
        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=2048),
        create_scheduling_policy(policy, opts),
        create_swap_policy(swap, {}),
        BlockManager(gpu, host, 16),
        pipeline_depth=depth,
    )


def workload(n: int = 40, seed: int = 3, rate: float = 4.0) -> list[WorkItem]:
    items, gaps = heavy_tailed(n, seed=seed, prompt_median=32, prompt_p99=256,
                               output_median=8, output_p99=96, max_job_tokens=500)
    return with_rate(items, gaps, rate)


def test_heavy_tailed_is_seeded_clipped_and_fits_the_job_budget():
    a, gaps_a = heavy_tailed(200, seed=7, prompt_median=64, prompt_p99=1024,
                             output_median=16, output_p99=256, max_job_tokens=600)
    b, gaps_b = heavy_tailed(200, seed=7, prompt_median=64, prompt_p99=1024,
                             output_median=16, output_p99=256, max_job_tokens=600)
    c, _ = heavy_tailed(200, seed=8, prompt_median=64, prompt_p99=1024,
                        output_median=16, output_p99=256, max_job_tokens=600)
    assert (a, gaps_a) == (b, gaps_b) and a != c
    assert gaps_a[0] == 0.0 and all(g > 0 for g in gaps_a[1:])
    assert all(1 <= it.output_len <= 256 and 1 <= it.prompt_len for it in a)
    assert all(it.prompt_len + it.output_len <= 600 for it in a)
    # heavy tail: the mean sits well above the median
    outputs = [it.output_len for it in a]
    assert statistics.mean(outputs) > 1.3 * statistics.median(outputs)


def test_with_rate_scales_the_same_gaps_and_rejects_a_bad_rate():
    items, gaps = heavy_tailed(10, seed=0, prompt_median=8, prompt_p99=16, output_median=2,
                               output_p99=4, max_job_tokens=64)
    slow, fast = with_rate(items, gaps, 1.0), with_rate(items, gaps, 4.0)
    assert slow[0].arrival_s == 0.0
    assert [s.arrival_s / 4 for s in slow] == pytest.approx([f.arrival_s for f in fast])
    assert [(s.prompt_len, s.output_len) for s in slow] == [(i.prompt_len, i.output_len)
                                                           for i in items]
    with pytest.raises(ValueError, match="rate"):
        with_rate(items, gaps, 0.0)


def test_nearest_rank():
    xs = list(range(1, 101))
    assert nearest_rank(xs, 0.99) == 99 and nearest_rank(xs, 0.5) == 50
    assert nearest_rank([5.0], 0.99) == 5.0


def test_cost_model_counts_the_forward_overhead_once_and_overlaps_only_when_told():
    cost = CostModel(PROFILE, swap_s_per_block=0.01, overlap=True)
    s = scheduler()
    items = [WorkItem(128, 4, 0.0)]
    s.add(_job(0, items[0]), 0.0)
    plan = s.schedule(0.0)
    assert cost.forward_s(plan) == pytest.approx(PROFILE.prefill_time(128))
    serial = CostModel(PROFILE, swap_s_per_block=0.01, overlap=False)
    assert serial.step(plan).seconds == pytest.approx(cost.step(plan).seconds)  # no copies
    with pytest.raises(ValueError, match="decode points"):
        CostModel(PrefillProfile([(1, 0.01)]))
    with pytest.raises(ValueError, match="swap_s_per_block"):
        CostModel(PROFILE, swap_s_per_block=-1)


def _job(i: int, it: WorkItem):
    from engine.request import Job
    from engine.sampling import SamplingParams

    return Job(job_id=f"t-{i}", prompt_ids=[1] * it.prompt_len,
               params=SamplingParams(max_tokens=it.output_len, ignore_eos=True),
               arrival_time=it.arrival_s)


@pytest.mark.parametrize("policy,swap", [
    ("fcfs", "reactive"), ("mlfq", "reactive"), ("skip-join-mlfq", "reactive"),
    ("skip-join-mlfq", "proactive"), ("skip-join-mlfq", "recompute"), ("priority", "reactive"),
])
def test_every_job_finishes_with_its_exact_output_length_and_blocks_come_back(policy, swap):
    items = workload()
    cost = CostModel(PROFILE, swap_s_per_block=0.001)
    s = scheduler(policy, swap)
    res = simulate(s, items, cost, check_every=1)
    assert [len(j.output_ids) for j in res.jobs] == [it.output_len for it in items]
    assert res.output_tokens == sum(it.output_len for it in items)
    assert all(t >= 0 for t in res.ttft) and all(j >= t for j, t in zip(res.jct, res.ttft))
    assert res.makespan >= max(it.arrival_s for it in items)
    assert not s.jobs and s.blocks.num_free_gpu_blocks == 32
    assert s.blocks.num_free_host_blocks == 128
    if swap == "recompute":
        assert res.swap_out_blocks == 0 and res.recomputes == res.preemptions
    if swap == "reactive":
        assert res.proactive_blocks == 0


def test_simulation_is_deterministic():
    items = workload()
    runs = [simulate(scheduler("skip-join-mlfq", "proactive"), items, CostModel(PROFILE, 0.001))
            for _ in range(2)]
    assert runs[0].jct == runs[1].jct and runs[0].steps == runs[1].steps
    assert runs[0].proactive_blocks == runs[1].proactive_blocks


def test_a_short_job_behind_long_ones_waits_under_fcfs_but_not_skip_join():
    # Two long jobs fill the batch (cap 2); a one-token job arrives right behind them.
    items = [WorkItem(16, 200, 0.0), WorkItem(16, 200, 0.0), WorkItem(16, 1, 0.01)]
    cost = CostModel(PROFILE)
    fcfs = simulate(scheduler("fcfs", seqs=2), items, cost)
    sj = simulate(scheduler("skip-join-mlfq", seqs=2), items, cost)
    assert fcfs.jct[2] > 200 * PROFILE.decode_step_time(2)  # waited for a long job to finish
    assert sj.jct[2] < 10 * PROFILE.decode_step_time(2)  # preempted one after its quantum
    # the long job it displaced lost its place in the batch but not its KV (pool is large)
    assert statistics.mean(sj.jct) < statistics.mean(fcfs.jct)
    assert max(j.stats.demotions for j in sj.jobs) >= 1


def test_idle_gaps_advance_the_clock_without_steps():
    items = [WorkItem(8, 2, 0.0), WorkItem(8, 2, 100.0)]
    res = simulate(scheduler(), items, CostModel(PROFILE))
    assert res.makespan > 100.0 and res.busy_s < 1.0
    assert res.jct[1] == pytest.approx(res.jct[0])  # same job, same empty system
    assert math.isfinite(res.throughput)


def test_a_job_that_can_never_fit_is_rejected_and_the_rest_run():
    s = scheduler(gpu=4, host=4)  # 64 tokens of KV
    res = simulate(s, [WorkItem(200, 4, 0.0), WorkItem(8, 3, 0.0)], CostModel(PROFILE),
                   max_steps=1000)
    assert res.rejected == [0]
    assert len(res.jct) == 1 and res.output_tokens == 3
    assert res.records[0].rejected and res.records[1].num_output_tokens == 3


def test_simulate_needs_an_empty_scheduler():
    s = scheduler()
    s.add(_job(0, WorkItem(8, 2)), 0.0)
    with pytest.raises(ValueError, match="empty"):
        simulate(s, workload(4), CostModel(PROFILE))


def test_saturated_capacity_counts_work_done_until_the_last_job_started():
    # Job 0 streams 4 tokens at t=1..4; job 1 waits and gets its first token at t=2,
    # then one more at 6. Window ends at 2: job 0 is 2/4 done, job 1 1/2 done.
    times = [[1.0, 2.0, 3.0, 4.0], [2.0, 6.0]]
    assert saturated_capacity(times, [4, 2]) == pytest.approx((0.5 + 0.5) / 2.0)
    with pytest.raises(ValueError):
        saturated_capacity(times, [4, 3])
    with pytest.raises(ValueError):
        saturated_capacity([], [])
    # the simulator records what the metric needs
    items = [WorkItem(16, 50, 0.0), WorkItem(16, 3, 0.0), WorkItem(16, 3, 0.0)]
    res = simulate(scheduler(seqs=1), items, CostModel(PROFILE))
    assert [len(ts) for ts in res.token_times] == [50, 3, 3]
    assert all(a <= b for ts in res.token_times for a, b in itertools.pairwise(ts))
    # one job at a time: when the third gets its first token, two whole jobs and a third
    # of it are done
    assert res.saturated_capacity == pytest.approx((2 + 1 / 3) / res.token_times[2][0])


def test_simulate_cli_prints_one_json_line_per_policy_pair(tmp_path, capsys):
    from engine.cli import main

    prof = tmp_path / "profile.json"
    PROFILE.save(str(prof))
    argv = ["simulate", "--profile", str(prof), "--requests", "30", "--max-num-seqs", "4",
            "--num-gpu-blocks", "32", "--output-max", "64", "--prompt-max", "256",
            "--scheduling-policy", "fcfs,skip-join-mlfq", "--swap-policy", "reactive,recompute",
            "--policy-option", "base_quantum_s=0.1", "--swap-ms-per-block", "0.5"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["rate_req_s"] == pytest.approx(0.9 * lines[0]["fcfs_capacity_req_s"], rel=1e-3)
    rows = {(r["scheduling_policy"], r["swap_policy"]): r for r in lines[1:]}
    assert set(rows) == {("fcfs", "reactive"), ("fcfs", "recompute"),
                         ("skip-join-mlfq", "reactive"), ("skip-join-mlfq", "recompute")}
    assert all(r["mean_jct_s"] > 0 and r["p99_jct_s"] >= r["mean_ttft_s"] for r in rows.values())
    assert rows[("skip-join-mlfq", "recompute")]["swap_out_blocks"] == 0
    # a bad name fails before anything runs, with a clear message
    assert main([*argv[:3], "--scheduling-policy", "fcfs,nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no plugin named 'nope'" in err


def test_simulate_cli_scopes_a_policy_option_to_one_policy(tmp_path, capsys):
    from engine.cli import main

    prof = tmp_path / "profile.json"
    PROFILE.save(str(prof))
    base = ["simulate", "--profile", str(prof), "--requests", "12", "--num-gpu-blocks", "32",
            "--output-max", "32", "--prompt-max", "64", "--scheduling-policy", "mlfq,priority"]
    # priority refuses MLFQ knobs unless mlfq=True: unscoped, the knob breaks it...
    assert main([*base, "--policy-option", "base_quantum_s=0.1"]) == 2
    assert "base_quantum_s" in capsys.readouterr().err
    # ...scoped, only mlfq gets it
    assert main([*base, "--policy-option", "mlfq.base_quantum_s=0.1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r["scheduling_policy"] for r in rows] == ["mlfq", "priority"]
    assert main([*base, "--policy-option", "fcfs.base_quantum_s=0.1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "'fcfs' is not one of the policies compared" in err


def test_decode_line_calibrated_on_two_served_runs_recovers_the_true_step_costs():
    # "Served" runs priced by a true decode line (20 ms + 4 ms per extra job); the profile
    # handed to the calibration has a wrong, flat decode curve. Two fcfs runs at t=0, one
    # with a batch cap of 1 and one of 4, pin both the intercept and the slope.
    at_once = [WorkItem(it.prompt_len, it.output_len, 0.0) for it in workload(30)]
    true = CostModel(PrefillProfile(PROFILE.prefill_points,
                                    [(1, 0.020), (2, 0.024), (4, 0.032)]))
    runs = [(lambda seqs=seqs: scheduler(seqs=seqs), at_once,
             simulate(scheduler(seqs=seqs), at_once, true).makespan) for seqs in (1, 4)]
    wrong = CostModel(PrefillProfile(PROFILE.prefill_points, [(1, 0.05), (4, 0.05)]))
    fitted = calibrate_decode_line(runs, wrong)
    assert fitted.step_overhead_s == 0.0
    got = [fitted.profile.decode_step_time(b) for b in (1, 2, 3, 4)]
    assert got == pytest.approx([0.020, 0.024, 0.028, 0.032], rel=1e-6)
    for make, items, measured in runs:  # and it reproduces both makespans
        assert simulate(make(), items, fitted).makespan == pytest.approx(measured, rel=1e-6)
    # A bigger batch that measured faster fits as flat, not as a decreasing line.
    flat = calibrate_decode_line([(runs[0][0], at_once, runs[0][2] * 1.5), runs[1]], wrong)
    assert flat.profile.decode_step_time(1) == pytest.approx(flat.profile.decode_step_time(4))
    with pytest.raises(ValueError, match="two runs"):
        calibrate_decode_line(runs[:1], wrong)


def test_oracle_priority_turns_the_priority_policy_into_shortest_job_first():
    items = [WorkItem(16, 100, 0.0), WorkItem(16, 50, 0.0), WorkItem(16, 2, 0.0)]
    oracle = simulate(scheduler("priority", seqs=1), items, CostModel(PROFILE),
                      priority=lambda it: it.output_len)
    assert oracle.jct[2] < oracle.jct[1] < oracle.jct[0]  # shortest first
    plain = simulate(scheduler("priority", seqs=1), items, CostModel(PROFILE))
    assert plain.jct[0] < plain.jct[1] < plain.jct[2]  # all priority 0: arrival order
    assert oracle.mean_jct < plain.mean_jct


def test_step_overhead_is_added_to_every_step_and_calibrates_to_a_measured_makespan():
    items = workload(30, rate=1.0)
    at_once = [WorkItem(it.prompt_len, it.output_len, 0.0) for it in items]
    base = simulate(scheduler(), at_once, CostModel(PROFILE))
    slow = simulate(scheduler(), at_once, CostModel(PROFILE, step_overhead_s=0.005))
    assert slow.steps == base.steps  # fcfs at t=0: the same steps, each forward 5 ms longer
    assert slow.makespan == pytest.approx(base.makespan + 0.005 * base.forward_steps)
    assert calibrate_overhead(scheduler(), at_once, CostModel(PROFILE),
                              slow.makespan) == pytest.approx(0.005)
    assert calibrate_overhead(scheduler(), at_once, CostModel(PROFILE), 0.0) == 0.0
    with pytest.raises(ValueError, match="t=0"):
        calibrate_overhead(scheduler(), items, CostModel(PROFILE), 10.0)
    with pytest.raises(ValueError, match="step_overhead_s"):
        CostModel(PROFILE, step_overhead_s=-0.001)


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("policy,swap", [
    ("fcfs", "reactive"), ("skip-join-mlfq", "proactive"), ("skip-join-mlfq", "recompute"),
])
def test_a_pipeline_of_depth_p_finishes_every_job_exactly_and_returns_every_block(policy, swap, depth):
    items = workload()
    s = scheduler(policy, swap, depth=depth)
    res = simulate(s, items, CostModel(PROFILE, swap_s_per_block=0.001), check_every=1)
    assert [len(j.output_ids) for j in res.jobs] == [it.output_len for it in items]
    assert s.num_in_flight == 0 and not s.jobs
    assert s.blocks.num_free_gpu_blocks == 32 and s.blocks.num_free_host_blocks == 128


def test_batches_in_flight_overlap_pipeline_stages():
    # Eight equal jobs at once, four per batch: with two stages and two batches in flight
    # each stage works on one batch while the other stage works on the other.
    items = [WorkItem(16, 40, 0.0) for _ in range(8)]
    cost = CostModel(PROFILE)
    one = simulate(scheduler(seqs=4, gpu=64), items, cost)
    two = simulate(scheduler(seqs=4, gpu=64, depth=2), items, cost)
    assert two.output_tokens == one.output_tokens
    assert two.makespan < 0.75 * one.makespan
    assert two.busy_s <= two.makespan + 1e-9
