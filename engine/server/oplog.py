"""What the operator reads while the server runs: one access line per HTTP request and a
periodic stats line while the engine is busy. Field meanings: docs/serving.md.

Token counts and TTFT reach the access line through a context variable: the access
middleware puts a fresh :class:`AccessRecord` in the request's context, and the
per-choice request trackers (created in tasks that inherit that context) add to it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

access_log = logging.getLogger("fastserve.access")
stats_log = logging.getLogger("fastserve.stats")

# Probes and scrapes come every few seconds: logged at DEBUG so they do not drown requests.
QUIET_ROUTES = ("/health", "/metrics")


@dataclass
class AccessRecord:
    start: float
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token: float | None = None

    def on_output(self, out: Any, now: float, first_of_choice: bool) -> None:
        if first_of_choice:
            self.prompt_tokens += int(getattr(out, "num_prompt_tokens", 0) or 0)
        n = len(out.token_ids)
        self.output_tokens += n
        if n and self.first_token is None:
            self.first_token = now


CURRENT: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar(
    "fastserve_access_record", default=None)


def access_middleware(clock: Callable[[], float] = time.monotonic) -> Callable:
    @web.middleware
    async def log_access(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        record = AccessRecord(clock())
        token = CURRENT.set(record)
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client hung up (nginx's code for it)
            raise
        finally:
            CURRENT.reset(token)
            _log_access(request, status, record, clock() - record.start)

    return log_access


def _log_access(request: web.Request, status: int, r: AccessRecord, duration: float) -> None:
    level = logging.DEBUG if request.path in QUIET_ROUTES else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    ttft = None if r.first_token is None else r.first_token - r.start
    fields = {"event": "access", "remote": request.remote, "method": request.method,
              "route": request.path, "status": status, "prompt_tokens": r.prompt_tokens,
              "output_tokens": r.output_tokens,
              "ttft_s": None if ttft is None else round(ttft, 4),
              "duration_s": round(duration, 4)}
    access_log.log(level, '%s "%s %s" %d prompt_tokens=%d output_tokens=%d ttft=%s duration=%.3fs',
                   request.remote, request.method, request.path, status, r.prompt_tokens,
                   r.output_tokens, "-" if ttft is None else f"{ttft:.3f}s", duration,
                   extra={"fields": fields})


# -- the periodic stats line ---------------------------------------------------------------
def stats_fields(prev: dict | None, cur: dict, dt: float) -> dict:
    """The stats line's numbers from two ``engine.stats()`` snapshots ``dt`` seconds apart."""
    jobs = cur.get("jobs") or []
    states: dict[str, int] = {}
    levels: dict[int, int] = {}
    for j in jobs:
        states[j.get("state", "")] = states.get(j.get("state", ""), 0) + 1
        level = int(j.get("queue_level", 0))
        levels[level] = levels.get(level, 0) + 1

    def rate(key: str) -> float:
        if prev is None or dt <= 0:
            return 0.0
        return max(0, cur.get(key, 0) - prev.get(key, 0)) / dt

    def usage(pool: str) -> float:
        total, free = cur.get(f"num_{pool}_blocks", 0), cur.get(f"num_free_{pool}_blocks", 0)
        return 1.0 - free / total if total else 0.0

    preempted = cur.get("num_preemptions", 0)
    return {
        "event": "stats",
        "prompt_tok_s": round(rate("num_prompt_tokens_total"), 2),
        "generation_tok_s": round(rate("num_generation_tokens_total"), 2),
        "running": states.get("running", 0),
        "waiting": states.get("waiting", 0),
        "swapped": states.get("swapped", 0),
        "queue_levels": {str(k): v for k, v in sorted(levels.items())},
        "device_kv_usage": round(usage("gpu"), 4),
        "host_kv_usage": round(usage("host"), 4),
        "prompt_tokens_total": cur.get("num_prompt_tokens_total", 0),
        "generation_tokens_total": cur.get("num_generation_tokens_total", 0),
        "preemptions": preempted,
        "new_preemptions": preempted - (prev or {}).get("num_preemptions", preempted),
    }


def format_stats(f: dict) -> str:
    levels = " ".join(f"L{k}:{v}" for k, v in f["queue_levels"].items()) or "-"
    return (f"prompt {f['prompt_tok_s']:.1f} tok/s, generation {f['generation_tok_s']:.1f} tok/s "
            f"(totals {f['prompt_tokens_total']}, {f['generation_tokens_total']}); "
            f"running {f['running']}, waiting {f['waiting']}, swapped {f['swapped']}; "
            f"queues {levels}; KV device {100 * f['device_kv_usage']:.1f}%, "
            f"host {100 * f['host_kv_usage']:.1f}%; preemptions {f['preemptions']} "
            f"(+{f['new_preemptions']})")


def _busy(prev: dict | None, cur: dict) -> bool:
    if cur.get("jobs"):
        return True
    keys = ("num_prompt_tokens_total", "num_generation_tokens_total")
    return prev is not None and any(cur.get(k, 0) != prev.get(k, 0) for k in keys)


async def log_stats_forever(engine: Any, interval_s: float,
                            clock: Callable[[], float] = time.monotonic) -> None:
    """Every ``interval_s`` seconds, one stats line if the engine did or holds any work."""
    prev: dict | None = None
    then = clock()
    while True:
        try:
            cur = await asyncio.wait_for(engine.stats(), timeout=max(interval_s, 1.0))
        except Exception as e:  # noqa: BLE001 - timeouts included: a log line must not kill serving
            stats_log.warning("engine stats unavailable: %s: %s", type(e).__name__, e)
            await asyncio.sleep(interval_s)
            continue
        now = clock()
        if prev is None:  # the baseline: totals before serving started
            prev, then = cur, now
            await asyncio.sleep(interval_s)
            continue
        if _busy(prev, cur):
            fields = stats_fields(prev, cur, now - then)
            stats_log.info("%s", format_stats(fields), extra={"fields": fields})
        prev, then = cur, now
        await asyncio.sleep(interval_s)
