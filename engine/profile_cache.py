"""Measured cost profiles cached on disk, so a restart of a profile-driven policy
(skip-join MLFQ, the default) starts as fast as FCFS: one JSON file per model, device,
dtype and threads under ``<cache dir>/profiles/``.

Cache dir: ``SchedulerConfig.profile_cache_dir`` (``--profile-cache-dir``), else the
``FASTSERVE_CACHE_DIR`` environment variable, else ``~/.cache/fastserve``; an empty string
turns caching off. The key holds everything that changes the measurement; a file whose
key does not match exactly is ignored (and replaced by the next measurement).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

log = logging.getLogger("fastserve.engine")

ENV_VAR = "FASTSERVE_CACHE_DIR"
KEY_VERSION = 1  # bump when the profile's measurement changes
# The profile's largest shapes (a 512-token prefill, 32 decoding jobs of ~70 tokens) fit
# in this many KV tokens; a smaller pool measures fewer points, so it is part of the key.
PROFILE_POOL_TOKENS = 32 * 72


def cache_dir(configured: str | None) -> str | None:
    """Where profiles are cached; None: caching is off."""
    if configured is None:
        configured = os.environ.get(ENV_VAR)
    if configured is None:
        return os.path.join(os.path.expanduser("~"), ".cache", "fastserve")
    return configured or None


def _model_identity(path: str) -> list:
    """Size and modification time of the model's files: a changed checkpoint re-profiles."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if f.endswith((".safetensors", ".json")))
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return out


def profile_key(model_path: str, worker: dict[str, Any], block_size: int) -> dict[str, Any]:
    pool_tokens = int(worker["num_gpu_blocks"]) * block_size
    return {
        "version": KEY_VERSION,
        "model": os.path.abspath(model_path),
        "files": _model_identity(model_path),
        "device": worker.get("device"),
        "device_name": worker.get("device_name"),
        "dtype": worker.get("dtype"),
        "torch": worker.get("torch_version"),
        "threads": worker.get("torch_threads"),
        "block_size": block_size,
        "pool_tokens": min(pool_tokens, PROFILE_POOL_TOKENS),
    }


def _file(directory: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(directory, "profiles", f"{digest}.json")


def load(directory: str, key: dict) -> tuple[dict, str] | None:
    """(profile dict, file) when a profile with exactly this key is cached."""
    path = _file(directory, key)
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable cached profile %s: %s", path, e)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or "profile" not in entry:
        return None
    return entry["profile"], path


def store(directory: str, key: dict, profile: dict) -> str | None:
    """Write atomically (a concurrent reader sees the old file or the new one); the file,
    or None when the directory cannot be written (logged: caching is an optimisation)."""
    path = _file(directory, key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "profile": profile}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache the profile in %s: %s", directory, e)
        return None
    return path
