"""Tensor- and pipeline-parallel workers (gloo on CPU) give the single-process engine's
greedy tokens, keep every rank's KV share in step through swaps, and fail fast when a rank
dies.

Each case starts T x P real worker processes (one torch thread each) that rendezvous over
127.0.0.1. The reference is transformers' greedy generate on the same weights, which the
single-process engine is shown to match token for token in test_engine_greedy.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from engine.api import Engine, EngineDeadError
from engine.config import ParallelConfig, SchedulerConfig
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

PROMPTS = [[(7 * i + 3 * n) % 497 + 3 for i in range(n)] for n in (1, 6, 19, 33, 20, 20, 20, 20)]
NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
# The same, also scoring the prompt: on the last stage, every TP rank takes part in the LM
# head over the prompt rows, and the driver returns their logprobs.
SCORED = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                        prompt_logprobs=2)
# Demotions on a tiny model, and strict priority (a job outside the GPU may evict resident
# ones, no reserve): the swap cycles this test checks every rank through.
TINY_QUANTUM = (("base_quantum_s", 0.002), ("quantum_ratio", 2.0), ("evict_to_admit", True),
                ("admission_reserve_frac", 0.0))
# 16 blocks of 4 tokens hold 64 tokens; the prompts above need ~250 with their outputs, so
# jobs are preempted, swapped (or dropped for recompute) and brought back many times.
SMALL_POOL = 16

# (arch, tp, pp, swap policy or None for a roomy pool, batch cap, GPU blocks): every layout
# on Llama (GQA) and both kinds of parallelism at once on OPT; each swap policy under some
# layout, reactive under (2, 2). Proactive offloading needs idle jobs resident on the GPU:
# a pool for about four jobs and batches of two (two batches in flight at pp=2).
CASES = [
    ("llama", 2, 1, "recompute", 4, SMALL_POOL),
    ("llama", 1, 2, "proactive", 1, 2 * SMALL_POOL),
    ("llama", 2, 2, "reactive", 4, SMALL_POOL),
    ("opt", 2, 2, None, 4, 512),
]


def parallel(tp: int, pp: int) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, torch_threads=1,
                          step_timeout_s=60.0, startup_timeout_s=120.0)


def hf_prompt_logprobs(path: str, prompts: list[list[int]]) -> list[list[float]]:
    """transformers' log P(prompt[p] | prompt[:p]) for p >= 1, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
            outs.append([lp[p - 1, prompt[p]].item() for p in range(1, len(prompt))])
    return outs


async def scored(engine: Engine, prompt: list[int]) -> tuple[list[int], list]:
    """(output ids, the prompt's logprobs as the first output carried them)."""
    ids: list[int] = []
    prompt_lp: list = []
    async for out in engine.generate(prompt, SCORED):
        ids += out.token_ids
        prompt_lp = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_lp
    return ids, prompt_lp


def hf_greedy(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' own greedy tokens: what the single-process engine is tested to give."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
            outs.append(out[0, len(prompt):].tolist())
    return outs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (model dir, reference tokens per prompt). 4 layers: two per stage at pp=2."""
    out = {}
    for arch in ("llama", "opt"):
        path = make_tiny_model_dir(arch, str(tmp_path_factory.mktemp(arch)), num_hidden_layers=4)
        out[arch] = path, hf_greedy(path, PROMPTS, NEW_TOKENS), hf_prompt_logprobs(path, PROMPTS)
    return out


@pytest.mark.parametrize("arch,tp,pp,swap,seqs,gpu_blocks", CASES,
                         ids=[f"{a}-tp{t}-pp{p}-{s or 'roomy'}" for a, t, p, s, _, _ in CASES])
async def test_greedy_tokens_match_through_swap_cycles_and_every_rank_moves_the_same_blocks(
    models, arch, tp, pp, swap, seqs, gpu_blocks
):
    path, reference, prompt_reference = models[arch]
    cfg = tiny_engine_config(path, gpu_blocks=gpu_blocks, host_blocks=128)
    cfg = cfg.replace(parallel=parallel(tp, pp), scheduler=SchedulerConfig(
        policy="mlfq", swap_policy=swap or "reactive", policy_options=TINY_QUANTUM,
        max_num_seqs=seqs, max_num_batched_tokens=64))
    engine = await Engine.create(cfg)
    try:
        ranks = engine.worker_info["ranks"]
        assert sorted(ranks) == list(range(tp * pp))
        assert len({r["pid"] for r in ranks.values()}) == tp * pp
        # Every prompt at once: prefills of different lengths share batches with decodes.
        got = await asyncio.wait_for(asyncio.gather(*(collect(engine, p, GREEDY) for p in PROMPTS)), 180)
        assert [ids for ids, _, _ in got] == reference
        assert all(reason == "length" for _, _, reason in got)
        # Again with the prompts scored: the same tokens, and transformers' prompt logprobs.
        got = await asyncio.wait_for(asyncio.gather(*(scored(engine, p) for p in PROMPTS)), 180)
        assert [ids for ids, _ in got] == reference
        for (_, prompt_lp), want in zip(got, prompt_reference):
            assert prompt_lp[0] is None and len(prompt_lp) == len(want) + 1
            assert [e[0] for e in prompt_lp[1:]] == pytest.approx(want, abs=1e-4)
            assert all(len(e[1]) == 2 for e in prompt_lp[1:])
        assert_pools_whole(await wait_all_blocks_free(engine))
        stats = await engine.stats()
        mem = stats["memory"]
        assert mem["integrity_errors"] == []
        moved = {rank: h["moved_blocks"] for rank, h in (await engine._workers.executor.call_all("health")).items()}
        assert set(moved.values()) == {mem["swap_out_blocks"] + mem["swap_in_blocks"]}, moved
        if swap is None:
            return
        assert stats["num_preemptions"] > 0
        if swap == "recompute":
            assert mem["swap_out_blocks"] == 0
        else:
            assert mem["swap_out_blocks"] > 0 and mem["swap_in_blocks"] == mem["swap_out_blocks"]
        if swap == "proactive":
            assert mem["proactive_out_blocks"] + mem["proactive_in_blocks"] > 0
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------ failure


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("victim", ["non-driver", "driver"])
async def test_killing_a_rank_mid_stream_fails_every_stream_fast_then_the_group_heals(models, victim):
    engine = await Engine.create(tiny_engine_config(models["llama"][0]).replace(parallel=parallel(1, 2)))
    pids = dict(engine._workers.executor.pids)
    everyone = list(pids.values())
    try:
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        started = asyncio.Event()

        async def stream(prompt):
            async for out in engine.generate(prompt, params):
                if out.token_ids:
                    started.set()
            return "finished"

        tasks = [asyncio.create_task(stream(p)) for p in PROMPTS[:3]]
        await asyncio.wait_for(started.wait(), 60)
        rank = engine._workers.executor.driver if victim == "driver" else 0
        os.kill(pids[rank], signal.SIGKILL)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert time.monotonic() - t0 < 10
        assert all(isinstance(r, EngineDeadError) for r in results), results
        # The supervisor replaces the whole group, whichever stage died, and it serves again.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (engine.is_serving and engine.num_restarts == 1):
            assert loop.time() < deadline, "the engine did not heal within 60 s"
            await asyncio.sleep(0.1)
        fresh = engine._workers.executor.pids
        assert sorted(fresh) == sorted(pids) and not set(fresh.values()) & set(pids.values())
        ids, _, reason = await collect(engine, PROMPTS[1], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(ids) == 4 and reason == "length"
        everyone = [*pids.values(), *fresh.values()]  # and the restarted group's
    finally:
        await engine.shutdown()
    assert all(_gone(pid) for pid in everyone), everyone


# ------------------------------------------------------------------ multi-node path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(address: str, rank: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "worker", "--engine", address, "--rank", str(rank)],
                            stdin=subprocess.DEVNULL)


async def test_fastserve_worker_processes_joining_over_tcp_give_the_same_tokens(models):
    """The two-node recipe of docs/distributed.md on one host: the engine starts no worker
    itself; each rank is a `fastserve worker --engine tcp://... --rank R` process."""
    path, reference, _ = models["llama"]
    address = f"tcp://127.0.0.1:{_free_port()}"
    workers = [_start_worker(address, rank) for rank in (0, 1)]
    try:
        cfg = tiny_engine_config(path).replace(parallel=ParallelConfig(
            tensor_parallel_size=1, pipeline_parallel_size=2, torch_threads=1, engine_address=address,
            remote_ranks=(0, 1), startup_timeout_s=120.0, step_timeout_s=60.0))
        engine = await Engine.create(cfg)
        try:
            assert engine._workers.executor.pids == {0: workers[0].pid, 1: workers[1].pid}
            got = await asyncio.wait_for(asyncio.gather(*(collect(engine, p, GREEDY) for p in PROMPTS[:4])), 120)
            assert [ids for ids, _, _ in got] == reference[:4]
        finally:
            await engine.shutdown()
        loop = asyncio.get_running_loop()
        codes = [await loop.run_in_executor(None, w.wait, 20) for w in workers]
        assert codes == [0, 0]  # both left on the engine's shutdown
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(5)
