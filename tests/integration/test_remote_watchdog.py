"""Ranks the engine cannot kill itself (``fastserve worker`` on another host) end on their
own when their engine goes away, even while stuck in a transfer from a hung peer (as an
NCCL collective would be), within a bounded time and with a log line that says why.

The engine runs in a subprocess so that it can be SIGKILLed; its two pipeline stages are
`fastserve worker` processes joining over tcp://127.0.0.1, the multi-node recipe.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from engine.parallel.worker import WATCHDOG_EXIT_CODE
from tests.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.slow

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

WATCHDOG_S = 4.0
EXIT_BOUND_S = 30.0  # the watchdog's timeout plus a loaded machine's scheduling slack

# An engine whose two ranks are remote: it streams until killed, and says READY once the
# first token came back (every rank is then initialised and busy).
ENGINE = """
import asyncio, sys
from engine.api import Engine
from engine.config import ParallelConfig
from engine.sampling import SamplingParams
from tests.integration.engine_utils import tiny_engine_config

async def main(path, address):
    cfg = tiny_engine_config(path).replace(parallel=ParallelConfig(
        pipeline_parallel_size=2, torch_threads=1, engine_address=address, remote_ranks=(0, 1),
        startup_timeout_s=120.0, step_timeout_s=120.0))
    engine = await Engine.create(cfg)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ready = False
    while True:
        async for out in engine.generate([5, 6, 7], params):
            if not ready and out.token_ids:
                ready = True
                print("READY", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _start_ranks(tmp_path, address: str, *extra: str) -> tuple[list[subprocess.Popen], list]:
    """Both pipeline stages as `fastserve worker` processes, each logging to a file."""
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in (0, 1)]  # noqa: SIM115 -- the caller closes
    workers = [
        subprocess.Popen([sys.executable, "-m", "engine.cli", "worker", "--engine", address, "--rank",
                          str(r), "--watchdog-timeout", str(WATCHDOG_S), *extra],
                         stdin=subprocess.DEVNULL, stdout=logs[r], stderr=subprocess.STDOUT)
        for r in (0, 1)
    ]
    return workers, logs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _wait_line(proc: subprocess.Popen, want: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            return False
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            return False  # the engine exited
        if line.strip() == want:
            return True
    return False


def test_remote_ranks_exit_on_their_own_when_the_engine_is_killed_mid_stream(tmp_path):
    path = make_tiny_model_dir("llama", str(tmp_path / "model"), num_hidden_layers=2)
    address = f"tcp://127.0.0.1:{_free_port()}"
    workers, logs = _start_ranks(tmp_path, address)
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, path, address], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, text=True)
    stopped = False
    try:
        assert _wait_line(engine, "READY", 180), "the engine never streamed a token"
        # Stage 0 hangs (as a GPU rank whose NCCL peer died would): stage 1 is left waiting
        # for its hidden states inside a step; then the engine dies without a word.
        os.kill(workers[0].pid, signal.SIGSTOP)
        stopped = True
        time.sleep(1.0)
        engine.kill()
        engine.wait(10)
        t0 = time.monotonic()
        assert _wait_exit(workers[1], EXIT_BOUND_S) == WATCHDOG_EXIT_CODE
        # The hung rank's watchdog runs as soon as the rank runs again.
        os.kill(workers[0].pid, signal.SIGCONT)
        stopped = False
        assert _wait_exit(workers[0], EXIT_BOUND_S) == WATCHDOG_EXIT_CODE
        assert time.monotonic() - t0 < 2 * EXIT_BOUND_S
        for log in logs:
            log.seek(0)
            text = log.read()
            assert "watchdog ends worker" in text and "has not answered" in text, text[-2000:]
    finally:
        for proc in (engine, *workers):
            if stopped and proc is workers[0]:
                os.kill(proc.pid, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for log in logs:
            log.close()

