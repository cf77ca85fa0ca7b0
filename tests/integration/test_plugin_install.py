"""A third-party policy plugin, installed the way a user installs one, is found by name and
serves: plugins/fastserve-las goes through pip into a temporary directory (offline, no
build isolation), and nothing in FastServe names it."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import Engine
from engine.policies.registry import (
    SCHEDULING_GROUP,
    available,
    create_scheduling_policy,
    create_swap_policy,
)
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir
from tests.unit.fakes import VirtualClock, make_job, make_scheduler, run_step

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

PLUGIN_SRC = Path(__file__).resolve().parents[2] / "plugins" / "fastserve-las"
PIP_TIMEOUT_S = 120

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def las_site(tmp_path_factory) -> Iterator[Path]:
    """The plugin installed with ``pip --target`` and put on ``sys.path`` for this module."""
    root = tmp_path_factory.mktemp("las")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = shutil.copytree(PLUGIN_SRC, root / "src",
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
           "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.path_importer_cache.pop(str(site), None)
        for name in [m for m in sys.modules if m.split(".")[0] == "fastserve_las"]:
            del sys.modules[name]
        importlib.invalidate_caches()


def test_installed_plugin_is_discovered_by_entry_point(las_site):
    assert "las" in available(SCHEDULING_GROUP)
    policy = create_scheduling_policy("las", {"quantum_s": 0.1})
    cls = type(policy)
    assert (cls.__module__, cls.__name__) == ("fastserve_las", "LeastAttainedServicePolicy")
    # This install, not one that happens to be in the environment already.
    assert Path(inspect.getfile(cls)).is_relative_to(las_site)
    assert policy.describe()["quantum_s"] == 0.1


def test_job_with_less_attained_service_runs_first(las_site):
    sched = make_scheduler(create_scheduling_policy("las"), create_swap_policy("recompute"),
                           max_num_seqs=1)
    clock = VirtualClock(step_s=0.01)
    sched.add(make_job("old", 4, 8), clock.now)
    ran = [run_step(sched, clock).seqs[0].job.job_id for _ in range(3)]
    sched.add(make_job("new", 4, 8, arrival=clock.now), clock.now)
    ran += [run_step(sched, clock).seqs[0].job.job_id for _ in range(5)]
    # new runs until its service equals old's; then they alternate, ties going by arrival.
    assert ran == ["old"] * 3 + ["new"] * 3 + ["old", "new"]
    sched.check_integrity()


async def serve(path: str, policy: str, prompts: list[list[int]]) -> tuple[list[list[int]], dict]:
    # Two sequences at a time for four requests: LAS really preempts and interleaves.
    engine = await Engine.create(tiny_engine_config(path, policy=policy, max_num_seqs=2))
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        got = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        stats = await wait_all_blocks_free(engine)
        assert_pools_whole(stats)
        return [ids for ids, _, _ in got], stats
    finally:
        await engine.shutdown()


async def test_engine_serves_with_the_plugin_chosen_by_name(las_site, tmp_path):
    path = make_tiny_model_dir("llama", tmp_path / "llama")
    prompts = [[3 + (7 * i + j) % 400 for j in range(n)] for i, n in enumerate((3, 9, 17, 30))]
    # The engine process creates the policy in-process; the worker never imports it.
    las_ids, las_stats = await serve(path, "las", prompts)
    fcfs_ids, _ = await serve(path, "fcfs", prompts)
    assert las_stats["policy"]["name"] == "las"
    assert las_ids == fcfs_ids
    assert all(len(ids) == 12 for ids in las_ids)
