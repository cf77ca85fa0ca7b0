"""Helpers for tests that run the real engine (worker process, ZeroMQ, real model)."""

from __future__ import annotations

import asyncio

from engine.api import Engine
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.sampling import SamplingParams


def tiny_engine_config(path: str, gpu_blocks: int = 512, host_blocks: int = 512, **sched) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(path=path, dtype="float32"),
        cache=CacheConfig(block_size=4, num_gpu_blocks_override=gpu_blocks, num_host_blocks_override=host_blocks),
        scheduler=SchedulerConfig(**sched),
    )


async def collect(engine: Engine, prompt, params: SamplingParams, **kw) -> tuple[list[int], str, str | None]:
    ids: list[int] = []
    text: list[str] = []
    reason = None
    async for out in engine.generate(prompt, params, **kw):
        ids.extend(out.token_ids)
        text.append(out.text)
        reason = out.finish_reason
    return ids, "".join(text), reason


async def wait_all_blocks_free(engine: Engine, timeout: float = 10.0) -> dict:
    """Frees travel through actor mailboxes: poll (bounded) until the pools are whole."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        stats = await engine.stats()
        whole = (stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
                 and stats["num_free_host_blocks"] == stats["num_host_blocks"] and not stats["jobs"])
        if whole or loop.time() > deadline:
            return stats
        await asyncio.sleep(0.02)


def assert_pools_whole(stats: dict) -> None:
    assert stats["jobs"] == []
    assert stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_free_host_blocks"] == stats["num_host_blocks"]
