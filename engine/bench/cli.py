"""``fastserve bench``: load-test a running server; ``fastserve bench report``: plot runs.

The result file is one JSON object: what was run (``backend``, ``workload``,
``num_prompts``, ``seed``, ``burstiness``, ``max_concurrency``, the server's scheduler
settings from ``/v1/scheduler``) and ``results``, one entry per request rate with vLLM's
``bench serve`` key names (``completed``, ``mean_ttft_ms``, ``p99_e2el_ms``,
``output_throughput``, ...), ``mean_jct_s`` / ``p99_jct_s`` and the per-request rows. With
a single rate, that entry's summary is also copied to the top level, where a vLLM user
looks for it. ``fastserve simulate`` writes the same shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import urllib.request
from collections.abc import Callable, Sequence

from engine.bench.metrics import SLO, result_entry
from engine.bench.workload import SYNTHETIC, build_workload


def add_workload_args(p: argparse.ArgumentParser, *, num_prompts: int = 200) -> None:
    """Workload flags shared by ``bench`` and ``simulate``."""
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="sharegpt", metavar="NAME",
                   help=f"{' | '.join(SYNTHETIC)} | trace:FILE (JSONL with arrival_s, "
                        "prompt_len or prompt, output_len) (default %(default)s)")
    g.add_argument("--num-prompts", type=int, default=num_prompts,
                   help="requests per rate (a trace: its first N; 0 = all)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="coefficient of variation of inter-arrival gaps: 1 Poisson, >1 burstier "
                        "(Gamma arrivals)")
    g.add_argument("--max-input-len", type=int, default=None, help="clip prompt lengths")
    g.add_argument("--max-output-len", type=int, default=None, help="clip output lengths")
    g.add_argument("--input-len", type=int, default=128, help="mean prompt length (lognormal, "
                   "fixed, uniform)")
    g.add_argument("--output-len", type=int, default=128, help="mean output length (lognormal, "
                   "fixed, uniform)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--slo", nargs="+", default=[], metavar="KIND:MS",
                   help="goodput objectives, e.g. --slo ttft:500 tpot:50 e2el:20000")


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0 (or inf), got {text!r}")
    return rates


def workload_at(args: argparse.Namespace, rate: float,
                count_tokens: Callable[[str], int] | None = None):
    return build_workload(args.workload, args.num_prompts, rate=rate, seed=args.seed,
                          burstiness=args.burstiness, max_input_len=args.max_input_len,
                          max_output_len=args.max_output_len, input_len=args.input_len,
                          output_len=args.output_len, count_tokens=count_tokens)


def write_result(path: str | None, result: dict) -> None:
    if len(result["results"]) == 1:
        result = {**{k: v for k, v in result["results"][0].items() if k != "requests"}, **result}
    text = json.dumps(result, indent=1, default=str)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastserve bench",
        description="Load-test a running FastServe (or any OpenAI-compatible) server. "
                    "`fastserve bench report A.json B.json ... --output-dir DIR` plots runs.")
    p.add_argument("--base-url", default=None, help="server, e.g. http://127.0.0.1:8000")
    p.add_argument("--backend", choices=["http", "zmq"], default="http",
                   help="streaming completions over HTTP, or the ZeroMQ SDK")
    p.add_argument("--zmq-address", default=None, help="ZeroMQ frontend (zmq backend)")
    p.add_argument("--model", default=None, help="model name to request (default: the server's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (HF dir or .gguf) for prompt text; default: the server's "
                        "/tokenize")
    p.add_argument("--request-rate", type=parse_rates, default=[math.inf],
                   help="requests/s, or a comma list to sweep (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap requests in flight")
    p.add_argument("--label", default=None, help="run name in reports (default: file name)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="write the result here")
    p.add_argument("--no-progress", action="store_true")
    add_workload_args(p)
    return p


def _get_json(url: str, api_key: str | None, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _encoder(args: argparse.Namespace, model: str) -> Callable[[str], list[int]]:
    if args.tokenizer:
        from engine.tokenizer import Tokenizer

        return Tokenizer.load(args.tokenizer).encode
    if not args.base_url:
        raise ValueError("prompt text needs --tokenizer or --base-url (for /tokenize)")
    url = args.base_url.rstrip("/") + "/tokenize"
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = _get_json(url, args.api_key, {"model": model, "prompt": text})["tokens"]
        return cache[text]

    return encode


def run_bench(args: argparse.Namespace) -> dict:
    from engine.bench.client import run_load
    from engine.bench.prompts import PromptBuilder

    slo = SLO.parse(args.slo)
    base = args.base_url.rstrip("/") if args.base_url else None
    model = args.model
    if model is None and base:
        model = _get_json(base + "/v1/models", args.api_key)["data"][0]["id"]
    scheduler = None
    if base:
        try:
            scheduler = _get_json(base + "/v1/scheduler", args.api_key)
            scheduler.pop("jobs", None)
        except OSError as e:
            print(f"warning: no /v1/scheduler: {e}", file=sys.stderr)
    encode = _encoder(args, model or "")
    builder = PromptBuilder(encode)
    results = []
    for rate in args.request_rate:
        items = workload_at(args, rate, count_tokens=lambda s: len(encode(s)))
        prompts = [it.prompt or builder.text(it.prompt_len, i) for i, it in enumerate(items)]
        records, duration = asyncio.run(run_load(
            items, prompts, backend=args.backend, base_url=base, zmq_address=args.zmq_address,
            model=model or "", api_key=args.api_key, max_concurrency=args.max_concurrency,
            progress=not args.no_progress, desc=f"rate {rate:g}/s"))
        entry = result_entry(records, rate, duration, slo)
        results.append(entry)
        print(json.dumps({k: entry[k] for k in ("request_rate", "completed", "rejected", "failed",
                                                "mean_jct_s", "p99_jct_s", "mean_ttft_ms",
                                                "output_throughput")}))
    return {
        "source": "bench", "label": args.label, "backend": args.backend, "model": model,
        "base_url": base, "workload": args.workload, "num_prompts": args.num_prompts,
        "seed": args.seed, "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "max_input_len": args.max_input_len,
        "max_output_len": args.max_output_len, "server_scheduler": scheduler,
        "results": results,
    }


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["report"]:
        p = argparse.ArgumentParser(prog="fastserve bench report",
                                    description="Plot bench/simulate result files together.")
        p.add_argument("files", nargs="+", metavar="RESULT.json")
        p.add_argument("--output-dir", required=True)
        a = p.parse_args(argv[1:])
        from engine.bench.report import write_report

        for path in write_report(a.files, a.output_dir):
            print(path)
        return 0
    args = bench_parser().parse_args(argv)
    result = run_bench(args)
    if args.label is None and args.output:
        import os

        result["label"] = os.path.splitext(os.path.basename(args.output))[0]
    write_result(args.output, result)
    return 0
