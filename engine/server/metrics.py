"""Prometheus metrics (``fastserve:`` prefix, names and meanings after vLLM's ``vllm:``).

Each app gets its own ``CollectorRegistry`` so several servers (tests, embedded use) in one
process never share or double-register series. Two sources feed it:

* per request, a ``RequestTracker`` sees every output the server forwards: latencies
  (TTFT, inter-token, end-to-end, queue time), token counters, finish reasons, and the
  job's scheduling/memory stats reported on its final output;
* at scrape time, ``refresh(engine.stats())`` sets the gauges (running/waiting jobs, KV
  usage, jobs per MLFQ level) and advances counters the engine keeps cumulatively
  (preemptions, swap traffic) by their increase since the previous scrape.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.server.oplog import CURRENT

__all__ = ["CONTENT_TYPE_LATEST", "RequestTracker", "ServerMetrics"]

# vLLM's buckets, so dashboards built for vLLM read these histograms the same way.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

P = "fastserve:"
M = ["model_name"]

# engine.stats()["memory"] keys mirrored as counters: key -> (metric suffix, help).
_MEMORY_COUNTERS = {
    "swap_out_bytes": ("swap_out_bytes", "Bytes of KV cache copied GPU -> host."),
    "swap_in_bytes": ("swap_in_bytes", "Bytes of KV cache copied host -> GPU."),
    "swap_out_blocks": ("swap_out_blocks", "KV blocks copied GPU -> host."),
    "swap_in_blocks": ("swap_in_blocks", "KV blocks copied host -> GPU."),
    "proactive_out_blocks": ("proactive_swap_out_blocks", "KV blocks offloaded ahead of need."),
    "proactive_in_blocks": ("proactive_swap_in_blocks", "KV blocks uploaded ahead of need."),
    # The worker times its copies per step, both directions together (proactive copies
    # overlap compute, so they are not on any request's critical path).
    "swap_seconds": ("swap_seconds", "Seconds the worker spent copying KV cache GPU <-> host."),
}


class ServerMetrics:
    def __init__(self, model_name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.model_name = model_name
        self.clock = clock
        r = self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, labels: list[str] = M) -> Gauge:
            return Gauge(P + name, doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str] = M) -> Counter:
            return Counter(P + name, doc, labels, registry=r)

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(P + name, doc, M, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Jobs whose KV cache is on the GPU (running).")
        self.waiting = gauge(
            "num_requests_waiting", "Jobs waiting to run (not yet run, or preempted by recompute)."
        )
        self.swapped = gauge("num_requests_swapped", "Jobs whose KV cache lives in host memory.")
        self.kv_usage = gauge(
            "kv_cache_usage_perc", "Fraction of GPU KV-cache blocks in use (1 = full)."
        )
        self.host_usage = gauge(
            "host_kv_cache_usage_perc", "Fraction of host (swap) KV-cache blocks in use."
        )
        self.per_level = gauge(
            "num_jobs_per_queue_level",
            "Live jobs in each scheduler queue (MLFQ level).",
            M + ["level"],
        )
        self.serving = gauge("engine_serving", "1 while the engine can serve requests, else 0.")
        self.preemptions = counter(
            "num_preemptions", "Cumulative number of preemptions by the scheduler."
        )
        # Leak watch (the soak benchmark reads these): both must stay flat under steady load.
        self.loop_tasks = gauge("event_loop_tasks", "asyncio tasks alive in the server process.")
        self.threads = gauge("process_threads", "Threads alive in the server process.")
        self.restarts = counter(
            "worker_restarts", "Worker groups the engine's supervisor restarted after a failure."
        )
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed."
        )
        self.success = counter(
            "request_success",
            "Count of finished requests by finish reason.",
            M + ["finished_reason"],
        )
        self.demotions = counter("demotions", "Queue demotions of finished jobs (quantum used up).")
        self.promotions = counter(
            "promotions", "Queue promotions of finished jobs (starvation guard)."
        )
        self.swapped_time = counter(
            "swapped_time_seconds", "Seconds finished jobs spent with KV in host memory."
        )
        self.memory_counters = {
            key: counter(name, doc) for key, (name, doc) in _MEMORY_COUNTERS.items()
        }
        self.ttft = hist(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = hist(
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e = hist(
            "e2e_request_latency_seconds",
            "Histogram of end-to-end request latency in seconds.",
            REQUEST_BUCKETS,
        )
        self.queue_time = hist(
            "request_queue_time_seconds",
            "Histogram of time spent waiting before first being scheduled, in seconds.",
            REQUEST_BUCKETS,
        )
        self._last: dict[str, float] = {}  # cumulative engine values seen at the last scrape
        # Export every series from the first scrape (at 0), as vLLM does, so rate() and
        # dashboards work before the first event of each kind.
        for metric in (
            self.running, self.waiting, self.swapped, self.kv_usage, self.host_usage, self.serving,
            self.preemptions, self.restarts, self.prompt_tokens, self.generation_tokens, self.demotions,
            self.promotions, self.swapped_time, self.ttft, self.itl, self.e2e, self.queue_time,
            *self.memory_counters.values(),
        ):  # fmt: skip
            metric.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)

    def track(self) -> RequestTracker:
        """Call when a request arrives; feed it every output of that engine request."""
        return RequestTracker(self, self.clock())

    # -- scrape ---------------------------------------------------------------------------
    def refresh(self, stats: dict, serving: bool = True) -> None:
        m = self.model_name
        jobs = stats.get("jobs") or []
        states: dict[str, int] = {}
        levels: dict[int, int] = {}
        for j in jobs:
            states[j.get("state", "")] = states.get(j.get("state", ""), 0) + 1
            levels[int(j.get("queue_level", 0))] = levels.get(int(j.get("queue_level", 0)), 0) + 1
        self.running.labels(m).set(states.get("running", 0))
        self.waiting.labels(m).set(states.get("waiting", 0))
        self.swapped.labels(m).set(states.get("swapped", 0))
        self.per_level.clear()  # levels that emptied must disappear, not keep a stale count
        for level, count in sorted(levels.items()):
            self.per_level.labels(m, str(level)).set(count)
        mem = stats.get("memory") or {}
        self.kv_usage.labels(m).set(_usage(mem.get("kv_cache_usage"), stats, "gpu"))
        self.host_usage.labels(m).set(_usage(mem.get("host_cache_usage"), stats, "host"))
        self.serving.labels(m).set(1 if serving else 0)
        self.threads.labels(m).set(threading.active_count())
        try:
            self.loop_tasks.labels(m).set(len(asyncio.all_tasks()))
        except RuntimeError:  # refreshed outside an event loop (tests)
            pass
        self._mirror("num_preemptions", self.preemptions, stats.get("num_preemptions"))
        self._mirror("num_restarts", self.restarts, stats.get("num_restarts"))
        for key, c in self.memory_counters.items():
            self._mirror("memory." + key, c, mem.get(key))

    def _mirror(self, key: str, counter: Counter, value: Any) -> None:
        if value is None:
            return
        last = self._last.get(key, 0.0)
        # A smaller value means the engine restarted its count: take it as all new.
        delta = value - last if value >= last else value
        self._last[key] = value
        if delta > 0:
            counter.labels(self.model_name).inc(delta)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _usage(reported: Any, stats: dict, pool: str) -> float:
    if reported is not None:
        return float(reported)
    total, free = stats.get(f"num_{pool}_blocks"), stats.get(f"num_free_{pool}_blocks")
    return 1.0 - free / total if total and free is not None else 0.0


class RequestTracker:
    """Latency and token accounting for one engine request, as the server observes it."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.m = metrics
        self.arrival = arrival
        self.last_token: float | None = None
        self.done = False
        self.access = CURRENT.get()  # the HTTP request's access-line record, if any
        self.seen = False

    def on_output(self, out: Any) -> None:
        if self.done:
            return
        m, name, now = self.m, self.m.model_name, self.m.clock()
        if self.access is not None:
            self.access.on_output(out, now, first_of_choice=not self.seen)
        self.seen = True
        n = len(out.token_ids)
        if n:
            if self.last_token is None:
                m.ttft.labels(name).observe(now - self.arrival)
                m.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
            else:
                # Spread the gap over the tokens it delivered (usually one per output).
                for _ in range(n):
                    m.itl.labels(name).observe((now - self.last_token) / n)
            self.last_token = now
            m.generation_tokens.labels(name).inc(n)
        if out.finished:
            self.done = True
            m.e2e.labels(name).observe(now - self.arrival)
            m.success.labels(name, out.finish_reason or "unknown").inc()
            self._job_stats(out.stats or {}, now)

    def _job_stats(self, stats: dict, now: float) -> None:
        m, name = self.m, self.m.model_name
        m.demotions.labels(name).inc(stats.get("demotions", 0) or 0)
        m.promotions.labels(name).inc(stats.get("promotions", 0) or 0)
        m.swapped_time.labels(name).inc(max(0.0, stats.get("swapped_time_s", 0.0) or 0.0))
        first = stats.get("first_scheduled_time")
        if first is not None:
            # The engine's timestamps are time.monotonic(), like this clock; prefer the
            # engine's own arrival time when it reports one.
            arrival = stats.get("arrival_time", self.arrival)
            m.queue_time.labels(name).observe(min(max(0.0, first - arrival), now - self.arrival))
