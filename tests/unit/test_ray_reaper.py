"""The reaper that cleans up after a private Ray instance whose engine was SIGKILLed: it
kills exactly the processes naming the instance's directory, and only once the engine is
gone; after an orderly stop (directory removed) it leaves everything alone and exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from engine.parallel.ray_reaper import INSTANCE_ENV, processes_naming

SLEEPER = "import time; time.sleep(120)"


def _spawn(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})


def _reaper(engine_pid: int, directory: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.parallel.ray_reaper",
                             str(engine_pid), directory], stderr=subprocess.PIPE, text=True)


def _wait_gone(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    return proc.wait(timeout=timeout)


def test_engine_killed_then_leftovers_killed_and_directory_removed() -> None:
    directory = tempfile.mkdtemp(prefix="fsray-test-")
    other_dir = tempfile.mkdtemp(prefix="fsray-other-")
    engine = _spawn("-c", SLEEPER)
    leftover = _spawn("-c", SLEEPER, f"--temp-dir={directory}")  # like a Ray agent's argv
    # Ray's agents retitle themselves ("ray::DashboardAgent"): found by the inherited tag.
    renamed = _spawn("-c", "import sys, time; sys.argv[:] = ['x']; time.sleep(120)",
                     env={INSTANCE_ENV: directory})
    bystander = _spawn("-c", SLEEPER, f"--temp-dir={other_dir}")  # another instance's
    reaper = _reaper(engine.pid, directory)
    try:
        assert {leftover.pid, renamed.pid} <= set(processes_naming(directory))
        assert bystander.pid not in processes_naming(directory)
        time.sleep(1.5)  # the engine is alive: the reaper must not touch anything
        assert leftover.poll() is None and renamed.poll() is None and reaper.poll() is None
        engine.send_signal(signal.SIGKILL)
        engine.wait(10)
        assert _wait_gone(leftover) == -signal.SIGKILL
        assert _wait_gone(renamed) == -signal.SIGKILL
        assert _wait_gone(reaper) == 0
        assert not os.path.exists(directory)
        assert "killed 2 leftover Ray process" in reaper.stderr.read()
        assert bystander.poll() is None and os.path.isdir(other_dir)
    finally:
        for p in (engine, leftover, renamed, bystander, reaper):
            if p.poll() is None:
                p.kill()
                p.wait(10)
        os.rmdir(other_dir)


def test_orderly_stop_leaves_everything_and_reaper_exits() -> None:
    directory = tempfile.mkdtemp(prefix="fsray-test-")
    engine = _spawn("-c", SLEEPER)
    survivor = _spawn("-c", SLEEPER, f"--temp-dir={directory}")
    reaper = _reaper(engine.pid, directory)
    try:
        os.rmdir(directory)  # what RayRanks.stop does after ray.shutdown()
        assert _wait_gone(reaper) == 0
        assert survivor.poll() is None
    finally:
        for p in (engine, survivor, reaper):
            if p.poll() is None:
                p.kill()
                p.wait(10)
