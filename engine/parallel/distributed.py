"""Rank layout and the torch.distributed side of a worker: process groups, the tensor-
parallel all-reduce, and stage-to-stage hidden states.

Rank ``r`` of a ``tp x pp`` world is TP rank ``r % tp`` of pipeline stage ``r // tp``. The
*driver* is the last stage's TP rank 0: the only rank that samples and answers steps. Every
rank sees every plan (over ZeroMQ, from the engine) in the same order, so the collectives
and the point-to-point transfers below are always entered in matching order on every rank;
nothing here needs a control message of its own.

Stage ``s`` TP rank ``t`` hands its output to stage ``s + 1`` TP rank ``t`` (each TP rank of
a stage holds the whole hidden state after the row-parallel all-reduce, so pairs suffice).
Sends are asynchronous and waited on before the next one, so a stage may run one batch
ahead of the stage after it: that is what lets ``pp`` batches be in flight at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from engine.parallel.protocol import driver_rank


@dataclass(frozen=True)
class RankLayout:
    rank: int
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_size - 1

    @property
    def driver(self) -> int:
        return driver_rank(self.tp_size, self.pp_size)

    @property
    def is_driver(self) -> bool:
        return self.rank == self.driver

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.tp_size, (stage + 1) * self.tp_size))


def resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


class Distributed:
    """One rank's membership of the world; a single rank (world of one) needs no group."""

    def __init__(
        self,
        layout: RankLayout,
        device: torch.device,
        backend: str = "auto",
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 120.0,
        rendezvous_timeout_s: float | None = None,
    ) -> None:
        self.layout = layout
        self.device = device
        self.tp_group: Any = None
        self.dtype = torch.float32  # of the hidden states between stages; the worker sets it
        self._pending_send: Any = None
        self._send_buf: torch.Tensor | None = None
        self.wait_s = 0.0  # time blocked on the neighbouring stages (benchmarks' bubble)
        if layout.world_size == 1:
            return
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        # Meeting up waits for the slowest rank to start (import torch, set up), which on a
        # busy machine can take far longer than a step may: a tight step deadline (set to
        # catch a hung rank quickly) must not fail the start-up. The store returns on every
        # rank once all have connected; from there on the step deadline applies.
        meet = timedelta(seconds=max(timeout_s, rendezvous_timeout_s or 0.0))
        # Rank 0 hosts the rendezvous store, as torchrun's static rendezvous does.
        store = dist.TCPStore(host, port, layout.world_size, layout.rank == 0, timeout=meet)
        dist.init_process_group(
            resolve_backend(backend, device), store=store, rank=layout.rank,
            world_size=layout.world_size, timeout=timeout,
        )
        self._store = store
        # Every rank creates every group, in the same order (torch.distributed requires it).
        for stage in range(layout.pp_size):
            group = dist.new_group(layout.stage_ranks(stage))
            if stage == layout.stage:
                self.tp_group = group

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over this stage's TP ranks, in place (the row-parallel reduction)."""
        if self.layout.tp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every TP rank's ``x`` along ``dim`` (vocab-parallel logits)."""
        if self.layout.tp_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.layout.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def send_hidden(self, hidden: torch.Tensor) -> None:
        """Hand this stage's output to the same TP rank of the next stage."""
        import torch.distributed as dist

        self.wait_sent()
        self._send_buf = hidden.contiguous()
        self._pending_send = dist.isend(self._send_buf, self.layout.rank + self.layout.tp_size)

    def recv_hidden(self, num_tokens: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        import torch.distributed as dist

        buf = torch.empty((num_tokens, hidden_size), dtype=dtype, device=self.device)
        t0 = time.perf_counter()
        dist.recv(buf, self.layout.rank - self.layout.tp_size)
        self.wait_s += time.perf_counter() - t0
        return buf

    def wait_sent(self) -> None:
        if self._pending_send is not None:
            t0 = time.perf_counter()
            self._pending_send.wait()
            self.wait_s += time.perf_counter() - t0
            self._pending_send = None
            self._send_buf = None

    def close(self) -> None:
        if self.layout.world_size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def stage_forward(
    dist: Distributed,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_caches: list[torch.Tensor],
    attn: Any,
) -> torch.Tensor | None:
    """This rank's part of one forward: receive the previous stage's hidden states (unless
    first), run the stage's layers, hand the result on (unless last: then return it)."""
    layout = dist.layout
    hidden = None
    if not layout.is_first_stage:
        hidden = dist.recv_hidden(input_ids.shape[0], model.args.hidden_size, dist.dtype)
    out = model(input_ids, positions, kv_caches, attn, hidden)
    if layout.is_last_stage:
        return out
    dist.send_hidden(out)
    return None
