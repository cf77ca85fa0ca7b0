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


class Actor:
    name = "actor"

    def __init__(self) -> None:
        self.mailbox: asyncio.Queue[tuple[tuple, asyncio.Future | None]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)

    def tell(self, kind: str, *args: Any) -> None:
        self.mailbox.put_nowait(((kind, *args), None))

    async def ask(self, kind: str, *args: Any) -> Any:
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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
