"""The executor's control plane against fake ranks (threads with ZeroMQ sockets, no torch):
every command reaches every rank once and in order, only the driver answers steps, the KV
pools are sized to the smallest rank, and an error on any rank fails the world."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq

from engine.config import ParallelConfig
from engine.parallel.executor import WorkerDiedError, WorkerError, WorkerExecutor
from engine.parallel.protocol import decode, encode
from engine.parallel.worker import rank_identity

pytestmark = pytest.mark.asyncio


class FakeRank(threading.Thread):
    """Answers like a worker rank: init -> ready (pool size 100 - rank), steps only as the
    driver, and an error for the step numbered ``fail_step`` (to which the other ranks,
    waiting for the failed one as real stages would, never answer)."""

    def __init__(self, address: str, rank: int, driver: int, fail_step: int | None = None,
                 fail_rank: int | None = None) -> None:
        super().__init__(daemon=True)
        self.address, self.rank, self.driver, self.fail_step = address, rank, driver, fail_step
        self.fail_rank = fail_rank
        self.seen: list[tuple[str, object]] = []

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, rank_identity(self.rank))
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.address)
        sock.send_multipart(encode({"kind": "hello", "rank": self.rank, "pid": 1000 + self.rank}))
        try:
            while sock.poll(10_000):
                msg = decode(sock.recv_multipart())
                kind = msg["kind"]
                self.seen.append((kind, msg.get("step")))
                reply = self.answer(msg)
                if reply is not None:
                    sock.send_multipart(encode({**reply, "call": msg["call"], "rank": self.rank}))
                if kind == "shutdown":
                    return
        finally:
            sock.close()
            ctx.term()

    def answer(self, msg: dict) -> dict | None:
        kind = msg["kind"]
        if kind == "init":
            return {"kind": "ready", "pid": 1000 + self.rank, "device": "cpu", "num_gpu_blocks": 100 - self.rank,
                    "num_host_blocks": 50, "block_bytes": 10, "model": {}}
        if kind == "resize_cache":
            return {"kind": "resized"}
        if kind == "step":
            if msg["step"] == self.fail_step:
                if self.rank != self.fail_rank:
                    return None
                return {"kind": "error", "type": "RuntimeError", "message": f"rank {self.rank} broke"}
            return {"kind": "step_done", "step": msg["step"]} if self.rank == self.driver else None
        if kind == "shutdown":
            return {"kind": "bye"}
        return None


async def start_world(tp: int, pp: int, fail: tuple[int, int] | None = None):
    """``fail``: (rank, step) that rank fails."""
    cfg = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                         remote_ranks=tuple(range(tp * pp)), startup_timeout_s=10.0, step_timeout_s=10.0)
    executor = WorkerExecutor(10.0, 10.0, cfg)
    fail_rank, fail_step = fail or (None, None)
    ranks = [FakeRank(executor.address, r, executor.driver, fail_step, fail_rank) for r in range(tp * pp)]
    for r in ranks:
        r.start()
    ready = await executor.start({"version": 1, "parallel": {}})
    return executor, ranks, ready


async def test_every_rank_gets_every_plan_in_order_and_only_the_driver_answers():
    executor, ranks, ready = await start_world(2, 2)
    try:
        await _check_world(executor, ranks, ready)
    finally:
        await executor.shutdown()
    for r in ranks:
        r.join(5)
        # ...every rank was resized to it, and saw each command exactly once, in order.
        assert r.seen == [("init", None), ("resize_cache", None), *[("step", i) for i in range(6)],
                          ("shutdown", None)]


async def _check_world(executor: WorkerExecutor, ranks: list[FakeRank], ready: dict) -> None:
    assert executor.driver == 2
    assert ready["num_gpu_blocks"] == 97  # the smallest any rank can hold...
    assert ready["block_bytes"] == 40  # ...and a block's bytes summed over the ranks
    # Several steps in flight at once, as a pipeline runs them.
    answers = [await executor.submit("step", step=i) for i in range(6)]
    replies = await asyncio.gather(*answers)
    assert [r["step"] for r in replies] == list(range(6))
    assert all(r["rank"] == 2 for r in replies)


async def test_an_error_on_a_non_driver_rank_fails_the_step_and_the_world():
    executor, ranks, _ = await start_world(1, 2, fail=(0, 1))
    try:
        first = await executor.submit("step", step=0)
        second = await executor.submit("step", step=1)
        with pytest.raises(WorkerError, match="rank 0 broke"):
            await second
        # Step 0 races rank 0's error for step 1: the driver's answer may arrive first, or
        # the world may already be failed; it is never silently lost either way.
        try:
            assert (await first)["step"] == 0
        except WorkerDiedError as e:
            assert "rank 0 broke" in str(e)
        assert not executor.alive
        with pytest.raises(WorkerDiedError):
            await executor.call("step", step=2)
    finally:
        await executor.shutdown()
    for r in ranks:
        r.join(5)
