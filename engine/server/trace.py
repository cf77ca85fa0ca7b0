"""``fastserve serve --record-trace FILE``: one JSONL row per finished request.

Rows are what ``fastserve bench --workload trace:FILE`` and ``fastserve simulate`` replay:
``arrival_s`` (seconds since the server started), ``prompt_len``, ``output_len`` (tokens
the request actually produced, which is what a replay with ``ignore_eos`` reproduces),
plus ``max_tokens`` and ``finish_reason`` for the record. Prompt text is written only with
``--record-trace-prompts``: traffic logs should not hold users' text by default.

:class:`TracingEngine` wraps the engine in front of both frontends (HTTP and ZeroMQ), so
every request is seen once whichever way it came; everything but ``generate`` passes
through untouched.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, TextIO


class TraceWriter:
    def __init__(self, path: str, with_prompts: bool = False) -> None:
        self.path = path
        self.with_prompts = with_prompts
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a killed server keeps every finished row

    def close(self) -> None:
        self._file.close()


class TracingEngine:
    """The engine, with each request's arrival and lengths written to a trace."""

    def __init__(self, engine: Any, writer: TraceWriter) -> None:
        self._engine = engine
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any = None, params: Any = None, **kw: Any) -> AsyncIterator[Any]:
        arrival = self._writer.now()
        prompt_len = produced = 0
        reason = None
        try:
            async for out in self._engine.generate(prompt, params, **kw):
                prompt_len = out.num_prompt_tokens or prompt_len
                produced = out.num_output_tokens or produced + len(out.token_ids)
                reason = out.finish_reason if out.finished else reason
                yield out
        finally:
            if prompt_len:
                row = {"arrival_s": round(arrival, 6), "prompt_len": prompt_len,
                       "output_len": produced,
                       "max_tokens": getattr(params, "max_tokens", None),
                       "finish_reason": reason or "abort"}
                if self._writer.with_prompts and isinstance(prompt, str):
                    row["prompt"] = prompt
                if produced:
                    self._writer.write(row)
