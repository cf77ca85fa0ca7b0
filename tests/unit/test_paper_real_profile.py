"""The real-server comparison prices simulated steps with a profile made robust to a
shared CPU: each point's fastest round, the decode curve fitted to a line."""

from __future__ import annotations

import pytest

from benchmarks.paper_real import steady_profile


def test_each_point_keeps_its_fastest_round_and_decode_becomes_a_line():
    rounds = [
        {"prefill": [[1, 0.030], [64, 0.200]],
         "decode": [[1, 0.028], [2, 0.032], [3, 0.031], [4, 0.034]]},
        {"prefill": [[1, 0.022], [64, 0.210]],
         "decode": [[1, 0.021], [2, 0.031], [3, 0.026], [4, 0.029]]},
    ]
    p = steady_profile(rounds)
    assert [tuple(pt) for pt in p.prefill_points] == [(1, 0.022), (64, 0.200)]
    # fastest per batch: 21, 31, 26, 29 ms; least-squares line: mean 26.75 ms at x=2.5,
    # slope (-1.5*21 - 0.5*31 + 0.5*26 + 1.5*29) / 5 = 1.9 ms per job
    expected = [26.75 + 1.9 * (x - 2.5) for x in (1, 2, 3, 4)]
    got = [1e3 * t for _, t in p.decode_points]
    assert got == pytest.approx(expected, abs=1e-9)
    assert p.decode_step_time(2) < p.decode_step_time(4)


def test_a_decreasing_fit_is_flattened_not_inverted():
    p = steady_profile([{"prefill": [[1, 0.01]], "decode": [[1, 0.030], [2, 0.020]]}])
    assert [t for _, t in p.decode_points] == pytest.approx([0.025, 0.025])
