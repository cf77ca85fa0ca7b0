"""``fastserve`` command line: serve | generate | profile | bench | simulate | worker."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence

from engine import cli_checks as ck
from engine import version
from engine.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
    StructuredOutputConfig,
)

EAGER_RECOMPUTE_HELP = (
    "when the host pool cannot take a victim's KV, drop it for recompute at once (strict "
    "priority) instead of letting the urgent job wait while other jobs can run")


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ranks, got {text!r}") from None


def add_logging_args(p: argparse.ArgumentParser, level: str = "WARNING") -> None:
    from engine.logs import LOG_FORMATS

    g = p.add_argument_group("logging")
    g.add_argument("--log-level", type=ck.log_level, default=level,
                   help="DEBUG | INFO | WARNING | ERROR")
    g.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="json: one JSON object per line, for log shippers")


def _installed(group: str) -> str:
    from engine.policies.registry import available

    return ", ".join(available(group)) or "none"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    from engine.policies.registry import SCHEDULING_GROUP, SWAP_GROUP

    d = EngineConfig()
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="same as --model")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="HF directory or .gguf file (default: bundled "
                   "SmolLM2-135M-Instruct); a local path: nothing is ever downloaded")
    g.add_argument("--dtype", default=d.model.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights, activations and KV cache; auto: bf16 on CUDA and on CPUs with native "
                        "bf16 (AVX-512 BF16, AMX), else float32")
    g.add_argument("--device", default=d.model.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--max-model-len", type=ck.positive_int, default=None,
                   help="cap the context length (default: the model's)")
    g.add_argument("--allow-long-context", action="store_true",
                   help="accept a --max-model-len above the model's own context length")
    g.add_argument("--quantization", default=d.model.quantization, choices=["auto", "none", "int8", "int4"],
                   help="weights of linear layers: auto keeps a GGUF's own precision packed; none "
                   "dequantizes; int8/int4 quantize at load")
    g = p.add_argument_group("KV cache")
    g.add_argument("--block-size", type=ck.positive_int, default=d.cache.block_size,
                   help="tokens per KV block")
    g.add_argument("--kv-cache-memory", type=ck.positive_size,
                   default=ck.format_size(d.cache.kv_cache_memory),
                   help="device KV pool size on CPU, e.g. 512M")
    g.add_argument("--gpu-memory-utilization", type=ck.fraction, default=d.cache.gpu_memory_utilization,
                   help="fraction of free GPU memory for the KV pool, in (0, 1]")
    g.add_argument("--host-kv-cache-memory", type=ck.parse_size,
                   default=ck.format_size(d.cache.host_kv_cache_memory),
                   help="host (swap) pool size, e.g. 1G; 0 disables swapping")
    g.add_argument("--num-gpu-blocks", type=ck.positive_int, default=None,
                   help="exact KV pool size in blocks (default: from the memory flags)")
    g.add_argument("--num-host-blocks", type=ck.non_negative_int, default=None,
                   help="exact host (swap) pool size in blocks (default: from the memory flags)")
    g = p.add_argument_group("scheduling")
    g.add_argument("--scheduling-policy", default=d.scheduler.policy,
                   help=f"installed: {_installed(SCHEDULING_GROUP)}")
    g.add_argument("--swap-policy", default=d.scheduler.swap_policy,
                   help=f"installed: {_installed(SWAP_GROUP)}")
    g.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE", type=_option,
                   help="a scheduling-policy knob, e.g. base_quantum_s=0.05 (VALUE is JSON, else a string)")
    g.add_argument("--swap-policy-option", action="append", default=[], metavar="KEY=VALUE", type=_option,
                   help="a swap-policy knob, e.g. headroom_frac=0.2")
    g.add_argument("--profile", default=None, dest="profile_path",
                   help="stored cost profile (from `fastserve profile`) for skip-join")
    g.add_argument("--profile-cache-dir", default=None,
                   help="where measured profiles are cached (default: $FASTSERVE_CACHE_DIR, "
                        "else ~/.cache/fastserve); '' disables the cache")
    g.add_argument("--eager-recompute", action="store_true", help=EAGER_RECOMPUTE_HELP)
    g.add_argument("--max-num-seqs", type=ck.positive_int, default=d.scheduler.max_num_seqs,
                   help="batch-size cap")
    g.add_argument("--max-num-batched-tokens", type=ck.positive_int,
                   default=d.scheduler.max_num_batched_tokens, help="token budget per iteration")
    g.add_argument("--max-waiting", type=ck.positive_int, default=d.scheduler.max_waiting,
                   help="jobs queued beyond one full batch (waiting or preempted) beyond which "
                        "new requests get 503 + Retry-After")
    g.add_argument("--max-waiting-tokens", type=ck.positive_int,
                   default=d.scheduler.max_waiting_tokens,
                   help="prompt tokens of all queued jobs beyond which new requests get 503")
    g = p.add_argument_group("parallelism (see docs/distributed.md)")
    g.add_argument("--torch-threads", type=ck.positive_int, default=None,
                   help="torch threads per worker rank (default: one per physical core; several local "
                        "ranks: an equal share)")
    g.add_argument("--omp-wait-policy", choices=["passive", "active"], default=d.parallel.omp_wait_policy,
                   help="worker OpenMP threads sleep (passive) or spin (active) between ops")
    g.add_argument("--overlap-steps", choices=["auto", "on", "off"], default=d.parallel.overlap_steps,
                   help="send the next decode step while the worker runs this one (auto: when the "
                        "engine has a core the worker's threads leave free, e.g. a GPU worker, "
                        "or the step is a small one, below)")
    g.add_argument("--small-step-rows", type=ck.non_negative_int, default=d.parallel.small_step_rows,
                   help="on a CPU whose cores all run the worker's threads, a decode step of at "
                        "most this many jobs is overlapped with the engine's work and runs on one "
                        "torch thread (default: 4 there; 0: off)")
    g.add_argument("--tensor-parallel-size", "-tp", type=ck.positive_int, default=d.parallel.tensor_parallel_size,
                   help="ranks per pipeline stage, each holding a slice of every layer")
    g.add_argument("--pipeline-parallel-size", "-pp", type=ck.positive_int, default=d.parallel.pipeline_parallel_size,
                   help="pipeline stages, each holding a contiguous range of layers")
    g.add_argument("--engine-address", default=None,
                   help="control socket to bind, e.g. tcp://0.0.0.0:5555, for workers on other hosts "
                        "(default: a local ipc:// path)")
    g.add_argument("--remote-ranks", default="", type=_ranks,
                   help="comma-separated ranks started elsewhere with `fastserve worker` (e.g. 2,3)")
    g.add_argument("--dist-host", default=d.parallel.dist_host,
                   help="address of rank 0's torch.distributed store, reachable from every rank")
    g.add_argument("--dist-port", type=int, default=d.parallel.dist_port, help="its port (0: a free one)")
    g.add_argument("--distributed-executor-backend", choices=["mp", "ray"],
                   default=d.parallel.distributed_executor_backend,
                   help="start the ranks as local processes (mp; remote ones with `fastserve worker`) "
                        "or as Ray actors on a placement group (ray)")
    g.add_argument("--ray-address", default=d.parallel.ray_address,
                   help="Ray cluster for the ray backend (default: $RAY_ADDRESS if set, else a "
                        "private local Ray instance)")
    g = p.add_argument_group("structured output (response_format, guided_*)")
    g.add_argument("--structured-any-whitespace", action="store_true",
                   help="JSON output may put any whitespace between tokens (default: compact JSON, "
                        "so a small model cannot stall in endless newlines)")
    g.add_argument("--grammar-cache-size", type=ck.positive_int, default=d.structured.cache_size,
                   help="compiled grammars kept for reuse, keyed by the request's spec")
    g.add_argument("--grammar-compile-threads", type=ck.positive_int,
                   default=d.structured.compile_threads,
                   help="threads compiling grammars, off the event loop")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(path=args.model, dtype=args.dtype, device=args.device,
                          max_model_len=args.max_model_len, quantization=args.quantization,
                          allow_long_context=args.allow_long_context),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            host_kv_cache_memory=args.host_kv_cache_memory,
            num_gpu_blocks_override=args.num_gpu_blocks,
            num_host_blocks_override=args.num_host_blocks,
        ),
        scheduler=SchedulerConfig(
            policy=args.scheduling_policy,
            swap_policy=args.swap_policy,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=args.max_waiting,
            max_waiting_tokens=args.max_waiting_tokens,
            profile_path=args.profile_path,
            profile_cache_dir=args.profile_cache_dir,
            eager_recompute=args.eager_recompute,
            policy_options=tuple(args.policy_option),
            swap_policy_options=tuple(args.swap_policy_option),
        ),
        parallel=ParallelConfig(
            torch_threads=args.torch_threads,
            omp_wait_policy=args.omp_wait_policy,
            small_step_rows=args.small_step_rows,
            overlap_steps=args.overlap_steps,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            engine_address=args.engine_address,
            remote_ranks=args.remote_ranks,
            dist_host=args.dist_host,
            dist_port=args.dist_port,
            distributed_executor_backend=args.distributed_executor_backend,
            ray_address=args.ray_address,
        ),
        server=_server_config(args),
        structured=StructuredOutputConfig(
            any_whitespace=args.structured_any_whitespace,
            cache_size=args.grammar_cache_size,
            compile_threads=args.grammar_compile_threads,
        ),
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d.host, help="address to bind (loopback only by default)")
    g.add_argument("--port", type=ck.port, default=d.port, help="0: any free port")
    g.add_argument("--zmq-address", default=d.zmq_address,
                   help="ZeroMQ frontend address (default: an ipc:// path; 'off' disables it)")
    key = g.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=d.api_key,
                     help="require 'Authorization: Bearer KEY' on HTTP and the key on ZeroMQ "
                          "(every route but /health)")
    key.add_argument("--api-key-file", default=None,
                     help="read the API key from this file (keeps it out of the process list)")
    g.add_argument("--served-model-name", default=d.served_model_name,
                   help="model id in the API (default: the model file's name)")
    g.add_argument("--max-body-bytes", type=ck.positive_size, default=ck.format_size(d.max_body_bytes),
                   help="largest request body accepted (HTTP and ZeroMQ)")
    g.add_argument("--shutdown-timeout", type=ck.non_negative_float, default=d.shutdown_timeout_s,
                   help="on SIGTERM, seconds in-flight requests may take before they are aborted")
    g.add_argument("--record-trace", default=None, metavar="FILE",
                   help="append arrival time and lengths of every finished request to FILE "
                        "(JSONL), replayable with `bench`/`simulate --workload trace:FILE`")
    g.add_argument("--record-trace-prompts", action="store_true",
                   help="also write each prompt's text into the trace")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="no access line per request")
    g.add_argument("--log-stats-interval", type=ck.non_negative_float, default=d.log_stats_interval_s,
                   help="seconds between stats lines while busy; 0 disables them")
    from engine import tool_parsers

    g.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=tool_parsers.available(),
                   help="how tool calls are read from the model's text (and offered to a chat "
                        "template without tool support); default: by model family "
                        "(smollm2 for SmolLM2, llama3_json for Llama 3, else hermes)")


def _server_config(args: argparse.Namespace) -> ServerConfig:
    if not hasattr(args, "port"):
        return ServerConfig()
    api_key = args.api_key
    if args.api_key_file:  # checked readable and non-empty by cli_checks
        with open(args.api_key_file, encoding="utf-8") as f:
            api_key = f.read().strip()
    return ServerConfig(host=args.host, port=args.port, zmq_address=args.zmq_address, api_key=api_key,
                        served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
                        shutdown_timeout_s=args.shutdown_timeout,
                        record_trace=args.record_trace,
                        record_trace_prompts=args.record_trace_prompts,
                        log_requests=not args.disable_log_requests,
                        log_stats_interval_s=args.log_stats_interval,
                        tool_call_parser=args.tool_call_parser)


async def _generate(args: argparse.Namespace) -> int:
    from engine.api import Engine
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    # One request: scheduling order cannot matter, so no start-up profiling (a cached
    # profile is still used).
    cfg = engine_config_from_args(args)
    cfg = cfg.replace(scheduler=dataclasses.replace(cfg.scheduler, measure_profile=False))
    engine = await Engine.create(cfg)
    try:
        messages = [{"role": "user", "content": args.prompt}] if args.chat else None
        prompt = None if args.chat else args.prompt
        text, ids, last = [], [], None
        async for out in engine.generate(prompt, params, messages=messages):
            text.append(out.text)
            ids.extend(out.token_ids)
            last = out
            if not args.json:
                print(out.text, end="", flush=True)
        if args.json:
            print(json.dumps({"text": "".join(text), "token_ids": ids,
                              "finish_reason": last.finish_reason if last else None,
                              "num_prompt_tokens": last.num_prompt_tokens if last else 0,
                              "stats": last.stats if last else None}))
        else:
            print()
    finally:
        await engine.shutdown()
    return 0


async def _profile(args: argparse.Namespace) -> int:
    from engine.api import Engine
    from engine.policies.profile import PrefillProfile

    cfg = engine_config_from_args(args)
    engine = await Engine.create(cfg.replace(scheduler=SchedulerConfig(policy="fcfs")))
    try:
        profile = PrefillProfile.from_dict(await engine.profile())
    finally:
        await engine.shutdown()
    if args.out:
        profile.save(args.out)
    print(profile.to_json())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["worker"]:  # its own parser, --help included
        from engine.parallel.worker import main as worker_main

        return worker_main(argv[1:])
    parser = ck.Parser(prog="fastserve", description="FastServe LLM inference server.")
    parser.add_argument("--version", action="version", version=f"fastserve {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server (and ZeroMQ frontend)",
                       description="Serve a model over HTTP (OpenAI-compatible routes) and ZeroMQ.")
    add_server_args(s)
    add_engine_args(s)
    add_logging_args(s, level="INFO")

    g = sub.add_parser("generate", help="generate once from a prompt and print it",
                       description="Generate a completion for one prompt.")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=ck.positive_int, default=64)
    g.add_argument("--temperature", type=ck.non_negative_float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=ck.fraction, default=1.0)
    g.add_argument("--top-k", type=ck.non_negative_int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_engine_args(g)
    add_logging_args(g)

    pr = sub.add_parser("profile", help="measure prefill time by input length and step time by batch",
                        description="Profile the model on its worker; the JSON feeds --profile.")
    pr.add_argument("--out", default=None, help="write the profile here (default: print it)")
    add_engine_args(pr)
    add_logging_args(pr)

    sm = sub.add_parser("simulate", help="run policies on a workload on a virtual clock",
                        add_help=False)
    sm.add_argument("rest", nargs=argparse.REMAINDER)

    b = sub.add_parser("bench", help="load-test a running server; `bench report` plots results",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)

    sub.add_parser("worker", help="run a worker process (started by the engine; see "
                   "`fastserve worker --help`)", add_help=False)

    if argv[:1] in (["bench"], ["simulate"]):  # their own parsers (engine/bench, engine/sim)
        args = argparse.Namespace(command=argv[0], rest=argv[1:], log_level="WARNING",
                                  log_format="text")
    else:
        args = parser.parse_args(argv)
    from engine.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    prog = f"fastserve {args.command}"
    try:  # every user mistake is refused here, before a model or a worker is loaded
        if args.command in ("serve", "generate", "profile"):
            ck.check_engine_args(args)
        if args.command == "serve":
            ck.check_server_args(args)
    except ck.UsageError as e:
        return ck.fail(prog, e)
    from engine.models.loader import ModelLoadError
    from engine.sampling import InvalidRequestError

    try:
        if args.command == "serve":
            from engine.server import run_server

            code = run_server(engine_config_from_args(args))
            # Everything the server owned (workers, sockets, socket files) is released by
            # now; skip the interpreter's teardown, which takes seconds with torch loaded,
            # so SIGTERM's promise (exit within 5 s of the drain deadline) holds.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        if args.command == "profile":
            return _run(_profile(args))
        if args.command == "simulate":
            from engine.sim.cli import main as simulate_main

            return simulate_main(args.rest)
        if args.command == "bench":
            from engine.bench.cli import main as bench_main

            return bench_main(args.rest)
        return _run(_generate(args))
    except (InvalidRequestError, ModelLoadError, ValueError, FileNotFoundError) as e:
        return ck.fail(prog, e)
    except OSError as e:  # e.g. the port was taken between the check and the bind
        if e.errno == errno.EADDRINUSE:
            return ck.fail(prog, ck.UsageError("--port", str(e)))
        raise


def _run(coro) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


if __name__ == "__main__":
    sys.exit(main())
