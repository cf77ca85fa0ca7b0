"""Actors: an asyncio task with a mailbox. ``tell`` posts and returns; ``ask`` awaits a reply.

A message is ``(kind, *args)``; the actor's ``on_<kind>`` handles it. An exception in a
handler goes back to an ``ask``-er; for a ``tell`` it is logged and passed to
``on_failure`` so the actor can fail the requests it owns instead of hanging them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("fastserve.actors")


class ActorStoppedError(RuntimeError):
    """The actor was stopped: it will never answer."""


class Actor:
    name = "actor"

    def __init__(self) -> None:
        self.mailbox: asyncio.Queue[tuple[tuple, asyncio.Future | None]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)

    def tell(self, kind: str, *args: Any) -> None:
        self.mailbox.put_nowait(((kind, *args), None))

    async def ask(self, kind: str, *args: Any) -> Any:
        if self._stopped:
            raise ActorStoppedError(f"{self.name} is stopped")
        fut = asyncio.get_running_loop().create_future()
        self.mailbox.put_nowait(((kind, *args), fut))
        return await fut

    async def run(self) -> None:
        while True:
            msg, fut = await self.mailbox.get()
            await self.dispatch(msg, fut)

    async def dispatch(self, msg: tuple, fut: asyncio.Future | None) -> None:
        kind, *args = msg
        try:
            result = getattr(self, f"on_{kind}")(*args)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as e:
            if fut is not None and not fut.done():
                fut.set_exception(e)
            else:
                log.exception("%s failed handling %r", self.name, kind)
                self.on_failure(e)
            return
        if fut is not None and not fut.done():
            fut.set_result(result)

    def drain_nowait(self) -> list[tuple[tuple, asyncio.Future | None]]:
        items = []
        while not self.mailbox.empty():
            items.append(self.mailbox.get_nowait())
        return items

    def on_failure(self, error: Exception) -> None:
        """Hook: fail owned requests. Default: nothing to fail."""

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel the actor's task and wait for it to end (bounded: a handler that ignores
        cancellation is re-cancelled, and after ``timeout`` the task is left behind). Asks
        still in the mailbox, and any made later, fail with ``ActorStoppedError``."""
        self._stopped = True
        task, self._task = self._task, None
        try:
            if task is not None:
                await self._cancel(task, timeout)
        finally:
            for _, fut in self.drain_nowait():
                if fut is not None and not fut.done():
                    fut.set_exception(ActorStoppedError(f"{self.name} is stopped"))

    async def _cancel(self, task: asyncio.Task, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not task.done() and asyncio.get_running_loop().time() < deadline:
            task.cancel()
            await asyncio.wait((task,), timeout=0.5)
        if not task.done():
            log.error("%s did not stop within %.0f s", self.name, timeout)
        elif not task.cancelled() and task.exception() is not None:
            log.error("%s had failed: %r", self.name, task.exception())
