"""Worker-side execution of step plans: per-job state, batch assembly, forward, sampling.

The runner keeps each job's token history and block table, so a plan carries only what
changed. A decode step of a job is just ``(id, start, 1)``: the token it feeds is the one
this runner sampled for it last step. Under pipeline or tensor parallelism only the driver
rank samples, so a plan also carries the output tokens each sequence feeds (``feed``), and
``dist`` routes the forward through this rank's stage (see ``engine.parallel.distributed``).
A job whose params ask for ``prompt_logprobs`` also has its prompt rows scored as they are
prefilled (``_score_prompts``); jobs that do not ask cost nothing extra.
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
from engine.sampler import Sampler

# Prompt logprobs: rows of hidden states put through the LM head at a time, which bounds the
# fp32 logits held at once to this many x vocab (a long prompt chunk does not hold them all).
PROMPT_LOGPROBS_ROWS = 256


@dataclass
class _JobState:
    tokens: list[int]
    table: list[int] = field(default_factory=list)
    prompt_len: int = 0
    # Prompt logprobs (``prompt_logprobs`` of the job's params): the top-k count, None if
    # not asked; and the next prompt position to score. Each position is scored once: a
    # chunk that feeds positions scored before (recompute after preemption) skips them.
    prompt_logprobs: int | None = None
    prompt_scored_to: int = 1


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
        if host_pool is not None:  # only a host pool has proactive moves to copy
            self.copier.start()
        self.dist: Distributed | None = None  # set by a worker that is one rank of several

    def step(self, msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        # Last step's proactive copies must land before any block is read or reused.
        async_swap_s = self.copier.wait()
        for jid in msg["free"]:
            self.jobs.pop(jid, None)
            self.sampler.remove(jid)
        for new in msg["new"]:
            tokens = [int(t) for t in new["prompt"]]
            self.jobs[new["id"]] = _JobState(tokens=tokens, prompt_len=len(tokens),
                                             prompt_logprobs=new["params"].get("prompt_logprobs"))
            self.sampler.add(new["id"], new["params"], new["prompt"])
        demand_swap_s = self._swap(msg["swap_out"], msg["swap_in"])
        offload, prefetch = msg.get("offload") or [], msg.get("prefetch") or []
        if offload or prefetch:
            self.copier.submit(self.gpu_pool, self._host(), [tuple(p) for p in offload],
                               [tuple(p) for p in prefetch])
        sampled_ids: list[str] = []
        tokens: list[int] = []
        logprobs: list[Any] = []
        prompt_logprobs: list[Any] = []
        if msg["seqs"]:
            sampled_ids, tokens, logprobs, prompt_logprobs = self._forward(
                msg["seqs"], msg.get("grammar"))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        reply = {
            "kind": "step_done",
            "step": msg["step"],
            "ids": sampled_ids,
            "tokens": np.asarray(tokens, dtype=np.int64),
            "logprobs": logprobs,
            "elapsed": time.perf_counter() - t0,
            # Copy time: demand swaps of this step, proactive copies that landed at its start.
            "swap_s": demand_swap_s + async_swap_s,
        }
        if prompt_logprobs:  # [[job id, first position, [entry, ...]], ...]
            reply["prompt_logprobs"] = prompt_logprobs
        return reply

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
    def _forward(
        self, seqs: list, grammar: dict | None = None
    ) -> tuple[list[str], list[int], list[Any], list[Any]]:
        inputs = self._assemble(seqs)
        if self.dist is None:
            hidden = self.model(inputs.input_ids, inputs.positions, self.gpu_pool.caches, inputs.attn)
        else:  # this rank's stage: receive, run its layers, hand on (None unless last)
            hidden = stage_forward(self.dist, self.model, inputs.input_ids, inputs.positions,
                                   self.gpu_pool.caches, inputs.attn)
        if hidden is None:
            return [], [], [], []
        prompt_logprobs = self._score_prompts(hidden, inputs) if inputs.prompt_spans else []
        if not inputs.sample_ids:
            return [], [], [], prompt_logprobs
        if inputs.sample_rows is not None:
            hidden = hidden[inputs.sample_rows]
        logits = self.model.compute_logits(hidden)  # float32 by the model contract
        if self.dist is not None and not self.dist.layout.is_driver:
            return [], [], [], []  # computed the logits for the TP collective; the driver samples
        bitmask = None
        if grammar:  # constrained rows: {"ids": job ids, "bitmask": int32 [n, ceil(V/32)]}
            row_of = {jid: i for i, jid in enumerate(inputs.sample_ids)}
            # np.array: a writable copy (the received frame is read-only)
            words = torch.from_numpy(np.array(grammar["bitmask"], dtype=np.int32))
            bitmask = ([row_of[jid] for jid in grammar["ids"]], words)
        result = self.sampler.sample(logits, inputs.sample_ids, bitmask)
        for jid, tok in zip(inputs.sample_ids, result.token_ids):
            self.jobs[jid].tokens.append(tok)
        logprobs: list[Any] = []
        if result.logprobs is not None:
            logprobs = [
                None if lp is None else [lp, [list(p) for p in (top or [])]]
                for lp, top in zip(result.logprobs, result.top_logprobs or [None] * len(inputs.sample_ids))
            ]
        return inputs.sample_ids, result.token_ids, logprobs, prompt_logprobs

    def _score_prompts(self, hidden: torch.Tensor, inputs: _StepInputs) -> list[Any]:
        """Prompt logprobs of the jobs that asked (``_StepInputs.prompt_spans``): the hidden
        state of row r predicts the token of row r + 1, so a span's rows give the log_softmax
        (fp32) of its next prompt tokens. Only those rows go through the LM head, in slices
        of ``PROMPT_LOGPROBS_ROWS``; every TP rank of the last stage takes part (the head's
        collective), only the driver returns entries ``[[job id, first position,
        [[logprob, [[token id, logprob], ...top k]], ...]], ...]``."""
        spans = inputs.prompt_spans
        rows = torch.cat([torch.arange(r, r + n) for _, _, r, n, _, _ in spans])
        targets = torch.tensor([t for *_, tgt in spans for t in tgt], dtype=torch.int64)
        driver = self.dist is None or self.dist.layout.is_driver
        chosen: list[float] = []
        top_vals: list[list[float]] = []
        top_ids: list[list[int]] = []
        max_k = max(k for *_, k, _ in spans)
        for lo in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
            sel = rows[lo : lo + PROMPT_LOGPROBS_ROWS].to(hidden.device)
            logits = self.model.compute_logits(hidden[sel])
            if not driver:
                continue
            lp = torch.log_softmax(logits.float(), dim=-1)
            tgt = targets[lo : lo + PROMPT_LOGPROBS_ROWS].to(lp.device)
            chosen += lp.gather(1, tgt.unsqueeze(1)).squeeze(1).tolist()
            if max_k > 0:
                vals, ids = lp.topk(min(max_k, lp.shape[1]), dim=-1)
                top_vals += vals.tolist()
                top_ids += ids.tolist()
        if not driver:
            return []
        out: list[Any] = []
        i = 0
        for jid, first, _, n, k, _ in spans:
            entries = []
            for j in range(i, i + n):
                top = [[t, v] for t, v in zip(top_ids[j][:k], top_vals[j][:k])] if k else []
                entries.append([chosen[j], top])
            out.append([jid, first, entries])
            i += n
        return out

    def _assemble(self, seqs: list) -> _StepInputs:
        """The step's indexing, built with numpy and moved to the device as one tensor.

        Python touches each sequence once (its table and token slice); positions, slots and
        the padded block table are vector ops, and the device gets a single int64 buffer
        whose slices are the step's tensors.
        """
        bs = self.block_size
        num = len(seqs)
        starts = np.empty(num, dtype=np.int64)
        query_lens = np.empty(num, dtype=np.int64)
        tables: list[list[int]] = []
        tokens: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        prompt_spans: list[tuple[str, int, int, int, int, list[int]]] = []
        for i, (jid, start, n, blocks, reset, sample, *feed) in enumerate(seqs):
            job = self.jobs[jid]
            if reset:
                job.table = list(blocks)
            elif blocks:
                job.table.extend(blocks)
            end = start + n
            if feed and len(feed[0]):  # output tokens another rank sampled
                job.tokens[end - len(feed[0]) : end] = [int(t) for t in feed[0]]
            if end > len(job.tokens):
                raise RuntimeError(f"job {jid}: plan feeds up to {end}, worker has {len(job.tokens)} tokens")
            if job.prompt_logprobs is not None:
                # Rows at positions q in [lo, hi) score prompt tokens q + 1 not yet scored.
                lo, hi = max(start, job.prompt_scored_to - 1), min(end, job.prompt_len - 1)
                if lo < hi:
                    prompt_spans.append((jid, lo + 1, len(tokens) + lo - start, hi - lo,
                                         job.prompt_logprobs, job.tokens[lo + 1 : hi + 1]))
                    job.prompt_scored_to = hi + 1
            tokens += job.tokens[start:end]
            starts[i], query_lens[i] = start, n
            tables.append(job.table)
            if sample:
                sample_rows.append(len(tokens) - 1)
                sample_ids.append(jid)
        total = len(tokens)
        width = max(len(t) for t in tables)
        table_arr = np.zeros((num, width), dtype=np.int64)
        for i, t in enumerate(tables):
            table_arr[i, : len(t)] = t
        # Token j of sequence i sits at position starts[i] + j.
        seq_of = np.repeat(np.arange(num), query_lens)
        positions = np.arange(total) + np.repeat(starts - (np.cumsum(query_lens) - query_lens), query_lens)
        slots = table_arr[seq_of, positions // bs] * bs + positions % bs
        all_sampled = len(sample_rows) == total  # a pure decode step: no row selection
        parts = [np.asarray(tokens, dtype=np.int64), positions, slots, table_arr.ravel()]
        if not all_sampled:
            parts.append(np.asarray(sample_rows, dtype=np.int64))
        packed = torch.from_numpy(np.concatenate(parts)).to(self.device)
        input_ids, positions_t, slots_t, tables_t, rows_t = packed.split(
            [total, total, total, table_arr.size, 0 if all_sampled else len(sample_rows)])
        attn = AttentionMetadata(
            query_lens=query_lens.tolist(),
            context_lens=(starts + query_lens).tolist(),
            block_tables=tables_t.view(num, width),
            slot_mapping=slots_t,
            block_size=bs,
            host_block_tables=table_arr,
        )
        return _StepInputs(input_ids, positions_t, attn, None if all_sampled else rows_t, sample_ids,
                           prompt_spans)


@dataclass
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_rows: torch.Tensor | None  # rows of the hidden states to sample; None: every row
    sample_ids: list[str]
    # Jobs scoring prompt tokens this step: (job id, first position scored, its first row,
    # rows, top-k, the prompt tokens scored).
    prompt_spans: list[tuple[str, int, int, int, int, list[int]]] = field(default_factory=list)
