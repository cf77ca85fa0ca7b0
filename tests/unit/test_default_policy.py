"""The paper's design is the default, with knobs derived from the device's measured
profile, and the profile is cached on disk so a restart does not measure again."""

from __future__ import annotations

import json
import os

import pytest

from engine import profile_cache
from engine.config import EngineConfig
from engine.policies.profile import PrefillProfile
from engine.policies.skip_join import SkipJoinMLFQPolicy

PROFILE = PrefillProfile(prefill=[(1, 0.01), (512, 0.3)], decode=[(1, 0.02), (32, 0.08)])


def test_skip_join_with_proactive_swapping_is_the_default():
    sched = EngineConfig().scheduler
    assert (sched.policy, sched.swap_policy) == ("skip-join-mlfq", "proactive")


def test_quantum_and_starvation_limit_come_from_the_profiled_decode_step():
    p = SkipJoinMLFQPolicy(num_queues=4)
    assert p.base_quantum_s == 0.05  # no profile yet: the fallback constant
    p.set_profile(PROFILE)
    step8 = PROFILE.decode_step_time(8)
    assert p.base_quantum_s == pytest.approx(2 * step8)
    assert p.starvation_limit_s == pytest.approx(2 * 2 * step8 * 2**3)
    assert p.describe()["quantum_source"].startswith("profile")


def test_a_faster_device_gets_a_shorter_quantum():
    slow, fast = SkipJoinMLFQPolicy(profile=PROFILE), SkipJoinMLFQPolicy(
        profile=PrefillProfile(prefill=[(1, 0.001)], decode=[(1, 0.002), (32, 0.008)]))
    assert fast.base_quantum_s == pytest.approx(slow.base_quantum_s / 10)


def test_explicit_knobs_are_never_overridden_by_the_profile():
    p = SkipJoinMLFQPolicy(profile=PROFILE, base_quantum_s=0.5, starvation_limit_s=3.0)
    assert (p.base_quantum_s, p.starvation_limit_s) == (0.5, 3.0)
    assert p.describe()["quantum_source"] == "option"
    q = SkipJoinMLFQPolicy(profile=PROFILE, quantum_steps=4, quantum_batch=1)
    assert q.base_quantum_s == pytest.approx(4 * 0.02)


WORKER = {"device": "cpu", "device_name": "Test CPU", "dtype": "float32",
          "torch_version": "2.x", "torch_threads": 2, "num_gpu_blocks": 1000}


def test_profile_cache_round_trips_and_ignores_another_key(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    key = profile_cache.profile_key(str(model), WORKER, 16)
    assert profile_cache.load(str(tmp_path), key) is None
    path = profile_cache.store(str(tmp_path), key, PROFILE.to_dict())
    assert path is not None and path.startswith(str(tmp_path))
    profile, where = profile_cache.load(str(tmp_path), key)
    assert PrefillProfile.from_dict(profile) == PROFILE and where == path
    for other in ({**WORKER, "dtype": "bfloat16"}, {**WORKER, "device_name": "H200"},
                  {**WORKER, "torch_threads": 16}):
        assert profile_cache.load(str(tmp_path), profile_cache.profile_key(
            str(model), other, 16)) is None
    model.write_bytes(b"other weights")  # a changed checkpoint is profiled again
    assert profile_cache.load(str(tmp_path), profile_cache.profile_key(
        str(model), WORKER, 16)) is None


def test_a_corrupt_cache_file_is_ignored(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    key = profile_cache.profile_key(str(model), WORKER, 16)
    path = profile_cache.store(str(tmp_path), key, PROFILE.to_dict())
    with open(path, "w") as f:
        f.write("{not json")
    assert profile_cache.load(str(tmp_path), key) is None
    with open(path, "w") as f:
        json.dump({"key": {**key, "model": "/elsewhere"}, "profile": PROFILE.to_dict()}, f)
    assert profile_cache.load(str(tmp_path), key) is None


def test_cache_dir_is_the_flag_then_the_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv(profile_cache.ENV_VAR, str(tmp_path / "env"))
    assert profile_cache.cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert profile_cache.cache_dir(None) == str(tmp_path / "env")
    assert profile_cache.cache_dir("") is None  # off
    monkeypatch.delenv(profile_cache.ENV_VAR)
    assert profile_cache.cache_dir(None) == os.path.expanduser("~/.cache/fastserve")
