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

from engine.actors.frontend import FrontendActor, RequestOutput
from engine.actors.memory import MemoryManagerActor
from engine.actors.scheduler import SchedulerActor
from engine.config import EngineConfig, config_to_dict
from engine.memory.block_manager import BlockManager
from engine.models.loader import ModelLoadError
from engine.parallel.executor import WorkerError, WorkerExecutor
from engine.parallel.protocol import PROTOCOL_VERSION
from engine.policies.registry import create_scheduling_policy, create_swap_policy, wants_profile
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import Tokenizer

log = logging.getLogger("fastserve.engine")

__all__ = ["Engine", "EngineDeadError", "RequestOutput", "SamplingParams"]


class EngineDeadError(RuntimeError):
    """The engine cannot serve (its worker died or it was shut down)."""


class Engine:
    def __init__(self) -> None:  # use Engine.create()
        self.config: EngineConfig
        self.tokenizer: Tokenizer
        self.model_info: dict
        self.worker_info: dict
        self._executor: WorkerExecutor
        self._scheduler: SchedulerActor
        self._frontend: FrontendActor
        self._memory: MemoryManagerActor
        self._closed = False
        self.profile_source: str | None = None  # where the policy's cost profile came from

    @classmethod
    async def create(
        cls, config: EngineConfig | None = None, *, progress_bars: bool | None = None
    ) -> Engine:
        """Start the worker, load the model, profile it if the policy needs a profile.
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
        policy = create_scheduling_policy(config.scheduler.policy, dict(config.scheduler.policy_options))
        swap_policy = create_swap_policy(config.scheduler.swap_policy, dict(config.scheduler.swap_policy_options))
        self.config = config
        self._executor = WorkerExecutor(config.parallel.step_timeout_s, config.parallel.startup_timeout_s)
        self._progress = StartupProgress(progress_bars)
        self._executor.on_progress = self._progress
        init = {
            "version": PROTOCOL_VERSION,
            "model": {**config_to_dict(config.model), "path": path},
            "cache": config_to_dict(config.cache),
            "parallel": config_to_dict(config.parallel),
        }
        tok_task = loop.run_in_executor(None, Tokenizer.load, path)
        try:
            ready, self.tokenizer = await asyncio.gather(self._executor.start(init), tok_task)
        except BaseException as e:
            self._progress.close()
            await self._executor.shutdown()
            if isinstance(e, WorkerError) and e.type == "ModelLoadError":
                raise ModelLoadError(e.detail) from None
            raise
        self._progress.close()
        self.worker_info = ready
        if wants_profile(policy):
            try:
                profile = await self._profile_for_policy(config)
                if profile is not None:
                    policy.set_profile(profile)
            except BaseException:
                await self._executor.shutdown()
                raise
            finally:
                self._progress.close()
        self.model_info = ready["model"]
        max_len = info.max_model_len
        if config.model.max_model_len:
            max_len = (config.model.max_model_len if config.model.allow_long_context
                       else min(max_len, config.model.max_model_len))
        eos = frozenset(info.eos_token_ids) | self.tokenizer.eos_token_ids
        blocks = BlockManager(ready["num_gpu_blocks"], ready["num_host_blocks"], config.cache.block_size)
        core = Scheduler(config.scheduler, policy, swap_policy, blocks)
        self._scheduler = SchedulerActor(core, self._executor, emit=self._emit, fail=self._fail)
        self._memory = MemoryManagerActor(blocks.num_gpu_blocks, blocks.num_host_blocks,
                                          ready["block_bytes"], self._scheduler)
        self._scheduler.memory = self._memory
        self._frontend = FrontendActor(self.tokenizer, max_len, eos, info.vocab_size, self._scheduler)
        self.max_model_len = max_len
        for actor in (self._scheduler, self._frontend, self._memory):
            actor.start()
        return self

    async def _profile_for_policy(self, config: EngineConfig) -> dict | None:
        """A cost profile for a policy that wants one and was given none in its options:
        the stored one (``profile_path``), else the cached one, else measured now on the
        idle worker (and cached); None when measuring is off (``measure_profile``)."""
        from engine import profile_cache
        from engine.policies.profile import PrefillProfile

        if config.scheduler.profile_path:
            self.profile_source = f"file {config.scheduler.profile_path}"
            return PrefillProfile.load(config.scheduler.profile_path).to_dict()
        directory = profile_cache.cache_dir(config.scheduler.profile_cache_dir)
        key = profile_cache.profile_key(self.worker_info["model"]["path"], self.worker_info,
                                        config.cache.block_size)
        cached = profile_cache.load(directory, key) if directory else None
        if cached is not None:
            profile, path = cached
            self.profile_source = f"cached {path}"
            return profile
        if not config.scheduler.measure_profile:
            self.profile_source = "none cached; the policy's own estimate (measure_profile off)"
            return None
        log.info("profiling the model once for the scheduling policy (cached afterwards)")
        reply = await self._executor.call("profile", timeout=self.config.parallel.startup_timeout_s)
        profile = {"prefill": reply["prefill"], "decode": reply["decode"]}
        path = profile_cache.store(directory, key, profile) if directory else None
        self.profile_source = "measured at start-up" + (f", cached in {path}" if path else "")
        return profile

    async def profile(self, **args: object) -> dict:
        """Measure prefill time by input length and step time by batch size on the worker.
        The engine must be idle."""
        try:
            return await self._scheduler.ask("profile", args)
        finally:
            self._progress.close()

    def describe(self) -> dict:
        """What is running and how it is configured (the start-up banner's content)."""
        from engine import version

        ready, cfg = self.worker_info, self.config
        bs, per_block = cfg.cache.block_size, ready["block_bytes"]
        n_dev, n_host = ready["num_gpu_blocks"], ready["num_host_blocks"]
        core = self._scheduler.core
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
        return not self._closed and self._scheduler.error is None and self._executor.alive

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
        mailbox = await self._frontend.ask("submit", request_id, prompt, messages, params)
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
        self._scheduler.tell("abort", request_id)

    async def stats(self) -> dict:
        snap = await self._scheduler.ask("snapshot")
        mem = await self._memory.ask("get")
        return {**snap, "memory": mem.to_dict(), "serving": self.is_serving}

    async def check_integrity(self) -> None:
        await self._scheduler.ask("check_integrity")

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for actor in (self._frontend, self._memory, self._scheduler):
            await actor.stop()
        self._frontend.on_fail(list(self._frontend.live), EngineDeadError("engine shut down"))
        await self._executor.shutdown()

    async def __aenter__(self) -> Engine:  # noqa: PYI034 -- Self needs Python 3.11
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()
