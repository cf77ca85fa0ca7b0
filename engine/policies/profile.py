"""Measured cost curve of the running model: prefill seconds by input length, decode-step
seconds by batch size. Skip-join MLFQ reads ``prefill_time`` to pick a new job's first queue.

The dict form is exactly what the worker's ``profile`` command answers
(``engine/parallel/profile.py``): ``{"prefill": [[len, s], ...], "decode": [[batch, s], ...]}``;
other keys (e.g. ``"kind"``) are ignored. Invariants: x values are positive integers, unique
and sorted; y values are finite and >= 0; there is at least one prefill point.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Union

Points = tuple[tuple[int, float], ...]
ProfileLike = Union["PrefillProfile", dict, str, "os.PathLike[str]", None]


def _points(name: str, raw: Iterable[Any]) -> Points:
    out: dict[int, float] = {}
    for item in raw:
        try:
            x, y = item
        except (TypeError, ValueError):
            raise ValueError(f"{name} points must be [x, seconds] pairs, got {item!r}") from None
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name}: x must be a positive integer, got {x!r}")
        if isinstance(y, bool) or not isinstance(y, (int, float)) or not math.isfinite(y) or y < 0:
            raise ValueError(f"{name}: seconds must be a finite number >= 0, got {y!r}")
        if x in out:
            raise ValueError(f"{name}: two points for x={x}")
        out[x] = float(y)
    return tuple(sorted(out.items()))


def _interp(points: Points, x: float, xs: Sequence[int] | None = None) -> float:
    """Piecewise-linear through the points; outside them, the end segment's slope (never
    negative, so more work never looks cheaper); one point: cost proportional to x.
    ``xs``: the points' x values, if the caller keeps them (skip-join asks once per job)."""
    if len(points) == 1:
        x0, y0 = points[0]
        return y0 * x / x0
    if xs is None:
        xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    i = min(max(i, 1), len(points) - 1)  # segment (i-1, i); the end ones extrapolate
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    slope = (y1 - y0) / (x1 - x0)
    if x < x0 or x > x1:
        slope = max(slope, 0.0)
    if x > x1:
        return y1 + slope * (x - x1)
    return max(0.0, y0 + slope * (x - x0))


class PrefillProfile:
    """Prefill and decode cost points with linear interpolation and extrapolation."""

    def __init__(
        self,
        prefill: Iterable[Sequence[float]],
        decode: Iterable[Sequence[float]] = (),
    ) -> None:
        self.prefill_points = _points("prefill", prefill)
        self.decode_points = _points("decode", decode)
        if not self.prefill_points:
            raise ValueError("a profile needs at least one prefill point")
        self._prefill_xs = [x for x, _ in self.prefill_points]

    def prefill_time(self, num_tokens: int) -> float:
        """Estimated seconds to prefill ``num_tokens`` input tokens."""
        if num_tokens <= 0:
            return 0.0
        return _interp(self.prefill_points, num_tokens, self._prefill_xs)

    def decode_step_time(self, batch_size: int) -> float:
        """Estimated seconds of one decode iteration of ``batch_size`` jobs."""
        if not self.decode_points:
            raise ValueError("this profile has no decode points")
        if batch_size <= 0:
            return 0.0
        return _interp(self.decode_points, batch_size)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "prefill": [[x, y] for x, y in self.prefill_points],
            "decode": [[x, y] for x, y in self.decode_points],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrefillProfile:
        if not isinstance(data, dict) or "prefill" not in data:
            raise ValueError("a profile dict needs a 'prefill' list of [input_len, seconds] pairs")
        return cls(data["prefill"], data.get("decode") or ())

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> PrefillProfile:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrefillProfile:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    @classmethod
    def coerce(cls, profile: ProfileLike) -> PrefillProfile | None:
        """A profile from a profile, its dict form, a JSON file path, or ``None``."""
        if profile is None or isinstance(profile, PrefillProfile):
            return profile
        if isinstance(profile, dict):
            return cls.from_dict(profile)
        if isinstance(profile, (str, os.PathLike)):
            return cls.load(profile)
        raise TypeError(
            f"profile must be a PrefillProfile, dict, path or None, got {type(profile).__name__}"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefillProfile):
            return NotImplemented
        mine = (self.prefill_points, self.decode_points)
        return mine == (other.prefill_points, other.decode_points)

    def __repr__(self) -> str:
        return (
            f"PrefillProfile(prefill={list(self.prefill_points)}, "
            f"decode={list(self.decode_points)})"
        )
