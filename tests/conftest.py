"""Shared test set-up. Nothing here may reach a model hub: everything is local."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Measured cost profiles are cached here, never in the user's ~/.cache (subprocesses
# inherit it); removed when the session ends.
_PROFILE_CACHE = tempfile.mkdtemp(prefix="fastserve-test-cache-")
os.environ["FASTSERVE_CACHE_DIR"] = _PROFILE_CACHE
atexit.register(shutil.rmtree, _PROFILE_CACHE, True)
