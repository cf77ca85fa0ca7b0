"""Workload generators: seeded, published means, arrival statistics, traces, prompt text."""

from __future__ import annotations

import itertools
import json
import statistics

import pytest

from engine.bench.prompts import PromptBuilder
from engine.bench.workload import (
    WorkItem,
    arrival_times,
    build_workload,
    load_trace,
    sample_lengths,
    write_trace,
)

N = 10_000


def test_same_seed_same_workload_other_seed_differs():
    a = build_workload("sharegpt", 200, rate=4.0, seed=7, burstiness=2.0)
    b = build_workload("sharegpt", 200, rate=4.0, seed=7, burstiness=2.0)
    c = build_workload("sharegpt", 200, rate=4.0, seed=8, burstiness=2.0)
    assert a == b
    assert a != c


def test_lengths_do_not_depend_on_rate():
    slow = build_workload("alpaca", 100, rate=1.0, seed=3)
    fast = build_workload("alpaca", 100, rate=50.0, seed=3)
    assert [(i.prompt_len, i.output_len) for i in slow] == [(i.prompt_len, i.output_len) for i in fast]


@pytest.mark.parametrize(("name", "mean_in", "mean_out"), [
    ("sharegpt", 161, 338), ("alpaca", 19.31, 58.45)])
def test_published_means_within_5_percent(name, mean_in, mean_out):
    lengths = sample_lengths(name, N, seed=0)
    ins = statistics.fmean(p for p, _ in lengths)
    outs = statistics.fmean(o for _, o in lengths)
    assert ins == pytest.approx(mean_in, rel=0.05)
    assert outs == pytest.approx(mean_out, rel=0.05)


@pytest.mark.parametrize("name", ["lognormal", "uniform", "fixed"])
def test_parametric_workloads_hit_the_requested_means(name):
    lengths = sample_lengths(name, N, seed=1, input_len=200, output_len=50)
    assert statistics.fmean(p for p, _ in lengths) == pytest.approx(200, rel=0.05)
    assert statistics.fmean(o for _, o in lengths) == pytest.approx(50, rel=0.05)


def test_caps_are_respected():
    lengths = sample_lengths("sharegpt", N, seed=2, max_input_len=64, max_output_len=32)
    assert max(p for p, _ in lengths) == 64
    assert max(o for _, o in lengths) == 32
    assert min(min(p, o) for p, o in lengths) >= 1


def test_unknown_workload_is_refused():
    with pytest.raises(ValueError, match="unknown workload"):
        sample_lengths("nope", 3, seed=0)


def _gaps(times):
    return [b - a for a, b in itertools.pairwise(times)]


def test_poisson_arrivals_have_exponential_gaps():
    gaps = _gaps(arrival_times(N, rate=5.0, seed=0))
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 5.0, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, rel=0.05)  # CV of exponential
    # Memorylessness: P(gap > 2 mean) = e^-2.
    assert sum(g > 2 * mean for g in gaps) / len(gaps) == pytest.approx(0.1353, abs=0.015)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_arrivals_have_the_requested_cv(cv):
    gaps = _gaps(arrival_times(N, rate=2.0, seed=1, burstiness=cv))
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.5, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.08)


def test_infinite_rate_puts_every_arrival_at_zero():
    assert arrival_times(5, float("inf"), seed=0) == [0.0] * 5


def test_trace_round_trip_keeps_its_own_times(tmp_path):
    items = [WorkItem(10, 5, 1.5), WorkItem(3, 2, 0.5), WorkItem(7, 9, 4.0)]
    path = tmp_path / "t.jsonl"
    write_trace(str(path), items)
    got = build_workload(f"trace:{path}", 0, rate=100.0)
    assert [(i.prompt_len, i.output_len, i.arrival_s) for i in got] == [
        (3, 2, 0.0), (10, 5, 1.0), (7, 9, 3.5)]


def test_trace_with_text_counts_tokens_and_reports_bad_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"arrival_s": 0, "prompt": "a b c", "output_len": 4}) + "\n")
    (item,) = load_trace(str(path), count_tokens=lambda s: len(s.split()))
    assert (item.prompt_len, item.prompt) == (3, "a b c")
    path.write_text('{"arrival_s": 0, "output_len": 4}\n')
    with pytest.raises(ValueError, match="t.jsonl:1"):
        load_trace(str(path))


def _tokenizers():
    from engine.models.loader import default_model_path
    from engine.tokenizer import Tokenizer
    from tests.tiny_models import make_tiny_tokenizer

    yield "tiny-bpe", make_tiny_tokenizer().encode
    yield "smollm2", Tokenizer.load(default_model_path()).encode


def test_prompt_text_has_the_requested_token_length():
    for name, encode in _tokenizers():
        builder = PromptBuilder(encode)
        for n in (2, 3, 17, 161, 600):
            texts = {builder.text(n, i) for i in range(3)}
            assert len(texts) == 3 or n < 17, name  # different prompts
            assert [len(encode(t)) for t in texts] == [n] * 3, name
