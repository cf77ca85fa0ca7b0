"""Worker-side execution of step plans: per-job state, batch assembly, forward, sampling.

The runner keeps each job's token history and block table, so a plan carries only what
changed. A decode step of a job is just ``(id, start, 1)``: the token it feeds is the one
this runner sampled for it last step. Under pipeline or tensor parallelism only the driver
rank samples, so a plan also carries the output tokens each sequence feeds (``feed``), and
``dist`` routes the forward through this rank's stage (see ``engine.parallel.distributed``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.memory.kv_cache import AsyncBlockCopier, KVCachePool, copy_blocks
from engine.models.base import AttentionMetadata
from engine.parallel.distributed import Distributed, stage_forward
from engine.sampling import Sampler


@dataclass
class _JobState:
    tokens: list[int]
    table: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        gpu_pool: KVCachePool,
        host_pool: KVCachePool | None,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.gpu_pool = gpu_pool
        self.host_pool = host_pool
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self.jobs: dict[str, _JobState] = {}
        self.copier = AsyncBlockCopier(device)
        self.dist: Distributed | None = None  # set by a worker that is one rank of several

    def step(self, msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        # Last step's proactive copies must land before any block is read or reused.
        async_swap_s = self.copier.wait()
        for jid in msg["free"]:
            self.jobs.pop(jid, None)
            self.sampler.remove(jid)
        for new in msg["new"]:
            self.jobs[new["id"]] = _JobState(tokens=[int(t) for t in new["prompt"]])
            self.sampler.add(new["id"], new["params"])
        demand_swap_s = self._swap(msg["swap_out"], msg["swap_in"])
        offload, prefetch = msg.get("offload") or [], msg.get("prefetch") or []
        if offload or prefetch:
            self.copier.submit(self.gpu_pool, self._host(), [tuple(p) for p in offload],
                               [tuple(p) for p in prefetch])
        sampled_ids: list[str] = []
        tokens: list[int] = []
        logprobs: list[Any] = []
        if msg["seqs"]:
            sampled_ids, tokens, logprobs = self._forward(msg["seqs"])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {
            "kind": "step_done",
            "step": msg["step"],
            "ids": sampled_ids,
            "tokens": np.asarray(tokens, dtype=np.int64),
            "logprobs": logprobs,
            "elapsed": time.perf_counter() - t0,
            # Copy time: demand swaps of this step, proactive copies that landed at its start.
            "swap_s": demand_swap_s + async_swap_s,
        }

    def _host(self) -> KVCachePool:
        if self.host_pool is None:
            raise RuntimeError("plan swaps but this worker has no host pool")
        return self.host_pool

    def _swap(self, swap_out: list, swap_in: list) -> float:
        if not (swap_out or swap_in):
            return 0.0
        t0 = time.perf_counter()
        # Order matters (see BlockManager): out before in, both before the forward.
        copy_blocks(self.gpu_pool, self._host(), [tuple(p) for p in swap_out])
        copy_blocks(self._host(), self.gpu_pool, [tuple(p) for p in swap_in])
        return time.perf_counter() - t0

    @torch.inference_mode()
    def _forward(self, seqs: list) -> tuple[list[str], list[int], list[Any]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        bs = self.block_size
        for jid, start, n, blocks, reset, sample, *feed in seqs:
            job = self.jobs[jid]
            if reset:
                job.table = list(blocks)
            else:
                job.table.extend(blocks)
            end = start + n
            if feed and len(feed[0]):  # output tokens another rank sampled
                job.tokens[end - len(feed[0]) : end] = [int(t) for t in feed[0]]
            if end > len(job.tokens):
                raise RuntimeError(f"job {jid}: plan feeds up to {end}, worker has {len(job.tokens)} tokens")
            input_ids.extend(job.tokens[start:end])
            positions.extend(range(start, end))
            table = job.table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            tables.append(table)
            if sample:
                sample_rows.append(len(input_ids) - 1)
                sample_ids.append(jid)
        width = max(len(t) for t in tables)
        table_arr = np.zeros((len(tables), width), dtype=np.int64)
        for i, t in enumerate(tables):
            table_arr[i, : len(t)] = t
        dev = self.device
        attn = AttentionMetadata(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=torch.from_numpy(table_arr).to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_size=bs,
        )
        ids_t = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        if self.dist is None:
            hidden = self.model(ids_t, pos_t, self.gpu_pool.caches, attn)
        else:
            hidden = stage_forward(self.dist, self.model, ids_t, pos_t, self.gpu_pool.caches, attn)
        if not sample_ids or hidden is None:
            return [], [], []
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        if self.dist is not None and not self.dist.layout.is_driver:
            return [], [], []  # computed the logits for the TP collective; the driver samples
        result = self.sampler.sample(logits.float(), sample_ids)
        for jid, tok in zip(sample_ids, result.token_ids):
            self.jobs[jid].tokens.append(int(tok))
        logprobs: list[Any] = []
        if result.logprobs is not None:
            logprobs = [
                None if lp is None else [lp, [list(p) for p in (top or [])]]
                for lp, top in zip(result.logprobs, result.top_logprobs or [None] * len(sample_ids))
            ]
        return sample_ids, list(result.token_ids), logprobs
