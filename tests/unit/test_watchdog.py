"""A rank's watchdog against a stand-in engine (a ZeroMQ ROUTER answering ``watch``): it ends
the rank when the engine falls silent or another worker group answers, and never before
the engine was seen. ``_exit`` is replaced so the test process survives the verdict."""

from __future__ import annotations

import os
import threading
import time

import pytest
import zmq

from engine.parallel.protocol import decode, encode
from engine.parallel.worker import WATCH_PREFIX, Watchdog

TIMEOUT_S = 0.6
INTERVAL_S = 0.1


class FakeEngine:
    """Answers watchdogs with ``alive`` and the current group id until told to stop."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.group = "group-1"
        self.answering = True
        self.asked: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            ident, *frames = self.sock.recv_multipart()
            assert ident.startswith(WATCH_PREFIX)
            self.asked.append(decode(frames))
            if self.answering:
                self.sock.send_multipart([ident, *encode({"kind": "alive", "engine": self.group})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.ctx.term()


class Verdict(Watchdog):
    """The watchdog, with its exit recorded instead of ending the process."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.why: str | None = None
        self.done = threading.Event()

    def _exit(self, why: str) -> None:
        if self.why is None:
            self.why = why
        self.done.set()
        self._stop.set()  # ends the watchdog's loop instead of the process


@pytest.fixture
def engine():
    e = FakeEngine()
    yield e
    e.close()


def _watch(address: str, parent_pid: int | None = None, timeout_s: float | None = TIMEOUT_S) -> Verdict:
    return Verdict(address, 3, parent_pid, timeout_s, INTERVAL_S).start()  # type: ignore[return-value]


def test_a_rank_whose_engine_falls_silent_is_ended_with_the_reason(engine):
    dog = _watch(engine.address)
    time.sleep(5 * INTERVAL_S)
    assert not dog.done.is_set() and engine.asked and engine.asked[0]["rank"] == 3
    engine.answering = False
    assert dog.done.wait(10)
    assert "has not answered" in dog.why


def test_a_rank_is_ended_when_another_worker_group_answers_at_its_address(engine):
    dog = _watch(engine.address)
    time.sleep(5 * INTERVAL_S)
    engine.group = "group-2"  # the engine restarted the group; this rank belongs to the old one
    assert dog.done.wait(10)
    assert "different worker group" in dog.why


def test_a_rank_waits_for_an_engine_that_has_not_started_yet():
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as probe:
        probe.bind("tcp://127.0.0.1:*")
        address = probe.getsockopt_string(zmq.LAST_ENDPOINT)
    dog = _watch(address)  # nothing listens there
    assert not dog.done.wait(3 * TIMEOUT_S)
    dog.stop()
    assert dog.why is None


def test_a_local_rank_is_ended_when_its_parent_is_gone():
    dog = _watch("tcp://127.0.0.1:9", parent_pid=os.getpid(), timeout_s=None)  # never our parent
    assert dog.done.wait(10)
    assert "is gone" in dog.why
