"""Find, describe and load a model: a Hugging Face directory or a GGUF file.

Both sources are turned into the same thing, an HF-style ``config.json`` dict plus tensors
under HF checkpoint names, so one model class per architecture serves both.

``quantization`` decides how linear layers hold their weights (``engine.models.quant``):
"none" dequantizes GGUF tensors to floats as before; "int8" / "int4" quantize every linear
layer at load (safetensors too); "auto" keeps a GGUF's own precision, layer by layer, in
the nearest packed format (floats for a float checkpoint). GGUF blocks that have an exact
packed form arrive as ``QuantizedWeight`` and are never dequantized; the rest are
re-quantized, and the log says which and how.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from engine.models.base import PipelineStage
from engine.models.gguf_blocks import DECODERS
from engine.models.gguf_file import GGUFFile
from engine.models.lazy_weights import GGUFSlice, SafetensorsSlice, decode_quantized, unpermute_qk
from engine.models.linear import SINGLE_DEVICE, LazyWeight, TPInfo
from engine.models.llama import LlamaForCausalLM
from engine.models.opt import OPTForCausalLM
from engine.models.paths import (  # noqa: F401 -- re-exported: the loader's public names
    DEFAULT_MODEL_DISTRIBUTION,
    ModelLoadError,
    default_model_path,
    resolve_model_path,
)
from engine.models.quant import (
    QUANTIZATION_MODES,
    QuantConfig,
    QuantizedWeight,
    quantization_report,
)

log = logging.getLogger("fastserve.loader")
_CPU = torch.device("cpu")

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
    tp: TPInfo = SINGLE_DEVICE,
    quantization: str = "none",
    stage: PipelineStage | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Build the model on ``device`` in ``dtype`` and fill it from the checkpoint; with
    ``tp`` of size > 1, only this rank's shards (then ``num_kv_heads``, of the model and of
    the ``ModelInfo``, counts the KV heads this rank caches). ``quantization`` is one of
    ``QUANTIZATION_MODES`` (see the module docstring). With a pipeline ``stage`` only that
    stage's layers are built, and only the checkpoint tensors it keeps are read.
    ``on_tensor(name)`` is called after each checkpoint tensor is read (progress)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported model dtype {dtype} (use one of {SUPPORTED_DTYPES})")
    resolved = resolve_model_path(path)
    config = load_hf_config(resolved)
    quant = plan_quantization(resolved, config, quantization, torch.device(device))
    # Built on the meta device and only then given real (uninitialised) memory: random init
    # of weights about to be overwritten would cost more than reading the checkpoint.
    model = _build(config, torch.device("meta"), tp, quant, stage).to(dtype).to_empty(device=device)
    try:
        keep = getattr(model, "owns", None)
        # Lazily: each layer reads only its rank's slice of a tensor (lazy_weights).
        weights = iter_weights(resolved, config, keep_quantized=quant.quantizes, keep=keep,
                               lazy=True)
        if on_tensor is not None:
            weights = _reporting(weights, on_tensor)
        model.load_weights(weights)  # type: ignore[operator]
    except ValueError as exc:
        raise ModelLoadError(f"{resolved}: {exc}") from exc
    model.requires_grad_(False).eval()
    for line, count in sorted(quantization_report(model).items()):
        log.info("quantized weights: %s: %d layers", line, count)
    return model, _info(resolved, config, model)


def plan_quantization(
    path: str, config: dict, mode: str, device: torch.device = _CPU
) -> QuantConfig:
    """Which linear layers get which packed format, for ``mode`` on this checkpoint.

    The packed kernels used are torch's CPU ones: on another device ``auto`` dequantizes (as
    ``none``) and ``int8`` / ``int4`` are refused.

    The LM head is int8 whenever anything is quantized: it is the largest matrix of a small
    model (SmolLM2: 49152 x 576) and int8 keeps its logits within rounding of fp32; measured
    in docs/quantization.md.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization {mode!r} (use one of {QUANTIZATION_MODES})")
    if device.type != "cpu" and mode in ("int8", "int4"):
        raise ValueError(
            f"--quantization {mode} uses torch's CPU weight-only kernels; on {device.type} "
            "use none (or auto, which dequantizes there)"
        )
    if mode == "none" or (mode == "auto" and (os.path.isdir(path) or device.type != "cpu")):
        return QuantConfig()
    if mode in ("int8", "int4"):
        return QuantConfig(default=mode, lm_head="int8")
    gguf = _gguf_file(path)
    kinds: dict[str, str] = {}
    tied = bool(config.get("tie_word_embeddings"))
    for info in gguf.tensors.values():
        if not info.name.endswith(".weight") or len(info.shape) != 2:
            continue
        kind = _GGML_KIND.get(info.qtype, "none")
        name = _gguf_to_hf_name(info.name)
        if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
            layer = "lm_head"
            kind = "int8" if kind != "none" else kind  # see the docstring
        elif name.startswith("model.layers."):
            layer = _fused_prefix(name.removesuffix(".weight"))
        else:
            continue
        # A fused layer takes the most precise format among its parts.
        kinds[layer] = max(kinds.get(layer, "int4"), kind, key=_PRECISION.index)
    head = kinds.pop("lm_head", "none")
    return QuantConfig(default="none", lm_head=head, layers=tuple(sorted(kinds.items())))


# GGML type -> the packed format that keeps its precision: 4 bits or fewer -> int4,
# 5 to 8 bits -> int8 (per channel), floats -> none.
_GGML_KIND = {
    **{t: "int4" for t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)},
    **{t: "int4" for t in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q3_K)},
    GGMLQuantizationType.Q2_K: "int4",
    GGMLQuantizationType.IQ4_NL: "int4",
    GGMLQuantizationType.IQ4_XS: "int4",
    **{t: "int8" for t in (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1)},
    **{t: "int8" for t in (GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)},
    **{t: "int8" for t in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q8_1)},
}
_PRECISION = ("int4", "int8", "none")
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_FUSED_PARTS = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _fused_prefix(prefix: str) -> str:
    head, _, last = prefix.rpartition(".")
    return f"{head}.{_FUSED_PARTS.get(last, last)}"


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


def iter_weights(
    path: str,
    config: dict | None = None,
    keep_quantized: bool = False,
    keep: Callable[[str], bool] | None = None,
    lazy: bool = False,
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight | LazyWeight]]:
    """Checkpoint tensors under HF names, one at a time.

    ``config`` is :func:`load_hf_config`'s result when the caller already has it. With
    ``keep_quantized``, GGUF tensors whose blocks have an exact packed form come as
    ``QuantizedWeight`` instead of fp32. ``keep`` (by HF name) skips tensors before they are
    read, e.g. other pipeline stages' layers. ``lazy``: each comes unread, as a
    ``LazyWeight`` to narrow to the part wanted and then read (``engine.models.lazy_weights``);
    it is valid until the next one is asked for.
    """
    keep = keep or (lambda _name: True)
    if os.path.isdir(path):
        return _safetensors_weights(path, keep, lazy)
    gguf = _gguf_file(path)
    config = config if config is not None else _gguf_config(gguf)
    return _gguf_weights(gguf, config, keep_quantized, keep, lazy)


# --------------------------------------------------------------------------- helpers


def _build(
    config: dict,
    device: torch.device,
    tp: TPInfo = SINGLE_DEVICE,
    quant: QuantConfig | None = None,
    stage: PipelineStage | None = None,
) -> nn.Module:
    model_type = config.get("model_type")
    cls = ARCHITECTURES.get(str(model_type))
    if cls is None:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    try:
        with device:
            return cls(config, tp, quant, stage=stage)  # type: ignore[call-arg]
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


def _safetensors_weights(
    directory: str, keep: Callable[[str], bool], lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | LazyWeight]]:
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
                    if not keep(key):
                        continue
                    if lazy:
                        part = f.get_slice(key)
                        yield key, SafetensorsSlice(part, tuple(part.get_shape()))
                    else:
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


def _gguf_weights(
    gguf: GGUFFile,
    config: dict,
    keep_quantized: bool,
    keep: Callable[[str], bool],
    lazy: bool = False,
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight | LazyWeight]]:
    # llama.cpp's converter interleaves the two RoPE halves of each q/k head (for its
    # GPT-J-style rotation); Qwen2 GGUFs are stored unpermuted.
    permuted = gguf.get("general.architecture") == "llama"
    for info in gguf.tensors.values():
        if info.name == _ROPE_FREQS:
            continue  # already folded into the config's rope scaling
        name = _gguf_to_hf_name(info.name)
        if not keep(name):
            continue
        heads = None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config["num_attention_heads"]
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config["num_key_value_heads"]
        packs = keep_quantized and info.qtype in DECODERS and len(info.shape) == 2
        if lazy:
            if keep_quantized and not packs and info.qtype not in _FLOAT_TYPES:
                _log_unpacked(info)
            yield name, GGUFSlice(gguf, info, packed=packs, heads=heads)
            continue
        if packs:
            packed = _gguf_quantized(gguf, info)
            if heads is not None:  # the permutation is one of rows: codes and scales follow
                order = _unpermute_qk(np.arange(info.shape[0]), heads)
                packed = packed.index_rows(torch.from_numpy(order))
            yield name, packed
            continue
        if keep_quantized and info.qtype not in _FLOAT_TYPES and len(info.shape) == 2:
            _log_unpacked(info)
        try:
            weights = gguf.read(info)
        except (ValueError, NotImplementedError) as exc:
            raise ModelLoadError(f"cannot dequantize GGUF tensor {info.name}: {exc}") from exc
        if heads is not None:
            weights = _unpermute_qk(weights, heads)
        yield name, torch.from_numpy(weights)


def _log_unpacked(info) -> None:
    if len(info.shape) == 2:
        log.info(
            "%s: %s has no packed form a torch kernel takes; dequantized, and its layer "
            "re-quantizes it",
            info.name,
            info.qtype.name,
        )


def _gguf_quantized(gguf: GGUFFile, info) -> QuantizedWeight:
    return decode_quantized(gguf.read_raw(info), info.qtype)


def _gguf_to_hf_name(name: str) -> str:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = _GGUF_LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        return name  # unknown: the model's loader reports it by name
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"


_unpermute_qk = unpermute_qk
