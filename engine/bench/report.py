"""``fastserve bench report A.json B.json ... --output-dir DIR``: plots and a table.

Each input file is one run (a label, one or more request rates), as written by ``fastserve
bench`` or ``fastserve simulate``; measured and simulated runs plot side by side. Writes
``jct_vs_rate.png`` (mean and p99 JCT), ``ttft_vs_rate.png`` (mean and p99 TTFT),
``jct_cdf.png`` (per run, at its highest rate) and ``summary.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

COLUMNS = (
    ("rate (req/s)", "request_rate", "{:.3g}"),
    ("completed", "completed", "{:d}"),
    ("rejected", "rejected", "{:d}"),
    ("mean JCT (s)", "mean_jct_s", "{:.3f}"),
    ("p99 JCT (s)", "p99_jct_s", "{:.3f}"),
    ("mean TTFT (ms)", "mean_ttft_ms", "{:.1f}"),
    ("p99 TTFT (ms)", "p99_ttft_ms", "{:.1f}"),
    ("mean TPOT (ms)", "mean_tpot_ms", "{:.1f}"),
    ("output tok/s", "output_throughput", "{:.1f}"),
)


def load_run(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    if not isinstance(run, dict) or not isinstance(run.get("results"), list):
        raise ValueError(f"{path}: not a bench or simulate result (no 'results' list)")  # noqa: TRY004
    run.setdefault("label", os.path.splitext(os.path.basename(path))[0])
    return run


def _fmt(fmt: str, value: object) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(runs: Sequence[dict]) -> str:
    head = ["run", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        for res in sorted(run["results"], key=lambda r: r.get("request_rate") or 0):
            cells = [run["label"], *(_fmt(f, res.get(k)) for _, k, f in COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _versus_rate(runs: Sequence[dict], keys: Sequence[tuple[str, str]], ylabel: str,
                 path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], keys, strict=True):
        for run in runs:
            pts = sorted((r["request_rate"], r[key]) for r in run["results"]
                         if r.get("request_rate") is not None and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run["label"])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{name} {ylabel}")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdf(runs: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        res = max(run["results"], key=lambda r: r.get("request_rate") or 0)
        jct = sorted(row["e2el_s"] for row in res.get("requests", ()) if row.get("e2el_s") is not None)
        if jct:
            ys = [(i + 1) / len(jct) for i in range(len(jct))]
            ax.plot(jct, ys, label=f"{run['label']} @ {res.get('request_rate', 0):.3g}/s")
    ax.set_xscale("log")
    ax.set_xlabel("JCT (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(paths: Sequence[str], output_dir: str) -> list[str]:
    """Plots and ``summary.md`` for the runs in ``paths``; returns the files written."""
    runs = [load_run(p) for p in paths]
    os.makedirs(output_dir, exist_ok=True)
    out = [os.path.join(output_dir, n) for n in
           ("jct_vs_rate.png", "ttft_vs_rate.png", "jct_cdf.png", "summary.md")]
    _versus_rate(runs, [("mean_jct_s", "mean"), ("p99_jct_s", "p99")], "JCT (s)", out[0],
                 "JCT versus request rate")
    _versus_rate(runs, [("mean_ttft_ms", "mean"), ("p99_ttft_ms", "p99")], "TTFT (ms)", out[1],
                 "TTFT versus request rate")
    _cdf(runs, out[2])
    with open(out[3], "w", encoding="utf-8") as f:
        f.write(markdown_table(runs))
    return out
