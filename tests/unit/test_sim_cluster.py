"""The simulator at cluster scale: analytic cost model, Orca-style reservation, the oracle
bound, rejections under overload, and the server's own policy objects."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from engine.bench.workload import WorkItem, build_workload
from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.policies.orca import OrcaFCFSPolicy
from engine.policies.registry import load_class
from engine.request import Job
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sim import simulate
from engine.sim.analytic import AnalyticCost, ClusterConfig
from engine.sim.hardware import GPUS, MODELS
from engine.sim.simulator import build_scheduler

GPT3 = MODELS["gpt3-175b"]


def cost(model="opt-13b", gpu="a100-80gb", tp=1, pp=1, **kw) -> AnalyticCost:
    return AnalyticCost(MODELS[model], GPUS[gpu], ClusterConfig(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw))


# -- model shapes and the cost model ---------------------------------------------------------
@pytest.mark.parametrize(("name", "billions"), [
    ("opt-13b", 12.9), ("opt-66b", 65.7), ("opt-175b", 174.6), ("gpt3-175b", 174.6),
    ("llama3-8b", 8.0), ("llama3-70b", 70.6)])
def test_model_shapes_have_their_published_sizes(name, billions):
    assert MODELS[name].num_params / 1e9 == pytest.approx(billions, rel=0.02)


def test_kv_capacity_is_the_memory_left_after_weights():
    c = cost()  # OPT-13B, one A100-80GB: 0.9 x 80 GiB - 2 GiB - 25.7 GB of weights
    left = 0.9 * 80 * 1024**3 - 2 * 1024**3 - MODELS["opt-13b"].weight_bytes
    assert c.num_gpu_blocks == int(left // (16 * 2 * 40 * 5120 * 2))
    with pytest.raises(ValueError, match="does not fit"):
        cost("gpt3-175b", "a100-80gb", tp=2)
    sixteen = cost("gpt3-175b", "a100-80gb", tp=8, pp=2)
    assert sixteen.num_gpu_blocks * 16 > 100_000  # room for a few hundred ShareGPT jobs


def test_decode_is_memory_bound_and_long_prefill_compute_bound():
    c = cost()
    w = MODELS["opt-13b"].weight_bytes / (GPUS["a100-80gb"].hbm_bytes_s * 0.8)
    assert c.forward_time(1, 1, 100, 101) == pytest.approx(w, rel=0.02)  # reading weights
    flops = 2 * MODELS["opt-13b"].num_layers * MODELS["opt-13b"].layer_params * 2048
    assert c.forward_time(2048, 1, 0, 2048 * 2049 / 2) > flops / (312e12 * 0.6)


def test_tensor_parallelism_adds_all_reduces_and_pipeline_stages_in_flight_help():
    one = cost("opt-66b", "a100-80gb", tp=2)
    two = cost("opt-66b", "a100-80gb", tp=4)
    # weights split 4 ways read twice as fast, but the all-reduces cost something
    assert two.forward_time(1, 1, 512, 513) < one.forward_time(1, 1, 512, 513)
    assert two.forward_time(1, 1, 512, 513) > one.forward_time(1, 1, 512, 513) / 2
    serial = cost("gpt3-175b", tp=8, pp=2, pipeline_in_flight=False)
    flight = cost("gpt3-175b", tp=8, pp=2)
    big_batch = (256, 256, 256 * 512, 256 * 513)
    assert flight.forward_time(*big_batch) < serial.forward_time(*big_batch)


def test_swap_cost_comes_from_pcie_bandwidth():
    c = cost()
    block = 16 * MODELS["opt-13b"].kv_bytes_per_token
    assert c.swap_s_per_block == pytest.approx(block / (32e9 * 0.8))


# -- the simulator drives the server's own objects --------------------------------------------
def test_the_simulators_policy_objects_are_the_servers():
    c = cost()
    for name in ("fcfs", "orca-fcfs", "mlfq", "skip-join-mlfq", "oracle-srpt"):
        core = build_scheduler(SchedulerConfig(policy=name, swap_policy="proactive"), 64, 64, 16,
                               c.profile())
        assert isinstance(core, Scheduler)  # the engine's scheduler core, not a copy
        assert type(core.policy) is load_class("fastserve.scheduling_policies", name)
        assert type(core.swap_policy) is load_class("fastserve.swap_policies", "proactive")
        assert type(core.blocks) is BlockManager
    sj = build_scheduler(SchedulerConfig(policy="skip-join-mlfq"), 64, 64, 16, c.profile())
    assert sj.policy.profile == c.profile()  # skip-join reads the cost model's prefill times


def test_overload_is_counted_as_rejections_not_a_traceback():
    c = cost()
    cfg = SchedulerConfig(policy="skip-join-mlfq", swap_policy="reactive", max_num_seqs=32,
                          max_waiting=16)
    core = build_scheduler(cfg, 400, 800, 16, c.profile())
    items = build_workload("sharegpt", 300, rate=200.0, seed=1)  # ~10x what 32 seqs serve
    res = simulate(core, items, c, max_model_len=2048)
    assert res.rejected and len(res.rejected) + len(res.jct) == 300
    assert sum(r.rejected for r in res.records) == len(res.rejected)
    from engine.bench.metrics import summarize

    s = summarize(res.records)
    assert s["rejected"] == len(res.rejected) and s["completed"] == len(res.jct)


def test_simulate_cli_analytic_mode_writes_bench_result_files(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "sim.json"
    argv = ["simulate", "--model-shape", "opt-13b", "--gpu", "a100-80gb", "-tp", "1", "-pp", "1",
            "--workload", "alpaca", "--request-rate", "2,4", "--num-prompts", "40",
            "--scheduling-policy", "fcfs,skip-join-mlfq", "--swap-policy", "proactive",
            "--output", str(out)]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and all(r["completed"] == 40 for r in lines)
    res = json.loads((tmp_path / "sim-skip-join-mlfq-proactive.json").read_text())
    assert res["source"] == "simulate" and res["cost_model"]["gpu"] == "a100-80gb"
    assert [r["request_rate"] for r in res["results"]] == [2.0, 4.0]
    assert len(res["results"][0]["requests"]) == 40 and res["results"][0]["mean_tpot_ms"] > 0
    from engine.bench.report import write_report

    files = write_report([str(tmp_path / "sim-fcfs-proactive.json"),
                          str(tmp_path / "sim-skip-join-mlfq-proactive.json")], str(tmp_path / "r"))
    assert all((tmp_path / "r" / f).exists() for f in ("jct_vs_rate.png", "summary.md")) and files


# -- Orca-style reservation and the oracle ----------------------------------------------------
def _job(i: int, prompt: int, out: int, max_len: int = 64) -> Job:
    return Job(f"j{i}", [1] * prompt, SamplingParams(max_tokens=out, ignore_eos=True), float(i),
               max_model_len=max_len)


def test_orca_reserves_max_length_up_front_and_admits_in_arrival_order():
    blocks = BlockManager(8, 0, 16)  # 128 tokens: two jobs of max length 64
    policy = OrcaFCFSPolicy()
    policy.bind_memory(blocks)
    core = Scheduler(SchedulerConfig(max_num_seqs=8), policy, load_class(
        "fastserve.swap_policies", "recompute")(), blocks)
    for i in range(3):
        core.add(_job(i, 4, 2), 0.0)
    plan = core.schedule(0.0)
    assert [s.job.job_id for s in plan.seqs] == ["j0", "j1"]  # j2 waits for room
    assert blocks.num_free_gpu_blocks == 0  # each holds 4 blocks for 64 tokens, not 1
    core.check_integrity()


def test_orca_never_lets_a_later_job_slip_past_one_waiting_for_room():
    blocks = BlockManager(8, 0, 16)
    policy = OrcaFCFSPolicy(reserve="max_tokens")
    policy.bind_memory(blocks)
    core = Scheduler(SchedulerConfig(max_num_seqs=8), policy, load_class(
        "fastserve.swap_policies", "recompute")(), blocks)
    core.add(_job(0, 60, 20, 128), 0.0)  # 80 tokens: 5 blocks
    core.add(_job(1, 60, 20, 128), 0.0)  # needs 5 more: only 3 left
    core.add(_job(2, 4, 4, 128), 0.0)  # 1 block would fit, but it is not its turn
    plan = core.schedule(0.0)
    assert [s.job.job_id for s in plan.seqs] == ["j0"]
    assert core.num_preemptions == 0


def test_oracle_srpt_runs_the_job_with_least_work_left_first():
    policy = load_class("fastserve.scheduling_policies", "oracle-srpt")()
    long, short = _job(0, 4, 50), _job(1, 4, 10)
    policy.admit(long, 0.0)
    policy.admit(short, 0.0)
    assert [j.job_id for j in policy.order(0.0)] == ["j1", "j0"]
    long.output_ids = [1] * 45  # 5 left
    assert [j.job_id for j in policy.order(0.0)] == ["j0", "j1"]


def test_oracle_is_a_lower_bound_on_mean_jct_in_a_small_overloaded_run():
    c = cost()
    items = [WorkItem(it.prompt_len, it.output_len, it.arrival_s)
             for it in build_workload("alpaca", 120, rate=60.0, seed=2)]
    jct = {}
    for name in ("fcfs", "skip-join-mlfq", "oracle-srpt"):
        cfg = SchedulerConfig(policy=name, max_num_seqs=8)
        jct[name] = simulate(build_scheduler(cfg, 200, 400, 16, c.profile()), items, c).mean_jct
    # knowing every length, shortest-remaining-first beats both length-blind policies
    assert jct["oracle-srpt"] < min(jct["skip-join-mlfq"], jct["fcfs"])


def test_simulate_replays_a_recorded_trace_at_its_own_times(tmp_path, capsys):
    from engine.bench.workload import write_trace
    from engine.cli import main

    trace = tmp_path / "t.jsonl"
    write_trace(str(trace), [WorkItem(20, 5, 0.0), WorkItem(30, 4, 0.5), WorkItem(10, 6, 2.0)])
    out = tmp_path / "r.json"
    assert main(["simulate", "--model-shape", "llama3-8b", "--gpu", "h100",
                 "--workload", f"trace:{trace}", "--request-rate", "inf", "--num-prompts", "0",
                 "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"][0]["requests"]
    assert [r["arrival_s"] for r in rows] == [0.0, 0.5, 2.0]
    assert [r["output_tokens"] for r in rows] == [5, 4, 6]
    capsys.readouterr()


def test_simulate_load_is_a_fraction_of_the_simulated_fcfs_capacity(capsys):
    from engine.cli import main

    assert main(["simulate", "--model-shape", "llama3-8b", "--gpu", "h100", "--workload",
                 "alpaca", "--num-prompts", "60", "--load", "0.5", "--max-num-seqs", "8",
                 "--scheduling-policy", "skip-join-mlfq", "--swap-policy", "proactive"]) == 0
    first, row = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["rate_req_s"] == pytest.approx(0.5 * first["fcfs_capacity_req_s"], rel=1e-3)
    assert row["request_rate"] == pytest.approx(first["rate_req_s"], rel=1e-3)
    assert row["completed"] == 60


def test_simulate_cli_at_ten_times_capacity_reports_rejections(capsys):
    from engine.cli import main

    assert main(["simulate", "--model-shape", "opt-13b", "--gpu", "a100-80gb", "--workload",
                 "alpaca", "--num-prompts", "150", "--load", "10", "--max-num-seqs", "8",
                 "--max-waiting", "8", "--scheduling-policy", "fcfs,orca-fcfs",
                 "--swap-policy", "reactive"]) == 0
    first, *rows = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["rate_req_s"] == pytest.approx(10 * first["fcfs_capacity_req_s"], rel=1e-3)
    assert len(rows) == 2
    for row in rows:
        assert row["rejected"] > 0 and row["completed"] + row["rejected"] == 150


def test_the_capacity_run_keeps_a_queue_long_after_the_kv_cache_is_full():
    from engine.sim.simulator import capacity_jobs, concurrent_jobs, fcfs_capacity

    c = cost()
    kv_blocks = 2000  # 32,000 tokens: about 100 ShareGPT-like jobs at once

    def sharegpt(n: int) -> list[WorkItem]:
        return [WorkItem(it.prompt_len, it.output_len)
                for it in build_workload("sharegpt", n, rate=math.inf)]

    def core():
        cfg = SchedulerConfig(policy="fcfs", swap_policy="reactive", max_num_seqs=256,
                              max_waiting=1 << 30, max_waiting_tokens=None)
        return build_scheduler(cfg, kv_blocks, 4 * kv_blocks, 16, c.profile())

    base = sharegpt(400)
    at_once = concurrent_jobs(base, kv_blocks * 16, 256)
    assert at_once == pytest.approx(
        kv_blocks * 16 / statistics.fmean(it.prompt_len + it.output_len / 2 for it in base))
    n = capacity_jobs(base, kv_blocks * 16, 256)
    assert n == math.ceil(8 * at_once)
    res = simulate(core(), sharegpt(n), c, max_model_len=2048)
    # Most jobs waited for room: what the run measures is a batch bounded by the KV cache,
    # with a queue behind it, not a burst in which every job started at t=0.
    waited = sum(1 for j in res.jobs if j.stats.first_scheduled_time > 1.0)
    assert waited > n / 2
    assert fcfs_capacity(core(), sharegpt(n), c, 2048) == pytest.approx(res.saturated_capacity)
