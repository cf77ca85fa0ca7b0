"""The Ray backend (``--distributed-executor-backend ray``): worker ranks as Ray actors.

Only *where* a rank runs changes. Each rank is an actor on its own bundle of one placement
group (``ray_cpus_per_rank`` CPUs, plus one GPU on CUDA), and the actor runs the very worker
main a local or ``fastserve worker`` rank runs (:func:`engine.parallel.worker.serve`): it
connects back to the engine's ZeroMQ control socket and rendezvouses with its peers over
``torch.distributed`` exactly as the mp backend's ranks do. Nothing travels through Ray's
object store.

Cluster: with ``ray_address`` unset the engine connects to ``$RAY_ADDRESS`` when it is set
(``ray.init(address="auto")``) and otherwise starts a private local Ray instance (no
dashboard, a temporary directory of its own); ``ray_address`` names a cluster explicitly.
If this process had already called ``ray.init`` itself, that session is used and left
alone. On shutdown the ranks' actors are killed and the placement group removed;
``ray.shutdown()`` runs only if this module called ``ray.init``, and a private instance's
processes and directory go with it.

Every Ray call here blocks; the executor runs them in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from engine.config import ParallelConfig
from engine.parallel.ray_reaper import INSTANCE_ENV

log = logging.getLogger("fastserve.ray")

# The local instance's object store: the engine passes nothing through it (control is
# ZeroMQ, activations torch.distributed), so Ray's smallest useful size will do.
_LOCAL_OBJECT_STORE_BYTES = 80 * 1024**2


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(
            "the ray backend needs Ray: pip install ray (or use --distributed-executor-backend mp)"
        ) from exc
    return ray


class RankActor:
    """The body of a rank's actor: run the worker main until the engine says goodbye (or
    goes away: the worker's watchdog then ends the actor's process)."""

    def node_ip(self) -> str:
        return _ray().util.get_node_ip_address()

    def free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(
        self, address: str, rank: int, env: dict[str, str], log_level: str, log_format: str,
        watchdog_timeout_s: float | None,
    ) -> int:
        os.environ.update(env)
        from engine.logs import setup_logging
        from engine.parallel.worker import serve

        setup_logging(log_level, log_format)
        return serve(address, rank, None, None, watchdog_timeout_s)


class RayRank:
    """One rank's actor, polled and killed like the ``subprocess.Popen`` of a local rank."""

    def __init__(self, actor: Any, done: Any) -> None:
        self.actor, self._done = actor, done
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ready, _ = _ray().wait([self._done], timeout=0)
            if ready:
                self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        ready, _ = _ray().wait([self._done], timeout=timeout)
        if not ready:
            raise subprocess.TimeoutExpired("ray rank actor", timeout or 0)
        self._finish()
        return self.returncode  # type: ignore[return-value]

    def _finish(self) -> None:
        if self.returncode is None:
            try:
                self.returncode = int(_ray().get(self._done))
            except Exception:  # noqa: BLE001 -- the actor died (killed, watchdog, crash)
                self.returncode = -9

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            _ray().kill(self.actor, no_restart=True)


class RayRanks:
    """The Ray side of one worker group: the Ray session, the placement group, the actors."""

    def __init__(self, parallel: ParallelConfig, startup_timeout_s: float) -> None:
        self.parallel = parallel
        self.startup_timeout_s = startup_timeout_s
        self.ranks: dict[int, RayRank] = {}
        self._actors: list[Any] = []
        self._pg: Any = None
        self._initialized = False  # whether this object called ray.init (and so shuts down)
        self._temp_dir: str | None = None
        self._reaper: subprocess.Popen | None = None  # engine.parallel.ray_reaper

    def connect(self, device: str) -> None:
        """``ray.init`` unless this process already has a Ray session (``device``: the
        model's, so that a private instance on a GPU host offers no GPUs to a CPU run)."""
        ray = _ray()
        if ray.is_initialized():
            return  # this process's own Ray session: used, never shut down by us
        address = self.parallel.ray_address
        if address is None and os.environ.get("RAY_ADDRESS"):
            address = "auto"
        opts: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
        if address is None:
            world = self.parallel.world_size
            need = -(-world * self.parallel.ray_cpus_per_rank // 1)
            self._temp_dir = tempfile.mkdtemp(prefix="fsray-")
            opts.update(address="local", include_dashboard=False, _temp_dir=self._temp_dir,
                        num_cpus=int(max(need, os.cpu_count() or 1)),
                        object_store_memory=_LOCAL_OBJECT_STORE_BYTES)
            if device == "cpu":
                opts["num_gpus"] = 0
            log.info("starting a local Ray instance for %d ranks", world)
            # If this process is SIGKILLed, some of Ray's helper processes outlive it; the
            # reaper kills them and removes the directory (after a normal stop it finds the
            # directory gone and exits).
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "engine.parallel.ray_reaper", str(os.getpid()),
                 self._temp_dir],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                close_fds=True)
        else:
            opts["address"] = address
            log.info("connecting to the Ray cluster at %s", address)
        t0 = time.monotonic()
        self._initialized = True
        if self._temp_dir is None:
            ray.init(**opts)
        else:  # every process of the private instance inherits the tag the reaper looks for
            os.environ[INSTANCE_ENV] = self._temp_dir
            try:
                ray.init(**opts)
            finally:
                os.environ.pop(INSTANCE_ENV, None)
        log.info("Ray ready in %.1f s", time.monotonic() - t0)

    def uses_gpu(self, device: str) -> bool:
        """One GPU per rank: on CUDA, or with ``auto`` when the cluster has a GPU for each."""
        if device.startswith("cuda"):
            return True
        if device != "auto":
            return False
        return _ray().cluster_resources().get("GPU", 0) >= self.parallel.world_size

    def place(self, use_gpu: bool) -> list[str]:
        """Reserve one bundle per rank and start each rank's actor on its bundle; returns the
        IP address of each rank's node, in rank order."""
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = self.parallel.world_size
        bundle: dict[str, float] = {"CPU": self.parallel.ray_cpus_per_rank}
        if use_gpu:
            bundle["GPU"] = 1
        self._pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=self.startup_timeout_s)
        except Exception as exc:  # GetTimeoutError: the cluster lacks the resources
            raise RuntimeError(
                f"Ray could not place {world} ranks of {bundle} within "
                f"{self.startup_timeout_s:.0f} s (cluster resources: {ray.cluster_resources()})"
            ) from exc
        actor_cls = ray.remote(RankActor)
        self._actors = [
            actor_cls.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(world)
        ]
        return list(ray.get([a.node_ip.remote() for a in self._actors], timeout=self.startup_timeout_s))

    def free_port(self, rank: int) -> int:
        """A port free right now on ``rank``'s node (for the store rank 0 hosts)."""
        return int(_ray().get(self._actors[rank].free_port.remote(), timeout=self.startup_timeout_s))

    def run(self, address: str, env: dict[str, str], log_level: str, log_format: str) -> dict[int, RayRank]:
        """Start the worker main in every placed actor."""
        watchdog = self.parallel.watchdog_timeout_s or None
        for rank, actor in enumerate(self._actors):
            done = actor.run.remote(address, rank, env, log_level, log_format, watchdog)
            self.ranks[rank] = RayRank(actor, done)
        return self.ranks

    def stop(self) -> None:
        """Kill every rank's actor, remove the placement group, end the Ray session if this
        object started it (and with a private instance, its processes and directory)."""
        if not self._initialized and self._pg is None and not self._actors:
            return
        ray = _ray()
        if ray.is_initialized():
            for actor in self._actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if self._pg is not None:
                from ray.util.placement_group import remove_placement_group

                with contextlib.suppress(Exception):
                    remove_placement_group(self._pg)
        self._pg, self._actors = None, []
        if self._initialized:
            self._initialized = False
            ray.shutdown()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        if self._reaper is not None:  # sees the directory gone within a poll, and exits
            try:
                self._reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None
