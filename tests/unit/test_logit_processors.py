"""Logit processors of the batched sampler (presence / frequency / repetition penalties,
min-p, logit_bias, min_tokens), each against a reference written in plain numpy from the
OpenAI / vLLM definitions (``tests/logit_reference.py``; min-p's here), in mixed batches
where only some rows ask.

The reference keeps each job's prompt and generated tokens as Python lists and recomputes
everything from them; the sampler keeps counts on the device and updates them per draw.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.sampler import Sampler, race_noise
from engine.sampling import InvalidRequestError, SamplingParams, check_vocab
from tests import logit_reference as reference

VOCAB = 64
EOS = 7


def ref_process(logits: np.ndarray, prompt: list[int], output: list[int], p: SamplingParams,
                eos: tuple[int, ...] = (EOS,)) -> np.ndarray:
    return reference.process(logits, prompt, output, p, eos)


def make(jobs: dict[str, tuple[SamplingParams, list[int]]], seed: int = 0) -> Sampler:
    s = Sampler(seed=seed)
    for jid, (p, prompt) in jobs.items():
        s.add(jid, p.worker_view((EOS,)), np.asarray(prompt, dtype=np.int64))
    return s


def logits_for(step: int, rows: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, VOCAB, generator=g) * scale


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-6, atol=1e-5, equal_nan=False)
                and np.array_equal(np.isinf(a), np.isinf(b)))


# -- the penalties, over many steps, in a mixed batch -------------------------------------------
PENALISED = {
    "plain": SamplingParams(temperature=0.0, max_tokens=64),
    "presence": SamplingParams(temperature=0.0, max_tokens=64, presence_penalty=1.5),
    "frequency": SamplingParams(temperature=0.0, max_tokens=64, frequency_penalty=0.7),
    "repetition": SamplingParams(temperature=0.0, max_tokens=64, repetition_penalty=1.8),
    "negative": SamplingParams(temperature=0.0, max_tokens=64, presence_penalty=-1.0,
                               frequency_penalty=-0.3, repetition_penalty=0.6),
    "all": SamplingParams(temperature=0.0, max_tokens=64, presence_penalty=0.5,
                          frequency_penalty=0.5, repetition_penalty=1.3,
                          logit_bias={"3": 2.0, "60": -5.0}, min_tokens=4,
                          stop_token_ids=(11,)),
}


def test_penalties_match_the_reference_step_by_step_in_a_mixed_batch():
    rng = random.Random(0)
    # Twelve jobs: more than the counts table's first allocation, so it grows mid-run.
    names = [f"{kind}{k}" for k in range(2) for kind in PENALISED]
    prompts = {n: [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))] for n in names}
    params = {n: PENALISED[n[:-1]] for n in names}
    s = make({n: (params[n], prompts[n]) for n in names})
    outputs: dict[str, list[int]] = {n: [] for n in names}
    changed = 0  # draws of penalised rows that differ from the raw argmax
    for step in range(25):
        # A job is not in every step (as when preempted or left out of the batch).
        batch = [n for n in names if rng.random() < 0.7] or names[:1]
        logits = logits_for(step, len(batch))
        processed = s.process(logits, batch).numpy()
        for i, n in enumerate(batch):
            want = ref_process(logits[i].numpy(), prompts[n], outputs[n], params[n])
            assert close(processed[i], want), (step, n)
        tokens = s.sample(logits, batch).token_ids
        for i, n in enumerate(batch):
            ref = ref_process(logits[i].numpy(), prompts[n], outputs[n], params[n])
            assert tokens[i] == int(np.argmax(ref)), (step, n)
            changed += tokens[i] != int(logits[i].argmax())
            outputs[n].append(tokens[i])
    assert changed > 10  # the processors did change what was drawn
    table = s.processors.counts.counts
    assert table is not None and table.shape[0] >= 16  # the table grew


def test_counts_are_exact_in_the_table_and_rows_are_reused_after_remove():
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    s = make({"a": (p, [1, 2]), "b": (p, [3])})
    drawn: dict[str, list[int]] = {"a": [], "b": []}
    for step in range(10):
        ids = ["a", "b"] if step % 3 else ["b"]
        toks = s.sample(logits_for(step, len(ids)), ids).token_ids
        for jid, t in zip(ids, toks):
            drawn[jid].append(t)
    table = s.processors.counts.counts
    assert table is not None
    for jid in ("a", "b"):
        row = table[s._jobs[jid].procs.slot].tolist()
        assert row == np.bincount(drawn[jid], minlength=VOCAB).tolist()
    slot_a = s._jobs["a"].procs.slot
    s.remove("a")
    s.add("c", p.worker_view(), np.asarray([5]))
    s.sample(logits_for(99, 1), ["c"])
    assert s._jobs["c"].procs.slot == slot_a  # the freed row, zeroed before reuse
    assert int(table[slot_a].sum()) == 1


def test_repetition_penalty_counts_the_prompt_but_frequency_and_presence_do_not():
    logits = torch.full((2, VOCAB), 2.0)
    logits[:, 9] = -2.0
    s = make({"rep": (SamplingParams(repetition_penalty=2.0), [5, 9]),
              "freq": (SamplingParams(frequency_penalty=2.0, presence_penalty=2.0), [5, 9])})
    out = s.process(logits, ["rep", "freq"])
    assert out[0, 5] == 1.0 and out[0, 9] == -4.0 and out[0, 6] == 2.0
    assert torch.equal(out[1], logits[1])  # nothing generated yet


# -- logit_bias and min_tokens ------------------------------------------------------------------
def test_logit_bias_adds_to_its_rows_only():
    logits = logits_for(0, 3)
    p1 = SamplingParams(logit_bias={"0": 100, "5": -100, "63": 0.5})
    p2 = SamplingParams(logit_bias={5: 3.25})
    s = make({"a": (p1, [1]), "b": (SamplingParams(), [1]), "c": (p2, [1])})
    out = s.process(logits, ["a", "b", "c"]).numpy()
    for i, p in enumerate([p1, SamplingParams(), p2]):
        assert close(out[i], ref_process(logits[i].numpy(), [1], [], p))
    assert s.sample(logits, ["a", "b", "c"]).token_ids[0] == 0  # +100: all but certain


def test_a_bias_of_100_forces_and_minus_100_bans_a_token_when_sampling():
    logits = logits_for(1, 1)
    top = int(logits[0].argmax())
    s = make({"force": (SamplingParams(seed=3, logit_bias={"17": 100}), [1]),
              "ban": (SamplingParams(temperature=0.0, logit_bias={str(top): -100}), [1])})
    for step in range(20):
        got = s.sample(torch.cat([logits, logits]), ["force", "ban"]).token_ids
        assert got[0] == 17 and got[1] != top


def test_min_tokens_masks_eos_and_stop_ids_until_enough_tokens_are_generated():
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = 10.0  # EOS is by far the most likely...
    logits[:, 11] = 9.0  # ...then the stop id
    s = make({"min": (SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(11,)), [1]),
              "ignore": (SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), [1]),
              "plain": (SamplingParams(temperature=0.0), [1])})
    got = [s.sample(logits, ["min", "ignore", "plain"]).token_ids for _ in range(5)]
    # With EOS and 11 masked every logit left is 0: the argmax is the first, id 0.
    assert [g[0] for g in got] == [0, 0, 0, EOS, EOS]
    assert all(g[1] == EOS for g in got)  # ignore_eos: EOS is not masked (it does not stop)
    assert all(g[2] == EOS for g in got)


def test_min_tokens_counts_only_the_jobs_draws():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 5.0
    s = make({"a": (SamplingParams(temperature=0.0, min_tokens=2), [1]),
              "b": (SamplingParams(temperature=0.0), [1])})
    for _ in range(4):  # "a" sits these steps out
        assert s.sample(logits, ["b"]).token_ids == [EOS]
    assert s.sample(logits, ["a"]).token_ids != [EOS]
    assert s.sample(logits, ["a"]).token_ids != [EOS]
    assert s.sample(logits, ["a"]).token_ids == [EOS]


# -- min-p --------------------------------------------------------------------------------------
@pytest.mark.parametrize("min_p,temperature", [(0.05, 1.0), (0.3, 0.7), (0.9, 1.5)])
def test_min_p_draws_equal_the_reference_race_over_the_kept_tokens(min_p, temperature):
    """A seeded job's draws replayed: softmax(logits / T), tokens below min_p x max dropped,
    then the exponential race with the job's own noise."""
    logits = logits_for(5, 2, scale=1.5)
    p = SamplingParams(temperature=temperature, min_p=min_p, seed=11)
    other = SamplingParams(temperature=1.0, seed=12)  # a row without min_p, same batch
    s = make({"m": (p, [1]), "o": (other, [1])})
    gen_m = torch.Generator().manual_seed(11)
    gen_o = torch.Generator().manual_seed(12)
    kept_sizes = set()
    for _ in range(30):
        got = s.sample(logits, ["m", "o"]).token_ids
        probs = np.exp(logits[0].numpy().astype(np.float64) / temperature)
        probs /= probs.sum()
        keep = probs >= min_p * probs.max()
        kept_sizes.add(int(keep.sum()))
        noise = race_noise((1, VOCAB), gen_m, torch.float32, torch.device("cpu"))[0].double()
        want = int(np.argmax(np.where(keep, probs, 0.0) / noise.numpy()))
        assert got[0] == want
        assert keep[got[0]]
        probs_o = torch.softmax(logits[1:2] / 1.0, dim=-1)
        noise_o = race_noise((1, VOCAB), gen_o, torch.float32, torch.device("cpu"))
        assert got[1] == int((probs_o / noise_o).argmax())
    assert max(kept_sizes) < VOCAB  # min_p did drop tokens


def test_min_p_of_one_keeps_only_the_most_likely_token():
    logits = logits_for(6, 1)
    s = make({"m": (SamplingParams(temperature=1.0, min_p=1.0), [1])})
    assert {s.sample(logits, ["m"]).token_ids[0] for _ in range(20)} == {int(logits.argmax())}


# -- neutral values cost nothing and change nothing ---------------------------------------------
def test_neutral_values_send_nothing_to_the_worker_and_leave_the_logits_alone():
    neutral = SamplingParams(presence_penalty=0.0, frequency_penalty=0, repetition_penalty=1.0,
                             min_p=0.0, logit_bias={}, min_tokens=0)
    assert neutral.worker_view((EOS,)) == SamplingParams().worker_view((EOS,))
    logits = logits_for(7, 2)
    s = make({"a": (neutral, [1]), "b": (SamplingParams(seed=4), [1])})
    assert s.process(logits, ["a", "b"]) is logits  # no copy, no work
    plain = make({"a": (SamplingParams(), [1]), "b": (SamplingParams(seed=4), [1])})
    for _ in range(5):
        assert s.sample(logits, ["a", "b"]).token_ids == plain.sample(logits, ["a", "b"]).token_ids
    assert s.processors.counts.counts is None  # never allocated


def test_logprobs_stay_those_of_the_raw_logits():
    logits = logits_for(8, 1)
    s = make({"a": (SamplingParams(temperature=0.0, logprobs=2, logit_bias={"9": 100},
                                   repetition_penalty=3.0), [1, 2, 3])})
    res = s.sample(logits, ["a"])
    assert res.token_ids == [9]
    assert res.logprobs is not None
    assert res.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[9]), abs=1e-6)


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": True}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 1.0}, "min_tokens"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
    ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {" 1": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1.0": 1}}, "logit_bias"),
    ({"logit_bias": {"\u0661": 1}}, "logit_bias"),  # an Arabic-Indic digit: int() takes it
    ({"logit_bias": {"1": 100.5}}, "logit_bias"),
    ({"logit_bias": {"1": float("nan")}}, "logit_bias"),
    ({"logit_bias": {"1": True}}, "logit_bias"),
    ({"logit_bias": {"1": 1, "01": 2}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": "x"}, "logit_bias"),
])
def test_invalid_values_are_refused_naming_the_field(kw, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_logit_bias_is_normalised_and_round_trips_through_to_dict():
    p = SamplingParams(logit_bias={"12": 1, 3: -2.5, "300": 100})
    assert p.logit_bias == ((3, -2.5), (12, 1.0), (300, 100.0))
    assert p.to_dict()["logit_bias"] == {"3": -2.5, "12": 1.0, "300": 100.0}
    assert SamplingParams(**{**p.to_dict(), "extra": {}}) == p
    assert len(SamplingParams(logit_bias={str(i): 1 for i in range(300)}).logit_bias) == 300


def test_logit_bias_ids_are_checked_against_the_vocabulary():
    check_vocab(SamplingParams(logit_bias={"63": 1}), VOCAB)
    with pytest.raises(InvalidRequestError) as e:
        check_vocab(SamplingParams(logit_bias={"64": 1}), VOCAB)
    assert e.value.param == "logit_bias"


def test_worker_view_masks_eos_only_without_ignore_eos():
    p = SamplingParams(min_tokens=2, stop_token_ids=(4,))
    assert p.worker_view((EOS,))["min_tokens_ids"] == [4, EOS]
    q = SamplingParams(min_tokens=2, stop_token_ids=(4,), ignore_eos=True)
    assert q.worker_view((EOS,))["min_tokens_ids"] == [4]
    assert "min_tokens" not in SamplingParams(min_tokens=2, ignore_eos=True).worker_view((EOS,))
