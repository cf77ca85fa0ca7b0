"""Cleans up after a private Ray instance whose engine died without its shutdown.

When the engine starts its own local Ray (``engine.parallel.ray_backend``), Ray's GCS,
raylet and rank actors die with a SIGKILLed engine, but some of Ray's helper processes
(the dashboard and runtime-env agents) outlive it, and so does the instance's temp
directory. This small process, started beside the private instance, waits for the engine
to go away and then kills every process of that instance (tagged by ``INSTANCE_ENV`` in
its environment, or naming the directory on its command line) and removes the directory. After a normal shutdown it finds nothing left and just exits.

    python -m engine.parallel.ray_reaper ENGINE_PID TEMP_DIR

It runs in its own session, so a Ctrl-C meant for the engine's process group does not end
it before the engine.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

POLL_S = 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Set in the engine's environment while it starts a private Ray instance, so that every
# process of that instance inherits it. Ray's helper processes rename themselves
# ("ray::DashboardAgent"), so their command lines cannot be relied on; their environment
# (/proc/PID/environ: as it was at exec) can.
INSTANCE_ENV = "FASTSERVE_RAY_INSTANCE"


def processes_naming(path: str) -> list[int]:
    """Pids of this user's processes (not this one) that belong to the instance in ``path``:
    started with ``INSTANCE_ENV=path`` in their environment, or naming it on their command
    line."""
    me, uid, found = os.getpid(), os.getuid(), []
    needle, tag = path.encode(), f"{INSTANCE_ENV}={path}".encode() + b"\0"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if tag in f.read():
                    found.append(int(entry))
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def reap(temp_dir: str) -> list[int]:
    """Kill what is left of the instance living in ``temp_dir`` and remove the directory;
    returns the pids killed."""
    killed = []
    for pid in processes_naming(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
    return killed


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    engine_pid, temp_dir = int(argv[0]), os.path.abspath(argv[1])
    while _alive(engine_pid):
        if not os.path.isdir(temp_dir):  # shut down in order: nothing to do
            return 0
        time.sleep(POLL_S)
    if os.path.isdir(temp_dir):
        killed = reap(temp_dir)
        if killed:
            print(f"fastserve ray reaper: engine {engine_pid} is gone; killed {len(killed)} "
                  f"leftover Ray process(es) of {temp_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
