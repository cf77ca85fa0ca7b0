"""The public async API.

    async with await Engine.create(EngineConfig()) as engine:
        async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
            print(out.text, end="")
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.actors.frontend import FrontendActor, RequestOutput
from engine.actors.memory import MemoryManagerActor
from engine.actors.scheduler import SchedulerActor
from engine.config import EngineConfig, config_to_dict
from engine.memory.block_manager import BlockManager
from engine.models.loader import ModelLoadError
from engine.parallel.executor import WorkerError, WorkerExecutor
from engine.parallel.protocol import PROTOCOL_VERSION
from engine.policies.registry import (
    bind_memory,
    create_scheduling_policy,
    create_swap_policy,
    wants_profile,
)
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.structured.book import GrammarBook
from engine.structured.compiler import GrammarCompiler
from engine.tokenizer import Tokenizer

log = logging.getLogger("fastserve.engine")

__all__ = ["Engine", "EngineDeadError", "RequestOutput", "SamplingParams"]


def overlap_steps(mode: str, ready: dict) -> tuple[bool, int | None]:
    """``ParallelConfig.overlap_steps`` for the worker that answered ``ready``: whether steps
    overlap, and the most sampling jobs an overlapped step may have (None: any). "auto" is
    on for every step when the engine has a core of its own (a CUDA worker, or a CPU worker
    with fewer torch threads than this host's physical cores), and only for small steps
    (``small_step_rows``, which the worker runs on one thread) when its threads fill the
    cores."""
    if mode != "auto":
        return mode == "on", None
    if not str(ready.get("device", "cpu")).startswith("cpu"):
        return True, None
    from engine.parallel.cpu import physical_cores

    if int(ready.get("torch_threads") or 0) < physical_cores():
        return True, None
    small = int(ready.get("small_step_rows") or 0)
    return small > 0, small or None


class EngineDeadError(RuntimeError):
    """The engine cannot serve (its worker died or it was shut down)."""


@dataclass
class _Workers:
    """One generation of the execution side: the worker processes and the actors that drive
    them. The supervisor replaces a failed generation with a fresh one."""

    executor: WorkerExecutor
    scheduler: SchedulerActor
    memory: MemoryManagerActor
    ready: dict


class Engine:
    def __init__(self) -> None:  # use Engine.create()
        self.config: EngineConfig
        self.tokenizer: Tokenizer
        self.model_info: dict
        self.worker_info: dict
        self._init: dict
        self._profile: dict | None = None  # measured once; reused by every restart
        self._workers: _Workers
        self._frontend: FrontendActor
        self._grammars: GrammarCompiler
        self._supervisor: asyncio.Task | None = None
        self._closed = False
        # Worker groups started after the first one; and why the engine stopped for good.
        self.num_restarts = 0
        self.fatal_error: BaseException | None = None
        self.profile_source: str | None = None  # where the policy's cost profile came from
        self._progress: Any = None

    @classmethod
    async def create(
        cls, config: EngineConfig | None = None, *, progress_bars: bool | None = None
    ) -> Engine:
        """Start the workers, load the model, profile it if the policy needs a profile.
        ``progress_bars``: tqdm bars for loading/profiling (None: when stderr is a tty;
        otherwise one INFO line per stage)."""
        from engine.models.loader import load_model_info, resolve_model_path
        from engine.progress import StartupProgress

        self = cls()
        config = config or EngineConfig()
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, resolve_model_path, config.model.path)
        info = await loop.run_in_executor(None, load_model_info, path)  # clear error before spawning
        # Scheduling knobs are checked before the worker spends time loading the model.
        create_scheduling_policy(config.scheduler.policy, dict(config.scheduler.policy_options))
        create_swap_policy(config.scheduler.swap_policy, dict(config.scheduler.swap_policy_options))
        self.config = config
        self._model_vocab_size = info.vocab_size  # the logits' width: grammar bitmasks span it
        self._progress = StartupProgress(progress_bars)
        self._init = {
            "version": PROTOCOL_VERSION,
            "model": {**config_to_dict(config.model), "path": path},
            "cache": config_to_dict(config.cache),
            "parallel": config_to_dict(config.parallel),
        }
        tok_task = loop.run_in_executor(None, Tokenizer.load, path)
        start = asyncio.ensure_future(self._start_workers())
        try:
            self.tokenizer = await tok_task
        except BaseException:
            start.cancel()
            await asyncio.wait((start,))
            if not start.cancelled() and start.exception() is None:
                await self._stop_workers(start.result())
            raise
        workers = self._workers = await start
        self.worker_info = workers.ready
        self.model_info = workers.ready["model"]
        max_len = info.max_model_len
        if config.model.max_model_len:
            max_len = (config.model.max_model_len if config.model.allow_long_context
                       else min(max_len, config.model.max_model_len))
        eos = frozenset(info.eos_token_ids) | self.tokenizer.eos_token_ids
        self._frontend = FrontendActor(self.tokenizer, max_len, eos, info.vocab_size, workers.scheduler)
        self.max_model_len = max_len
        self.vocab_size = info.vocab_size  # the model's: token ids at or past it are refused
        sc = config.structured
        self._grammars = GrammarCompiler(
            self.tokenizer, info.vocab_size, eos, any_whitespace=sc.any_whitespace,
            cache_size=sc.cache_size, threads=sc.compile_threads)
        for actor in (workers.scheduler, self._frontend, workers.memory):
            actor.start()
        self._supervisor = loop.create_task(self._supervise(), name="supervisor")
        return self

    async def _start_workers(self) -> _Workers:
        """Start a worker group, load the model, and build the scheduler and memory actors
        around it (not started). A failure shuts the group down and raises; a model that
        cannot load raises ``ModelLoadError``."""
        config = self.config
        policy = create_scheduling_policy(config.scheduler.policy, dict(config.scheduler.policy_options))
        swap_policy = create_swap_policy(config.scheduler.swap_policy, dict(config.scheduler.swap_policy_options))
        executor = WorkerExecutor(config.parallel.step_timeout_s, config.parallel.startup_timeout_s,
                                  config.parallel)
        executor.on_progress = self._progress
        try:
            ready = await executor.start(self._init)
            self._progress.close()
            if wants_profile(policy):
                if self._profile is None:
                    self._profile = await self._profile_for_policy(config, executor, ready)
                if self._profile is not None:
                    policy.set_profile(self._profile)
        except BaseException as e:
            await executor.shutdown()
            if isinstance(e, WorkerError) and e.type == "ModelLoadError":
                raise ModelLoadError(e.detail) from None
            raise
        finally:
            self._progress.close()
        blocks = BlockManager(ready["num_gpu_blocks"], ready["num_host_blocks"], config.cache.block_size)
        bind_memory(policy, blocks)
        # One batch in flight per pipeline stage.
        depth = config.parallel.max_batches_in_flight or config.parallel.pipeline_parallel_size
        core = Scheduler(config.scheduler, policy, swap_policy, blocks, pipeline_depth=depth)
        overlap, overlap_max_rows = overlap_steps(config.parallel.overlap_steps, ready)
        scheduler = SchedulerActor(core, executor, emit=self._emit, fail=self._fail,
                                   grammars=GrammarBook(self._model_vocab_size),
                                   overlap=overlap, overlap_max_rows=overlap_max_rows)
        memory = MemoryManagerActor(blocks.num_gpu_blocks, blocks.num_host_blocks, ready["block_bytes"], scheduler)
        scheduler.memory = memory
        return _Workers(executor, scheduler, memory, ready)

    async def _supervise(self) -> None:
        """Restart the worker group whenever it fails (a worker died, or missed a step
        deadline): the scheduler has already failed every job it held; stop the old group,
        wait out a backoff, start a new one and point the frontend at it. Back-to-back
        failures double the backoff (up to ``restart_backoff_max_s``); a generation that
        served for ``restart_reset_s`` earns the base backoff back. A model that no longer
        loads ends the engine (``fatal_error``) instead of looping."""
        par = self.config.parallel
        loop = asyncio.get_running_loop()
        delay = par.restart_backoff_s
        while not self._closed:
            workers = self._workers
            started = loop.time()
            await workers.scheduler.failed()
            if self._closed:
                return
            if loop.time() - started >= par.restart_reset_s:
                delay = par.restart_backoff_s
            await self._stop_workers(workers)
            while not self._closed:
                log.warning("restarting the worker group in %.1f s (restarts so far: %d)",
                            delay, self.num_restarts)
                await asyncio.sleep(delay)
                delay = min(delay * 2, par.restart_backoff_max_s)
                try:
                    fresh = await self._start_workers()
                except ModelLoadError as e:
                    log.error("the model cannot be loaded any more; the engine stops: %s", e)
                    self.fatal_error = e
                    return
                except Exception as e:  # noqa: BLE001 -- a failed start is retried after a backoff
                    log.error("worker group failed to start: %s", e)
                    continue
                if self._closed:
                    await self._stop_workers(fresh)
                    return
                self.num_restarts += 1
                self._workers = fresh
                self.worker_info = fresh.ready
                self._frontend.tell("rewire", fresh.scheduler)
                fresh.scheduler.start()
                fresh.memory.start()
                log.warning("worker group restarted (restart %d); serving again", self.num_restarts)
                break

    async def wait_fatal(self) -> None:
        """Return if the supervisor gave up for good (``fatal_error`` says why)."""
        if self._supervisor is not None:
            await asyncio.wait((self._supervisor,))

    async def _stop_workers(self, workers: _Workers) -> None:
        await workers.scheduler.stop()
        workers.scheduler.fail_jobs(EngineDeadError("worker group stopped"))
        await workers.memory.stop()
        await workers.executor.shutdown()

    async def _profile_for_policy(
        self, config: EngineConfig, executor: WorkerExecutor, ready: dict
    ) -> dict | None:
        """A cost profile for a policy that wants one and was given none in its options:
        the stored one (``profile_path``), else the cached one, else measured now on the
        idle worker (and cached); None when measuring is off (``measure_profile``)."""
        from engine import profile_cache
        from engine.policies.profile import PrefillProfile

        if config.scheduler.profile_path:
            self.profile_source = f"file {config.scheduler.profile_path}"
            return PrefillProfile.load(config.scheduler.profile_path).to_dict()
        directory = profile_cache.cache_dir(config.scheduler.profile_cache_dir)
        key = profile_cache.profile_key(ready["model"]["path"], ready, config.cache.block_size)
        cached = profile_cache.load(directory, key) if directory else None
        if cached is not None:
            profile, path = cached
            self.profile_source = f"cached {path}"
            return profile
        if not config.scheduler.measure_profile:
            self.profile_source = "none cached; the policy's own estimate (measure_profile off)"
            return None
        log.info("profiling the model once for the scheduling policy (cached afterwards)")
        reply = await executor.call("profile", timeout=config.parallel.startup_timeout_s)
        profile = {"prefill": reply["prefill"], "decode": reply["decode"]}
        path = profile_cache.store(directory, key, profile) if directory else None
        self.profile_source = "measured at start-up" + (f", cached in {path}" if path else "")
        return profile

    async def profile(self, **args: object) -> dict:
        """Measure prefill time by input length and step time by batch size on the worker.
        The engine must be idle."""
        try:
            return await self._workers.scheduler.ask("profile", args)
        finally:
            self._progress.close()

    def describe(self) -> dict:
        """What is running and how it is configured (the start-up banner's content)."""
        from engine import version

        ready, cfg = self.worker_info, self.config
        bs, per_block = cfg.cache.block_size, ready["block_bytes"]
        n_dev, n_host = ready["num_gpu_blocks"], ready["num_host_blocks"]
        core = self._workers.scheduler.core
        return {
            "version": version(),
            "model": self.model_info["path"],
            "architecture": self.model_info["architecture"],
            "format": self.model_info["format"],
            "device": ready["device"],
            "dtype": ready["dtype"],
            "num_params": ready.get("num_params"),
            "weight_bytes": ready.get("weight_bytes"),
            "kv": {
                "block_size": bs, "block_bytes": per_block,
                "device_blocks": n_dev, "device_tokens": n_dev * bs,
                "device_bytes": n_dev * per_block,
                "host_blocks": n_host, "host_tokens": n_host * bs,
                "host_bytes": n_host * per_block,
            },
            "max_model_len": self.max_model_len,
            # Requests of max_model_len tokens whose KV fits the device pool at once.
            "max_concurrency": n_dev * bs / self.max_model_len,
            "max_num_seqs": cfg.scheduler.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
            "policy": core.policy.describe(),
            "swap_policy": core.swap_policy.describe(),
            "profile": self.profile_source,
        }

    # Scheduler -> frontend wiring: plain tells, no shared state.
    def _emit(self, events: list) -> None:
        self._frontend.tell("events", events)

    def _fail(self, job_ids: list[str], error: Exception) -> None:
        self._frontend.tell("fail", job_ids, EngineDeadError(f"engine failed: {error}"))

    @property
    def is_serving(self) -> bool:
        w = self._workers
        return not self._closed and w.scheduler.error is None and w.executor.alive

    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output incrementally; the last item has ``finished=True``.

        Leaving the loop early (or cancelling the task) aborts the job and frees its KV.
        Raises ``InvalidRequestError`` before the first item for bad input.
        """
        if not self.is_serving:
            raise EngineDeadError("engine is not serving")
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        grammar = None
        if params.structured is not None:  # a thread compiles it (or the cache has it)
            grammar = await self._grammars.compile(params.structured)
        mailbox = await self._frontend.ask("submit", request_id, prompt, messages, params, grammar)
        finished = False
        try:
            while True:
                out = await mailbox.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._frontend.tell("forget", request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason ``abort``."""
        self._workers.scheduler.tell("abort", request_id)

    async def stats(self) -> dict:
        w = self._workers
        snap = await w.scheduler.ask("snapshot")
        mem = await w.memory.ask("get")
        return {**snap, "memory": mem.to_dict(), "serving": self.is_serving,
                "num_restarts": self.num_restarts}

    async def check_integrity(self) -> None:
        await self._workers.scheduler.ask("check_integrity")

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.wait((self._supervisor,), timeout=10)
        await self._frontend.stop()
        self._frontend.on_fail(list(self._frontend.live), EngineDeadError("engine shut down"))
        await self._stop_workers(self._workers)
        self._grammars.close()

    async def __aenter__(self) -> Engine:  # noqa: PYI034 -- Self needs Python 3.11
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
