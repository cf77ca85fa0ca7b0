"""The load client of ``fastserve bench``: replays a workload against a running server.

Each item is sent at its arrival time (seconds after the run starts) as a streaming
completion with ``max_tokens`` = its output length, greedy, ``ignore_eos`` (so every
request produces exactly its length, as in the simulator). ``max_concurrency`` caps the
requests in flight; a request held back by it is still timed from its arrival. Token
times are taken as each increment arrives: over HTTP one SSE chunk is one token, except
that a chunk may carry a token the server held back (one that ends mid-character), whose
time is then the chunk's; the final usage count is authoritative for the number. Over
ZeroMQ the SDK reports token ids per increment and the job's own scheduler timestamps,
from which queueing time follows.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.bench.metrics import RequestRecord
from engine.bench.workload import WorkItem


class Progress:
    """tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.n, self.desc, self.enabled = total, 0, desc, enabled
        self._bar = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr)
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and (time.monotonic() - self._last > 0.5 or self.n == self.total):
            self._last = time.monotonic()
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _http_one(session: Any, url: str, model: str, prompt: str, rec: RequestRecord,
                    clock: Callable[[], float]) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": rec.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            text = await resp.text()
            rec.error = f"HTTP {resp.status}: {text[:200]}"
            rec.rejected = resp.status == 503 and "queue_full" in text
            return
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                err = msg["error"]
                rec.error = str(err.get("message", err))
                rec.rejected = err.get("code") == "queue_full"
                return
            if msg.get("usage"):
                usage = msg["usage"]
            for choice in msg.get("choices") or ():
                if choice.get("text"):
                    rec.token_s.append(clock())
    rec.finish_s = clock()
    n = (usage or {}).get("completion_tokens", len(rec.token_s))
    if rec.token_s and n > len(rec.token_s):  # held-back tokens came with the last chunk
        rec.token_s.extend([rec.token_s[-1]] * (n - len(rec.token_s)))
    elif not rec.token_s and n:
        rec.token_s = [rec.finish_s] * n


async def _zmq_one(client: Any, prompt: str, rec: RequestRecord, clock: Callable[[], float]) -> None:
    from engine.client import FastServeError, QueueFull

    stats = None
    try:
        async for out in client.generate(prompt, max_tokens=rec.output_len, temperature=0.0,
                                         ignore_eos=True):
            now = clock()
            rec.token_s.extend([now] * len(out.token_ids))
            if out.finished:
                stats = out.stats
    except QueueFull as e:
        rec.error, rec.rejected = str(e), True
        return
    except FastServeError as e:
        rec.error = f"{type(e).__name__}: {e}"
        return
    rec.finish_s = clock()
    if stats and rec.token_s and stats.get("first_token_time") is not None \
            and stats.get("first_scheduled_time") is not None:
        # The server's clock differs from ours; its own first-scheduled-to-first-token
        # interval does not.
        rec.scheduled_s = rec.token_s[0] - (stats["first_token_time"] - stats["first_scheduled_time"])


async def run_load(
    items: Sequence[WorkItem],
    prompts: Sequence[str],
    *,
    backend: str = "http",
    base_url: str | None = None,
    zmq_address: str | None = None,
    model: str = "",
    api_key: str | None = None,
    max_concurrency: int | None = None,
    progress: bool = True,
    desc: str = "bench",
) -> tuple[list[RequestRecord], float]:
    """Send every item at its arrival time; returns one record per item (workload order)
    and the run's duration (first arrival to last finish)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def clock() -> float:
        return loop.time() - t0

    records = [RequestRecord(it.prompt_len, it.output_len, it.arrival_s) for it in items]
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = Progress(len(items), desc, progress)
    session = client = None
    if backend == "http":
        import aiohttp

        if not base_url:
            raise ValueError("the http backend needs --base-url")
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
            connector=aiohttp.TCPConnector(limit=0), headers=_headers(api_key))
        url = base_url.rstrip("/") + "/v1/completions"
    elif backend == "zmq":
        from engine.client import AsyncClient

        if not zmq_address:
            raise ValueError("the zmq backend needs --zmq-address")
        client = AsyncClient(zmq_address, timeout=600.0, api_key=api_key)
    else:
        raise ValueError(f"unknown backend {backend!r}: use http or zmq")

    async def one(i: int) -> None:
        rec = records[i]
        delay = t0 + rec.arrival_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if gate is not None:
                await gate.acquire()
            try:
                if session is not None:
                    await _http_one(session, url, model, prompts[i], rec, clock)
                else:
                    await _zmq_one(client, prompts[i], rec, clock)
            finally:
                if gate is not None:
                    gate.release()
        except Exception as e:  # noqa: BLE001 - one failed request must not end the run
            rec.error = f"{type(e).__name__}: {e}"
        bar.update()

    try:
        await asyncio.gather(*(one(i) for i in range(len(items))))
    finally:
        bar.close()
        if session is not None:
            await session.close()
        if client is not None:
            await client.close()
    ends = [r.finish_s for r in records if r.finish_s is not None]
    return records, (max(ends) if ends else clock())
