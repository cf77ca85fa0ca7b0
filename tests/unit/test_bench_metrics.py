"""Benchmark metrics against hand-computed examples."""

from __future__ import annotations

import pytest

from engine.bench.metrics import SLO, RequestRecord, percentile, summarize


def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)  # numpy.percentile([1,2,3,4], 90)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0


def _records():
    # A: arrives 0, tokens at 1, 2, 3 -> TTFT 1, TPOT 1, E2EL 3, ITL [1, 1]
    a = RequestRecord(10, 3, 0.0, token_s=[1.0, 2.0, 3.0], finish_s=3.0, scheduled_s=0.5)
    # B: arrives 1, tokens at 1.5, 2.0, 2.5, 3.0, 5.0 -> TTFT .5, TPOT (5-1.5)/4, E2EL 4
    b = RequestRecord(20, 5, 1.0, token_s=[1.5, 2.0, 2.5, 3.0, 5.0], finish_s=5.0, scheduled_s=1.0)
    # C: one token: no TPOT; TTFT 2, E2EL 2
    c = RequestRecord(5, 1, 2.0, token_s=[4.0], finish_s=4.0)
    # D: refused by the server's queue cap
    d = RequestRecord(7, 4, 3.0, rejected=True, error="queue full")
    return [a, b, c, d]


def test_per_request_latencies():
    a, b, c, _ = _records()
    assert (a.ttft_s, a.tpot_s, a.e2el_s, a.itl_s, a.queue_s) == (1.0, 1.0, 3.0, [1.0, 1.0], 0.5)
    assert b.tpot_s == pytest.approx(0.875)
    assert c.tpot_s is None and c.itl_s == []


def test_summary_of_a_small_run():
    s = summarize(_records())
    assert (s["num_prompts"], s["completed"], s["rejected"], s["failed"]) == (4, 3, 1, 0)
    assert s["duration"] == 5.0  # first arrival 0 to last finish 5
    assert s["total_input_tokens"] == 35 and s["total_output_tokens"] == 9
    assert s["request_throughput"] == pytest.approx(3 / 5)
    assert s["output_throughput"] == pytest.approx(9 / 5)
    assert s["mean_ttft_ms"] == pytest.approx((1.0 + 0.5 + 2.0) / 3 * 1e3)
    assert s["median_ttft_ms"] == pytest.approx(1000.0)
    assert s["mean_tpot_ms"] == pytest.approx((1.0 + 0.875) / 2 * 1e3)
    assert s["mean_e2el_ms"] == pytest.approx(3000.0)
    assert s["p99_e2el_ms"] == pytest.approx(percentile([3.0, 4.0, 2.0], 99) * 1e3)
    assert s["p99_e2el_ms"] == pytest.approx(3980.0)
    assert s["mean_itl_ms"] == pytest.approx((1 + 1 + 0.5 + 0.5 + 0.5 + 2.0) / 6 * 1e3)
    assert s["mean_queue_ms"] == pytest.approx(250.0)
    assert (s["mean_jct_s"], s["p99_jct_s"]) == (3.0, pytest.approx(3.98))


def test_goodput_counts_requests_that_meet_every_slo():
    slo = SLO.parse(["ttft:1000", "tpot:900"])
    assert (slo.ttft_ms, slo.tpot_ms, slo.e2el_ms) == (1000.0, 900.0, None)
    # A: TPOT 1000 > 900 fails; B: meets both; C: TTFT 2000 fails.
    assert summarize(_records(), slo=slo)["request_goodput"] == pytest.approx(1 / 5)
    assert summarize(_records(), slo=SLO.parse(["e2el:3000"]))["request_goodput"] == pytest.approx(2 / 5)


def test_bad_slo_is_refused():
    for spec in ("ttft", "foo:3", "tpot:-1"):
        with pytest.raises(ValueError):
            SLO.parse([spec])
