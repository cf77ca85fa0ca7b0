"""Find, describe and load a model: a Hugging Face directory or a GGUF file.

Both sources are turned into the same thing, an HF-style ``config.json`` dict plus tensors
under HF checkpoint names, so one model class per architecture serves both. GGUF tensors
are dequantized to fp32 on load (the engine computes in fp32/bf16/fp16, never on quantized
weights).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.models.gguf_file import GGUFFile
from engine.models.llama import LlamaForCausalLM
from engine.models.opt import OPTForCausalLM
from engine.models.paths import (  # noqa: F401 -- re-exported: the loader's public names
    DEFAULT_MODEL_DISTRIBUTION,
    ModelLoadError,
    default_model_path,
    resolve_model_path,
)

# HF model_type -> implementation.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "opt": OPTForCausalLM,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # HF model_type: llama | mistral | qwen2 | opt
    vocab_size: int
    max_model_len: int  # the model's own context length
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    path: str  # resolved absolute path
    num_attention_heads: int
    format: str  # "hf" (config.json + safetensors) | "gguf"


def load_model_info(path: str | None) -> ModelInfo:
    """Describe the model from its config/metadata alone; no weights are read."""
    resolved = resolve_model_path(path)
    config = load_hf_config(resolved)
    return _info(resolved, config, _build(config, torch.device("meta")))


def load_model(
    path: str | None,
    dtype: torch.dtype,
    device: torch.device | str,
    on_tensor: Callable[[str], None] | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Build the model on ``device`` in ``dtype`` and fill it from the checkpoint;
    ``on_tensor(name)`` is called after each checkpoint tensor is read (progress)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported model dtype {dtype} (use one of {SUPPORTED_DTYPES})")
    resolved = resolve_model_path(path)
    config = load_hf_config(resolved)
    # Built on the meta device and only then given real (uninitialised) memory: random init
    # of weights about to be overwritten would cost more than reading the checkpoint.
    model = _build(config, torch.device("meta")).to(dtype).to_empty(device=device)
    try:
        weights = iter_weights(resolved, config)
        if on_tensor is not None:
            weights = _reporting(weights, on_tensor)
        model.load_weights(weights)  # type: ignore[operator]
    except ValueError as exc:
        raise ModelLoadError(f"{resolved}: {exc}") from exc
    model.requires_grad_(False).eval()
    return model, _info(resolved, config, model)


def _reporting(
    weights: Iterator[tuple[str, torch.Tensor]], on_tensor: Callable[[str], None]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        yield name, tensor
        on_tensor(name)


def count_tensors(path: str | None) -> int:
    """How many tensors the checkpoint holds (headers only), for a progress total."""
    resolved = resolve_model_path(path)
    if not os.path.isdir(resolved):
        return len(_gguf_file(resolved).tensors)
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(resolved)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(resolved, name), framework="pt") as f:
                    total += len(list(f.keys()))
            except Exception as exc:  # safetensors raises its own error types
                raise ModelLoadError(f"cannot read {name}: {exc}") from exc
    return total


def load_hf_config(path: str) -> dict:
    """The HF ``config.json`` dict of a resolved model path (synthesised for GGUF)."""
    if os.path.isdir(path):
        config = _read_json(os.path.join(path, "config.json"))
        generation = os.path.join(path, "generation_config.json")
        if os.path.isfile(generation):
            # generation_config.json is what HF generate() stops on; it may list several ids.
            gen = _read_json(generation)
            config["eos_token_id"] = _ids(config.get("eos_token_id")) + _ids(
                gen.get("eos_token_id")
            )
            if config.get("bos_token_id") is None:
                config["bos_token_id"] = gen.get("bos_token_id")
        return config
    try:
        return _gguf_config(_gguf_file(path))
    except KeyError as exc:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {exc}") from None


def iter_weights(path: str, config: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors under HF names, lazily (one tensor in memory at a time).

    ``config`` is :func:`load_hf_config`'s result when the caller already has it.
    """
    if os.path.isdir(path):
        return _safetensors_weights(path)
    gguf = _gguf_file(path)
    return _gguf_weights(gguf, config if config is not None else _gguf_config(gguf))


# --------------------------------------------------------------------------- helpers


def _build(config: dict, device: torch.device) -> nn.Module:
    model_type = config.get("model_type")
    cls = ARCHITECTURES.get(str(model_type))
    if cls is None:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    try:
        with device:
            return cls(config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"invalid {model_type} config: {exc!r}") from exc


def _info(path: str, config: dict, model: nn.Module) -> ModelInfo:
    args = model.args  # type: ignore[attr-defined]
    eos = tuple(dict.fromkeys(_ids(config.get("eos_token_id"))))  # ordered, deduplicated
    return ModelInfo(
        architecture=config["model_type"],
        vocab_size=args.vocab_size,
        max_model_len=int(config.get("max_position_embeddings", 2048)),
        num_layers=args.num_layers,
        num_kv_heads=model.num_kv_heads,  # type: ignore[arg-type]
        head_dim=model.head_dim,  # type: ignore[arg-type]
        hidden_size=args.hidden_size,
        eos_token_ids=eos,
        bos_token_id=config.get("bos_token_id"),
        path=path,
        num_attention_heads=args.num_heads,
        format="hf" if os.path.isdir(path) else "gguf",
    )


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        # Pickled *.bin checkpoints are deliberately not loaded: unpickling runs code.
        raise ModelLoadError(f"{directory} has no *.safetensors weights")
    for name in files:
        file = os.path.join(directory, name)
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    yield key, f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc


# --------------------------------------------------------------------------- GGUF


def _gguf_file(path: str) -> GGUFFile:
    try:
        return GGUFFile(path)
    except (OSError, ValueError) as exc:  # GGUFFormatError is a ValueError
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc


# llama.cpp architecture -> HF model_type. Mistral GGUFs say "llama".
_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3 rope scaling as per-frequency divisors


def _gguf_config(gguf: GGUFFile) -> dict:
    arch = gguf.get("general.architecture")
    model_type = _GGUF_ARCHITECTURES.get(str(arch))
    if model_type is None:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(_GGUF_ARCHITECTURES)})"
        )
    meta = gguf.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    config = {
        "model_type": model_type,
        "vocab_size": meta.get(f"{arch}.vocab_size") or getattr(tokens, "length", None),
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", hidden // heads),  # type: ignore[operator]
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "rms_norm_eps": meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": meta[f"{arch}.rope.scaling.factor"],
        }
    if _ROPE_FREQS in gguf.tensors:
        factors = gguf.read(gguf.tensors[_ROPE_FREQS]).reshape(-1).tolist()
        config["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors}
    return config


def _gguf_weights(gguf: GGUFFile, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    # llama.cpp's converter interleaves the two RoPE halves of each q/k head (for its
    # GPT-J-style rotation); Qwen2 GGUFs are stored unpermuted.
    permuted = gguf.get("general.architecture") == "llama"
    for info in gguf.tensors.values():
        if info.name == _ROPE_FREQS:
            continue  # already folded into the config's rope scaling
        name = _gguf_to_hf_name(info.name)
        try:
            weights = gguf.read(info)
        except (ValueError, NotImplementedError) as exc:
            raise ModelLoadError(f"cannot dequantize GGUF tensor {info.name}: {exc}") from exc
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weights = _unpermute_qk(weights, config["num_attention_heads"])
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weights = _unpermute_qk(weights, config["num_key_value_heads"])
        yield name, torch.from_numpy(weights)


def _gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _GGUF_LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        return name  # unknown: the model's loader reports it by name
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"


def _unpermute_qk(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's ``permute``: per head, rows (pair, half) -> (half, pair)."""
    half = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(weights.shape)
