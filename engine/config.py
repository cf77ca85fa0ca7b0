"""Frozen configuration dataclasses. Every knob is a named field with a documented default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how.

    ``path`` is a Hugging Face directory (config.json + *.safetensors + tokenizer files) or a
    ``.gguf`` file. ``None`` means the bundled SmolLM2-135M-Instruct GGUF.
    """

    path: str | None = None
    # auto | float32 | bfloat16 | float16. "auto": bf16 on CUDA and on CPUs with native bf16
    # (AVX-512 BF16 or AMX: measured faster there), fp32 on other CPUs. The KV cache uses it too.
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # None: the model's own context length
    # How linear layers hold weights: auto (a GGUF keeps its own precision in the nearest
    # packed format; floats for safetensors) | none (dequantize to dtype) | int8 | int4.
    quantization: str = "auto"
    # max_model_len may exceed the model's own context length (RoPE models extrapolate;
    # quality past the trained length is the user's call). False: it is capped to it.
    allow_long_context: bool = False
    seed: int = 0  # seeds torch in the worker (used by random-init test models only)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16  # tokens per KV block
    # CPU: bytes of KV cache for the GPU-side pool (the "device" pool on a CPU run).
    kv_cache_memory: int = 512 * 1024**2
    # CUDA: fraction of free device memory given to the KV pool after the model is loaded.
    gpu_memory_utilization: float = 0.85
    # Host (swap) pool, in bytes; 0 disables swapping to host.
    host_kv_cache_memory: int = 1024**3
    num_gpu_blocks_override: int | None = None  # exact pool size (tests, benchmarks)
    num_host_blocks_override: int | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch formation budgets and policy choice."""

    # The paper's design by default: skip-join MLFQ (its quantum and first-queue choice
    # come from the model's cost profile, measured once per model/device/dtype and cached)
    # with proactive swapping. Names in the fastserve.scheduling_policies and
    # fastserve.swap_policies entry-point groups.
    policy: str = "skip-join-mlfq"
    swap_policy: str = "proactive"
    max_num_seqs: int = 64  # batch-size cap per iteration
    max_num_batched_tokens: int = 2048  # token budget per iteration (prefill + decode tokens)
    # Admission cap: jobs queued beyond one full batch. The engine holds at most
    # max_num_seqs + max_waiting jobs in any state (running, waiting, or preempted by a
    # preemptive policy); past that, new requests are refused (503, Retry-After).
    max_waiting: int = 4096
    # Admission cap on the prompt tokens of all queued jobs together (waiting, or swapped
    # out to host): bounds the memory a flood of long prompts can pin. None: no cap.
    max_waiting_tokens: int | None = 1 << 20
    policy_options: tuple[tuple[str, object], ...] = ()  # extra knobs for the policy plugin
    swap_policy_options: tuple[tuple[str, object], ...] = ()  # extra knobs for the swap plugin
    # A victim the host pool cannot take: False spares it while anything else can run (the
    # job that wanted its room waits); True drops its KV for recompute at once, so a more
    # urgent job never waits for room (strict priority, at the cost of the victim's work).
    eager_recompute: bool = False
    # Stored cost profile (`fastserve profile --out`) for policies that use one (skip-join);
    # None: such a policy has the worker profile the model at start-up.
    profile_path: str | None = None
    # Where measured profiles are cached (engine/profile_cache.py); None: $FASTSERVE_CACHE_DIR
    # or ~/.cache/fastserve; "": never cache (measure at every start).
    profile_cache_dir: str | None = None
    # No stored or cached profile: measure one at start-up (seconds on a CPU). False: the
    # policy's own estimate (skip-join: linear in the prompt length), e.g. for one-shot
    # `fastserve generate`, where the order of one request's steps does not matter.
    measure_profile: bool = True
    # Service charged to each job per iteration, in seconds, instead of the step's measured
    # duration; None: measured. Set, quanta count iterations, so demotions do not depend on
    # how fast (or how loaded) the machine is: reproducible experiments and tests.
    fixed_step_time_s: float | None = None


@dataclass(frozen=True)
class ParallelConfig:
    """Worker processes: ``tensor_parallel_size`` x ``pipeline_parallel_size`` ranks.

    Rank ``r`` is TP rank ``r % tp`` of pipeline stage ``r // tp``; the last stage's TP rank 0
    (the driver) samples and answers steps. See docs/distributed.md.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Seconds a worker may take to answer a step before it is declared dead.
    step_timeout_s: float = 120.0
    # Seconds a worker may take to start and load its model.
    startup_timeout_s: float = 300.0
    # Torch threads per rank; None: one per physical core (several local ranks: an equal share).
    torch_threads: int | None = None
    # Address the engine's control socket binds. None: an ipc:// path (local ranks only);
    # "tcp://HOST:PORT" lets `fastserve worker --engine ...` on other hosts join.
    engine_address: str | None = None
    # torch.distributed rendezvous (rank 0 hosts the TCPStore there; 0: a free port).
    dist_host: str = "127.0.0.1"
    dist_port: int = 0
    # Ranks the engine does not start itself (started with `fastserve worker` elsewhere).
    remote_ranks: tuple[int, ...] = ()
    # "auto": NCCL on CUDA, gloo on CPU.
    dist_backend: str = "auto"
    # Seconds between the engine's pings to remote ranks when it sends nothing else; a remote
    # worker exits after its --idle-exit without any message (its engine is gone).
    heartbeat_s: float = 5.0
    # A rank without a parent to watch (`fastserve worker` elsewhere, a Ray actor) exits when
    # the engine has not answered its watchdog for this long, even while a command hangs
    # (NCCL does when a peer dies). 0: never.
    watchdog_timeout_s: float = 10.0
    # How ranks are started: "mp" (local processes; `fastserve worker` on other hosts for
    # remote_ranks) or "ray" (Ray actors on a placement group; see docs/distributed.md).
    distributed_executor_backend: str = "mp"
    # Ray cluster to use: None connects to $RAY_ADDRESS when it is set (as `ray.init(
    # address="auto")`) and otherwise starts a local Ray instance for this engine (stopped
    # with it); "auto", "ray://..." or "HOST:PORT" connect to that cluster.
    ray_address: str | None = None
    # CPUs reserved per rank in the Ray placement group (one GPU per rank on CUDA as well).
    ray_cpus_per_rank: float = 1.0
    # Batches the scheduler keeps in flight; None: one per pipeline stage (1 shows the bubble
    # of a pipeline without streaming, as benchmarks/parallel_cpu.py does).
    max_batches_in_flight: int | None = None
    # Plan step N+1 while step N runs (one worker rank, one batch in flight): a decode row
    # feeds the token the worker sampled in step N, so the engine's update, planning,
    # detokenizing and streaming overlap the worker's compute (engine/scheduler.py,
    # schedule_continuation, says when a continuation is made). "auto": on when the engine
    # has a core the worker's threads leave free (a CUDA worker, or fewer torch threads than
    # physical cores); on a CPU whose every core runs a worker thread the engine's work
    # would take a core from the very step it overlaps, and measured end to end on a busy
    # 2-core machine the two were within noise (benchmarks/results/decode_overhead_cpu.md).
    # "on" / "off": always / never (off: strictly plan -> execute -> update).
    overlap_steps: str = "auto"
    # How the worker's OpenMP threads wait between parallel regions: "passive" sleeps at once,
    # "active" spins first (libgomp's default). When anything else wants the same cores (the
    # engine process planning the next step, other programs), a spinning thread holds a core
    # its descheduled partner needs and each op waits a time slice: measured on a busy 2-core
    # machine, a bf16 decode step of SmolLM2-135M with 2 threads took 3-7 s spinning and
    # 60-175 ms passive (1 thread: 0.5-1 s). None: leave the environment alone.
    omp_wait_policy: str | None = "passive"
    # Small steps on a CPU whose cores all run worker threads: "auto" overlap covers a
    # decode step of at most this many jobs, and the worker runs such an overlapped step on
    # one intra-op thread, so the engine gets a core of its own exactly when a step is too
    # small to use two (a step that cannot be overlapped -- a job waits, a prefill chunk --
    # keeps every thread). Measured on the 2-core machine with the bundled Q4_1 model
    # (benchmarks/results/small_steps_cpu.md). None: 4 on a one-rank CPU worker whose torch
    # threads fill the physical cores (more than one), otherwise 0; 0: off.
    small_step_rows: int | None = None
    # Self-recovery: after the worker group fails (a worker died or missed the step
    # deadline) the engine restarts it after this many seconds, doubling on each failure
    # in a row up to the maximum; a group that served restart_reset_s resets the backoff.
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    restart_reset_s: float = 60.0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be >= 1")
        bad = [r for r in self.remote_ranks if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"remote ranks {bad} outside 0..{self.world_size - 1}")
        if self.small_step_rows is not None and self.small_step_rows < 0:
            raise ValueError(f"small_step_rows must be >= 0, not {self.small_step_rows}")
        if self.overlap_steps not in ("auto", "on", "off"):
            raise ValueError(f"overlap_steps must be 'auto', 'on' or 'off', not {self.overlap_steps!r}")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be 'mp' or 'ray', not "
                             f"{self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "ray" and self.remote_ranks:
            raise ValueError("remote_ranks are for the mp backend; Ray places every rank itself")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    zmq_address: str | None = None
    api_key: str | None = None  # required by every route but /health, HTTP and ZeroMQ alike
    served_model_name: str | None = None
    max_body_bytes: int = 4 * 1024**2
    log_requests: bool = True  # one access line per HTTP request (INFO; probes at DEBUG)
    # Seconds between stats lines while the engine is busy (throughput, queues, KV); 0: none.
    log_stats_interval_s: float = 10.0
    # SIGTERM/SIGINT: seconds in-flight requests may take to finish before they are aborted.
    shutdown_timeout_s: float = 10.0
    # JSONL file to append one row per finished request to (arrival, lengths), replayable
    # by `fastserve bench`/`simulate --workload trace:FILE`; None: no trace.
    record_trace: str | None = None
    record_trace_prompts: bool = False  # also write each prompt's text into the trace
    # Tool-call parser by name (engine.tool_parsers); None: the model family's default.
    tool_call_parser: str | None = None


@dataclass(frozen=True)
class StructuredOutputConfig:
    """Structured output (``response_format``, ``guided_*``; engine/structured/)."""

    # JSON from a schema or json_object: False allows no whitespace outside strings (compact
    # JSON, ", " and ": " separators), so a small model cannot stall in endless newlines;
    # True allows any whitespace between tokens (xgrammar's own default).
    any_whitespace: bool = False
    # Compiled grammars kept for reuse, keyed by the spec (least recently used dropped).
    cache_size: int = 256
    # Threads compiling grammars, off the event loop.
    compile_threads: int = 1


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    structured: StructuredOutputConfig = field(default_factory=StructuredOutputConfig)

    def replace(self, **sections: object) -> EngineConfig:
        return dataclasses.replace(self, **sections)


def config_to_dict(cfg: object) -> dict:
    """Plain-dict view (msgpack-able) of a config dataclass tree."""
    return dataclasses.asdict(cfg)  # type: ignore[arg-type]
