"""The start-up banner: one block that says what the server is running and how it is
configured, built from ``Engine.describe()``. Field meanings: docs/serving.md."""

from __future__ import annotations

from typing import Any

from engine.cli_checks import human_bytes

# Policy describe() keys that are live state, not knobs: kept out of the banner.
_STATE_KEYS = {"name", "queue_sizes", "pinned"}


def _knobs(describe: dict[str, Any]) -> str:
    knobs = [f"{k}={_fmt(v)}" for k, v in describe.items() if k not in _STATE_KEYS]
    return f"{describe.get('name')}" + (f" ({', '.join(knobs)})" if knobs else "")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_banner(d: dict[str, Any], urls: list[str]) -> str:
    kv = d["kv"]
    device = (f"{d['device']}, dtype {d['dtype']}, {_count(d.get('num_params'))} parameters "
              f"({human_bytes(d.get('weight_bytes') or 0)})")
    pool = (f"device {kv['device_blocks']} blocks = {kv['device_tokens']} tokens "
            f"({human_bytes(kv['device_bytes'])}); host {kv['host_blocks']} blocks = "
            f"{kv['host_tokens']} tokens ({human_bytes(kv['host_bytes'])}); "
            f"{kv['block_size']} tokens/block")
    context = (f"max model length {d['max_model_len']}; {d['max_concurrency']:.2f}x requests "
               f"of that length fit the device pool; batch caps {d['max_num_seqs']} seqs, "
               f"{d['max_num_batched_tokens']} tokens/step")
    lines = [
        f"FastServe {d['version']} ready",
        f"  model         {d['model']} ({d['architecture']}, {d['format']})",
        f"  device        {device}",
        f"  KV pool       {pool}",
        f"  context       {context}",
        f"  scheduling    {_knobs(d['policy'])}",
        f"  swapping      {_knobs(d['swap_policy'])}",
    ]
    if d.get("profile"):
        lines.append(f"  cost profile  {d['profile']}")
    for url in urls:
        lines.append(f"  listening     {url}")
    return "\n".join(lines)
