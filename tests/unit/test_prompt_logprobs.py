"""Prompt logprobs (``SamplingParams.prompt_logprobs``, completions' ``echo`` + ``logprobs``):
the worker's model runner scores each prompt token given the ones before it, and it equals
transformers' ``log_softmax(model(prompt).logits)`` in fp32 -- in one prefill, in chunks
split across steps, beside jobs that do not ask, and once only when a job is preempted and
recomputed. The runner is driven in-process: by hand-written plans (what the worker sees) and
by the real scheduler core with its plans encoded as they are sent."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.memory.kv_cache import KVCachePool
from engine.memory.swap import RecomputePolicy
from engine.models.loader import load_model
from engine.parallel import runner as runner_module
from engine.parallel.protocol import plan_to_message
from engine.parallel.runner import ModelRunner
from engine.policies.fcfs import FCFSPolicy
from engine.request import Job
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from tests.tiny_models import make_tiny_model

BLOCK = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers reference, ours loaded from its saved directory), both fp32."""
    reference = make_tiny_model("llama", seed=7)
    path = tmp_path_factory.mktemp("llama")
    reference.save_pretrained(path)
    ours, _ = load_model(str(path), torch.float32, "cpu")
    return reference, ours


def make_runner(model, num_blocks: int = 64) -> ModelRunner:
    pool = KVCachePool(model.num_layers, num_blocks, BLOCK, model.num_kv_heads, model.head_dim,
                       torch.float32, "cpu")
    return ModelRunner(model, pool, None, BLOCK, torch.device("cpu"))


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def reference_logprobs(reference, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: row p is log P(next token | tokens[: p + 1])."""
    with torch.no_grad():
        logits = reference(torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def greedy(reference, tokens: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(reference_logprobs(reference, tokens + out)[-1].argmax()))
    return out


def assert_match_reference(entries: list, reference, tokens: list[int], k: int) -> None:
    """``entries`` are those of prompt positions 1 .. len(tokens) - 1, in order."""
    ref = reference_logprobs(reference, tokens)
    assert len(entries) == len(tokens) - 1
    for p, (lp, top) in enumerate(entries, start=1):
        assert lp == pytest.approx(ref[p - 1, tokens[p]].item(), abs=ATOL)
        assert len(top) == k
        if k:
            vals, ids = ref[p - 1].topk(k)
            assert [t for t, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=ATOL)


def new(jid: str, tokens: list[int], prompt_logprobs: int | None = None) -> dict:
    params = SamplingParams(temperature=0.0, prompt_logprobs=prompt_logprobs)
    return {"id": jid, "prompt": np.asarray(tokens, dtype=np.int64), "params": params.worker_view()}


def step(runner: ModelRunner, seqs: list, new_jobs: list | None = None) -> dict:
    msg = {"step": 0, "free": [], "new": new_jobs or [], "swap_out": [], "swap_in": [],
           "seqs": seqs}
    return runner.step(msg)


def by_job(reply: dict) -> dict[str, tuple[int, list]]:
    return {jid: (first, entries) for jid, first, entries in reply.get("prompt_logprobs", [])}


# -- the runner, by hand-written plans ----------------------------------------------------------
def test_one_prefill_scores_every_prompt_token_like_transformers(models):
    reference, ours = models
    runner = make_runner(ours)
    a, b = prompt(1, 12), prompt(2, 7)
    reply = step(runner, [["a", 0, 12, [0, 1, 2], True, True], ["b", 0, 7, [3, 4], True, True]],
                 [new("a", a, prompt_logprobs=5), new("b", b)])
    scored = by_job(reply)
    assert set(scored) == {"a"}  # b did not ask: nothing computed or sent for it
    first, entries = scored["a"]
    assert first == 1
    assert_match_reference(entries, reference, a, k=5)
    # Sampling is untouched: both jobs' first tokens are transformers' greedy ones.
    sampled = dict(zip(reply["ids"], reply["tokens"].tolist()))
    assert sampled == {"a": int(reference_logprobs(reference, a)[-1].argmax()),
                       "b": int(reference_logprobs(reference, b)[-1].argmax())}


def test_zero_alternatives_gives_the_prompt_tokens_own_logprobs_only(models):
    reference, ours = models
    runner = make_runner(ours)
    a = prompt(3, 6)
    reply = step(runner, [["a", 0, 6, [0, 1], True, True]], [new("a", a, prompt_logprobs=0)])
    assert_match_reference(by_job(reply)["a"][1], reference, a, k=0)


def test_chunked_prefill_scores_each_position_once_across_steps(models, monkeypatch):
    reference, ours = models
    # Slices of 2 rows through the LM head: a chunk's rows span several slices.
    monkeypatch.setattr(runner_module, "PROMPT_LOGPROBS_ROWS", 2)
    runner = make_runner(ours)
    a, b = prompt(4, 13), prompt(5, 9)
    replies = [
        step(runner, [["a", 0, 5, [0, 1], True, False], ["b", 0, 9, [5, 6, 7], True, True]],
             [new("a", a, prompt_logprobs=3), new("b", b)]),
        step(runner, [["a", 5, 4, [2], False, False], ["b", 9, 1, [], False, True]]),
        step(runner, [["a", 9, 4, [3], False, True], ["b", 10, 1, [], False, True]]),
    ]
    spans = [by_job(r).get("a") for r in replies]
    # Rows at positions 0-4 score tokens 1-5, 5-8 score 6-9, 9-11 score 10-12; the row at
    # position 12 samples the first output token.
    assert [(first, len(entries)) for first, entries in spans] == [(1, 5), (6, 4), (10, 3)]
    assert all(set(by_job(r)) == {"a"} for r in replies)
    assert_match_reference([e for _, es in spans for e in es], reference, a, k=3)


def test_recompute_after_preemption_does_not_score_again(models):
    reference, ours = models
    runner = make_runner(ours)
    a, c = prompt(6, 10), prompt(7, 11)
    r1 = step(runner, [["a", 0, 10, [0, 1, 2], True, True], ["c", 0, 6, [3, 4], True, False]],
              [new("a", a, prompt_logprobs=2), new("c", c, prompt_logprobs=2)])
    assert {j: (f, len(e)) for j, (f, e) in by_job(r1).items()} == {"a": (1, 9), "c": (1, 6)}
    out_a = int(r1["tokens"][0])
    # Both were preempted by recompute: their KV is gone and their prompts are fed again from
    # position 0, into fresh blocks. a has all of its prompt scored, c its first 6 positions.
    r2 = step(runner, [["a", 0, 11, [8, 9, 10], True, True], ["c", 0, 11, [11, 12, 13], True, True]])
    assert {j: (f, len(e)) for j, (f, e) in by_job(r2).items()} == {"c": (7, 4)}
    assert_match_reference(by_job(r1)["c"][1] + by_job(r2)["c"][1], reference, c, k=2)
    # The recomputed KV is right: a's next token is transformers' greedy one.
    assert int(r2["tokens"][0]) == int(reference_logprobs(reference, a + [out_a])[-1].argmax())


# -- the runner under the real scheduler core ------------------------------------------------
def drive(sched: Scheduler, runner: ModelRunner, jobs: list[Job]) -> dict[str, list]:
    """Run the scheduler's plans on the runner until every job finishes, as the scheduler
    actor does; returns each job's prompt-logprob spans as the worker sent them."""
    for job in jobs:
        sched.add(job, 0.0)
    sent: dict[str, list] = {j.job_id: [] for j in jobs}
    now = 0.0
    for _ in range(500):
        if not sched.jobs:
            return sent
        plan = sched.schedule(now)
        reply = runner.step(plan_to_message(plan, 0))
        for jid, first, entries in reply.get("prompt_logprobs", []):
            sent[jid].append((first, len(entries)))
            sched.jobs[jid].add_prompt_logprobs(first, entries)
        now += 0.01
        sched.update(plan, dict(zip(reply["ids"], reply["tokens"].tolist())), 0.01, now)
    raise AssertionError("did not finish")


def job(jid: str, tokens: list[int], prompt_logprobs: int | None, max_tokens: int = 4) -> Job:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            prompt_logprobs=prompt_logprobs)
    return Job(job_id=jid, prompt_ids=tokens, params=params, arrival_time=0.0)


def test_scheduler_chunks_beside_a_job_that_does_not_ask(models):
    reference, ours = models
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=5), FCFSPolicy(), RecomputePolicy(),
                      BlockManager(64, 0, BLOCK))
    a, b = job("a", prompt(8, 13), 4), job("b", prompt(9, 9), None)
    sent = drive(sched, make_runner(ours), [a, b])
    assert len(sent["a"]) > 1 and sent["b"] == []  # a's prompt came in several chunks
    assert_match_reference(a.prompt_logprobs, reference, a.prompt_ids, k=4)
    assert b.prompt_logprobs == []
    for j in (a, b):  # greedy outputs as transformers', the scoring changed nothing
        assert j.output_ids == greedy(reference, j.prompt_ids, 4)


def test_scheduler_recompute_emits_prompt_logprobs_exactly_once(models):
    reference, ours = models
    # 4 GPU blocks of 4 tokens and no host pool: both 7-token prompts fit (2 blocks each),
    # then a's 9th token needs a third block that only b's KV can give, so b is recomputed.
    sched = Scheduler(SchedulerConfig(), FCFSPolicy(), RecomputePolicy(),
                      BlockManager(4, 0, BLOCK))
    a, b = job("a", prompt(10, 7), 2), job("b", prompt(11, 7), 2)
    sent = drive(sched, make_runner(ours, num_blocks=4), [a, b])
    assert b.stats.recomputes >= 1
    for j in (a, b):
        assert sent[j.job_id] == [(1, 6)]  # one span of all 6 positions, never sent again
        assert_match_reference(j.prompt_logprobs, reference, j.prompt_ids, k=2)


def test_prompt_logprobs_are_validated_like_logprobs():
    from engine.sampling import InvalidRequestError

    for bad in (-1, 21, True, 1.5):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(prompt_logprobs=bad)
        assert e.value.param == "prompt_logprobs"
    assert SamplingParams(prompt_logprobs=20).worker_view()["prompt_logprobs"] == 20
    assert "prompt_logprobs" not in SamplingParams().worker_view()


def test_a_job_adds_positions_once_and_refuses_a_gap():
    j = job("a", [5, 6, 7, 8, 9], 1)
    j.add_prompt_logprobs(1, [["p1"], ["p2"]])
    j.add_prompt_logprobs(2, [["p2 again"], ["p3"]])  # overlaps: only position 3 is new
    assert j.prompt_logprobs == [["p1"], ["p2"], ["p3"]]
    with pytest.raises(ValueError):
        j.add_prompt_logprobs(6, [["p6"]])
