"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Statistical checks draw with fixed seeds, so they are deterministic, and their tolerances
are several standard deviations wide.
"""

from __future__ import annotations

import pytest
import torch

from engine.sampler import TOP_P_CANDIDATES, Sampler, top_k_top_p
from engine.sampling import SamplingParams

VOCAB = 1000


def params(**kw) -> dict:
    return SamplingParams(**kw).worker_view()


def sampler_with(jobs: dict[str, dict], seed: int | None = 0) -> Sampler:
    s = Sampler(seed=seed)
    for job_id, p in jobs.items():
        s.add(job_id, p)
    return s


def random_logits(rows: int, seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def sample_same_logits(logits_row: torch.Tensor, p: dict, n: int, seed: int = 0) -> list[int]:
    """``n`` independent draws from one distribution, as one batch of ``n`` unseeded jobs."""
    s = sampler_with({f"j{i}": p for i in range(n)}, seed=seed)
    return s.sample(logits_row.expand(n, -1).contiguous(), [f"j{i}" for i in range(n)]).token_ids


# -- greedy and its equivalents -----------------------------------------------------------------
def test_greedy_is_argmax_for_every_row():
    logits = random_logits(6, seed=1)
    s = sampler_with({f"j{i}": params(temperature=0.0) for i in range(6)})
    assert s.sample(logits, [f"j{i}" for i in range(6)]).token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = random_logits(4, seed=2)
    s = sampler_with({"g0": params(temperature=0.0), "r": params(temperature=1.0),
                      "g1": params(temperature=0.0, seed=5), "r2": params(top_p=0.5)})
    out = s.sample(logits, ["g0", "r", "g1", "r2"]).token_ids
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


@pytest.mark.parametrize("seed", [None, 7])
def test_top_k_one_is_greedy(seed):
    logits = random_logits(5, seed=3)
    s = sampler_with({f"j{i}": params(temperature=1.5, top_k=1, seed=seed) for i in range(5)})
    for _ in range(3):
        assert s.sample(logits, [f"j{i}" for i in range(5)]).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("top_k", [0, 50])
def test_tiny_top_p_is_greedy(top_k):
    logits = random_logits(5, seed=4)
    s = sampler_with({f"j{i}": params(temperature=1.0, top_p=1e-6, top_k=top_k) for i in range(5)})
    for _ in range(3):
        assert s.sample(logits, [f"j{i}" for i in range(5)]).token_ids == logits.argmax(-1).tolist()


def test_near_zero_temperature_is_greedy_not_overflow():
    logits = random_logits(3, seed=5)
    s = sampler_with({f"j{i}": params(temperature=1e-7) for i in range(3)})
    assert s.sample(logits, ["j0", "j1", "j2"]).token_ids == logits.argmax(-1).tolist()


# -- seeds --------------------------------------------------------------------------------------
SEEDED = params(temperature=0.9, top_p=0.95, top_k=200, seed=1234)


def run_seeded(batch: list[tuple[str, dict]], steps: int = 12) -> list[int]:
    """Tokens of job "target" over ``steps`` steps, in batches shaped by ``batch``."""
    s = sampler_with(dict(batch), seed=None)
    ids = [job_id for job_id, _ in batch]
    target = ids.index("target")
    tokens = []
    for step in range(steps):
        logits = random_logits(len(ids), seed=100 + step)
        logits[target] = random_logits(1, seed=500 + step)[0]  # the target's own logits
        tokens.append(s.sample(logits, ids).token_ids[target])
    return tokens


@pytest.mark.parametrize("target", [
    SEEDED,
    params(temperature=1.0, seed=99),  # no filtering: drawn from the whole vocabulary
    params(temperature=0.7, top_p=0.8, seed=3),  # top-p alone
    params(temperature=1.2, top_k=5, seed=3),  # top-k alone
])
def test_same_seed_gives_same_tokens_whatever_the_batch(target):
    alone = run_seeded([("target", target)])
    others = [
        [("a", params(temperature=1.0)), ("target", target), ("b", params(temperature=0.0))],
        [("x", params(temperature=0.5, seed=1234)), ("y", params(top_k=1000)), ("target", target)],
        [("target", target)] + [(f"u{i}", params(top_p=0.3, top_k=3)) for i in range(6)],
    ]
    for batch in others:
        assert run_seeded(batch) == alone


@pytest.mark.parametrize("target", [SEEDED, params(temperature=0.9, top_p=0.95, seed=7)])
def test_seeded_sample_survives_last_bit_changes_that_reorder_near_equal_candidates(target):
    # A near-flat distribution, as a tiny random model gives: many candidates within a few
    # ulps of each other, so a last-bit change in the logits (another batch composition,
    # another kernel) reorders them. The noise belongs to the token id, not to its rank,
    # so the same token must win.
    flat = random_logits(1, seed=11, scale=1e-3)
    jitter = torch.randn(flat.shape, generator=torch.Generator().manual_seed(12)) * 1e-6
    ranks = lambda logits: logits.topk(50).indices.tolist()
    assert ranks(flat) != ranks(flat + jitter)  # the jitter does reorder candidates
    for seed in range(40):
        p = {**target, "seed": seed}
        a = sampler_with({"t": p}, seed=None).sample(flat, ["t"]).token_ids
        b = sampler_with({"t": p}, seed=None).sample(flat + jitter, ["t"]).token_ids
        assert a == b, seed


def test_different_seeds_give_different_tokens():
    a = run_seeded([("target", {**SEEDED, "seed": 1})], steps=20)
    b = run_seeded([("target", {**SEEDED, "seed": 2})], steps=20)
    assert a != b


def test_seeded_sampler_is_reproducible_for_unseeded_jobs():
    logits = random_logits(8, seed=6)
    jobs = {f"j{i}": params(temperature=1.0) for i in range(8)}
    a = sampler_with(jobs, seed=42).sample(logits, list(jobs)).token_ids
    b = sampler_with(jobs, seed=42).sample(logits, list(jobs)).token_ids
    assert a == b


# -- the sampled distribution -------------------------------------------------------------------
LOGITS4 = torch.tensor([2.0, 1.0, 0.0, -1.0])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    n = 20000
    freq = frequencies(sample_same_logits(LOGITS4, params(temperature=temperature), n), 4)
    expected = torch.softmax(LOGITS4.double() / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.015)  # ~4 standard deviations


def test_higher_temperature_is_flatter():
    n = 5000
    cold = frequencies(sample_same_logits(LOGITS4, params(temperature=0.5), n), 4)
    hot = frequencies(sample_same_logits(LOGITS4, params(temperature=2.0), n), 4)
    assert cold[0] > 0.8 and hot[0] < 0.5 and hot[3] > cold[3]


def test_top_k_keeps_only_the_k_most_likely_renormalised():
    freq = frequencies(sample_same_logits(LOGITS4, params(temperature=1.0, top_k=2), 20000), 4)
    assert freq[2] == 0 and freq[3] == 0
    expected = torch.softmax(LOGITS4[:2].double(), -1)
    assert torch.allclose(freq[:2], expected, atol=0.015)


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.8, 2), (0.81, 3), (0.96, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    weights, ids = top_k_top_p(probs, [0], [top_p])
    assert ids.tolist() == [[0, 1, 2, 3]]
    assert (weights[0] > 0).sum() == kept
    assert torch.equal(weights[0, :kept], probs[0, :kept])


def test_top_p_applies_to_what_top_k_kept():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top-k 2 renormalises to [4/7, 3/7]: top_p 0.5 then keeps only the first.
    weights, ids = top_k_top_p(probs, [2], [0.5])
    assert ids.tolist() == [[0, 1]]  # the candidates are what top-k kept
    assert (weights[0] > 0).tolist() == [True, False]
    weights, _ = top_k_top_p(probs, [0], [0.5])  # without top-k: 0.4 < 0.5, two kept
    assert (weights[0] > 0).sum() == 2


def test_top_p_wider_than_the_candidate_window_falls_back_to_the_whole_vocab():
    vocab = 3 * TOP_P_CANDIDATES
    probs = torch.full((1, vocab), 1.0 / vocab)
    weights, ids = top_k_top_p(probs, [0], [0.9])
    kept = ids[0][weights[0] > 0]
    assert abs(len(kept) - 0.9 * vocab) <= 2
    tokens = sample_same_logits(torch.zeros(vocab), params(temperature=1.0, top_p=0.9), 2000)
    assert len(set(tokens)) > TOP_P_CANDIDATES // 2 and max(tokens) > TOP_P_CANDIDATES


def test_top_p_draws_match_the_nucleus_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    freq = frequencies(sample_same_logits(logits, params(temperature=1.0, top_p=0.8), 20000), 4)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.5 / 0.8) < 0.015


def test_disabled_top_k_values_filter_nothing():
    for top_k in (0, -1, VOCAB, VOCAB + 5):
        probs = torch.softmax(random_logits(2, seed=7), -1)
        weights, _ = top_k_top_p(probs, [top_k] * 2, [1.0] * 2)
        assert (weights > 0).all()


def test_callers_logits_are_not_modified():
    logits = random_logits(3, seed=8)
    before = logits.clone()
    s = sampler_with({"a": params(top_k=3), "b": params(top_p=0.5, seed=1), "c": params()})
    s.sample(logits, ["a", "b", "c"])
    assert torch.equal(logits, before)


# -- logprobs -----------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = random_logits(3, seed=9)
    s = sampler_with({"a": params(temperature=0.5, logprobs=3), "b": params(temperature=0.0),
                      "c": params(temperature=0.0, logprobs=0)})
    r = s.sample(logits, ["a", "b", "c"])
    lp = torch.log_softmax(logits, -1)
    assert r.logprobs is not None and r.top_logprobs is not None
    assert r.logprobs[0] == pytest.approx(lp[0, r.token_ids[0]].item(), abs=1e-5)
    top = lp[0].topk(3)
    assert [t for t, _ in r.top_logprobs[0]] == top.indices.tolist()
    assert [v for _, v in r.top_logprobs[0]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert r.logprobs[1] is None and r.top_logprobs[1] is None  # did not ask
    assert r.logprobs[2] == pytest.approx(lp[2].max().item(), abs=1e-5)
    assert r.top_logprobs[2] == []


def test_no_logprobs_when_no_row_asks():
    s = sampler_with({"a": params(), "b": params(temperature=0.0)})
    r = s.sample(random_logits(2, seed=10), ["a", "b"])
    assert r.logprobs is None and r.top_logprobs is None


def test_top_logprobs_of_different_sizes_in_one_batch():
    logits = random_logits(2, seed=11)
    s = sampler_with({"a": params(logprobs=1), "b": params(logprobs=5)})
    r = s.sample(logits, ["a", "b"])
    assert r.top_logprobs is not None
    assert [len(t or []) for t in r.top_logprobs] == [1, 5]


# -- bookkeeping --------------------------------------------------------------------------------
def test_unknown_or_removed_job_is_an_error():
    s = sampler_with({"a": params()})
    s.remove("a")
    s.remove("never-added")  # removing twice is harmless
    with pytest.raises(KeyError, match="'a'"):
        s.sample(random_logits(1, seed=12), ["a"])


def test_logits_rows_must_match_jobs():
    s = sampler_with({"a": params()})
    with pytest.raises(ValueError):
        s.sample(random_logits(2, seed=13), ["a"])


def test_top_k_minus_one_means_disabled():
    s = sampler_with({"a": params(top_k=-1, temperature=0.0)})
    logits = random_logits(1, seed=14)
    assert s.sample(logits, ["a"]).token_ids == logits.argmax(-1).tolist()
