"""Weight-only quantized linear methods over PyTorch's own packed-weight CPU kernels.

- ``int8``: per-output-channel symmetric int8, ``torch.ops.aten._weight_int8pack_mm``
  (``w = code * scale[n]``).
- ``int4``: group-wise asymmetric 4-bit, ``_weight_int4pack_mm_for_cpu`` over weights packed
  once at load by ``_convert_weight_to_int4pack_for_cpu``. The kernel's convention, checked by
  experiment on torch 2.13: ``w = (code - 8) * scale[n, g] + zero[n, g]`` with codes 0..15,
  ``scales_and_zeros`` laid out ``[K / group, N, 2]``. Its constraints: group size 32, 64,
  128 or 256, ``K % group == 0``, ``N % 16 == 0``. A layer whose shape does not fit falls
  back to int8 (and says so in the log).

Activations: torch 2.13's CPU kernels for both formats are vectorised for bf16 inputs only;
with fp32 inputs they run a scalar loop 10-100x slower than ``F.linear`` (measured:
docs/quantization.md). So an fp32 model's quantized layers round their input to bf16, run
the kernel with bf16 scales, and return fp32: the output differs from an exact
dequantize-then-matmul by about 0.5 % of its scale, small next to the 4-bit rounding of the
weights themselves. Norms, attention, the KV cache and the logits stay fp32.

Checkpoint tensors reach a method either as floats (safetensors, or GGUF types with no exact
packed form) which it quantizes itself, or as :class:`QuantizedWeight` (GGUF Q4_0 / Q4_1 /
Q4_K / Q8_0 blocks decoded into codes and scales) which it keeps as they are when the format
matches, and re-quantizes from their exact dequantized values otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.models.linear import LinearMethod, Loaded, as_float


def kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype the packed kernels run in for a model in ``dtype``."""
    return torch.bfloat16 if dtype == torch.float32 and device.type == "cpu" else dtype


def _run(op, x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    """``op(x2d, weight, *args)`` in the kernel's dtype (that of the last arg), reshaped and
    returned in ``x``'s dtype."""
    if x.dim() == 2 and x.dtype == args[-1].dtype:  # a bf16 model's step: nothing to adapt
        return op(x, weight, *args)
    flat = x.reshape(-1, x.shape[-1]).to(args[-1].dtype)
    y = op(flat, weight, *args)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


log = logging.getLogger("fastserve.quant")

QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
# Logits the int8 head recomputes in fp32 per row (see Int8WeightOnlyMethod.refine_logits).
REFINED_LOGITS = 32
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"


@dataclass
class QuantizedWeight:
    """A ``[out, in]`` weight as integer codes and per-group scales (and zero points).

    ``bits == 8``: ``w = code * scale`` (int8 codes, symmetric; ``zeros`` is None).
    ``bits == 4``: ``w = (code - 8) * scale + zero`` (uint8 codes 0..15): torch's int4 form.
    ``scales`` / ``zeros`` are ``[out, in // group_size]`` fp32. ``source`` names where it came
    from (a GGML type) for the loader's report.
    """

    bits: int
    group_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    source: str = ""

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        scales = self.scales.repeat_interleave(g, dim=1)
        if self.bits == 8:
            return self.codes.float() * scales
        assert self.zeros is not None
        return (self.codes.float() - 8) * scales + self.zeros.repeat_interleave(g, dim=1)

    def narrow(self, dim: int, start: int, length: int) -> QuantizedWeight:
        if dim == 0:
            return self._map(lambda t: t.narrow(0, start, length))
        if start % self.group_size or length % self.group_size:
            raise ValueError(
                f"columns {start}:{start + length} cut through groups of {self.group_size}"
            )
        g = self.group_size
        return QuantizedWeight(
            self.bits,
            g,
            self.codes.narrow(1, start, length),
            self.scales.narrow(1, start // g, length // g),
            None if self.zeros is None else self.zeros.narrow(1, start // g, length // g),
            self.source,
        )

    def index_rows(self, rows: torch.Tensor) -> QuantizedWeight:
        """Rows reordered (llama.cpp's q/k permutation is a permutation of rows)."""
        return self._map(lambda t: t.index_select(0, rows))

    def _map(self, fn) -> QuantizedWeight:
        zeros = None if self.zeros is None else fn(self.zeros)
        return QuantizedWeight(
            self.bits, self.group_size, fn(self.codes), fn(self.scales), zeros, self.source
        )


# --------------------------------------------------------------------------- quantizers


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scales [out]) with ``w ~= codes * scales[:, None]``."""
    w = w.float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero rows
    codes = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4_groups(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes 0..15, scales, zeros) in torch's int4 form, min/max per group."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # constant groups
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp_(0, 15)
    zeros = low + 8 * scales
    return codes.to(torch.uint8).reshape(n, k), scales, zeros


# --------------------------------------------------------------------------- methods


@dataclass
class _Notes:
    """What a method did with the tensors it was given, for the loader's summary."""

    exact: set[str] = field(default_factory=set)
    requantized: set[str] = field(default_factory=set)

    def add(self, loaded: Loaded, exact: bool, target: str) -> None:
        source = loaded.source if isinstance(loaded, QuantizedWeight) else "float"
        if source == "float":
            self.requantized.add(f"float -> {target}")  # quantized at load
        elif exact:
            self.exact.add(f"{source} -> {target}")
        else:
            self.requantized.add(f"{source} -> {target}")


class Int8WeightOnlyMethod(LinearMethod):
    """int8 codes ``[out, in]`` and one scale per output channel (``weight_scale``, in the
    model's dtype; ``kernel_scale`` is the copy in the kernel's dtype)."""

    aux_params = ("weight_scale", "kernel_scale")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.notes = _Notes()

    def describe(self) -> str:
        return "int8"

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        layer.weight_scale = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def load_weight(self, layer: nn.Module, loaded: Loaded, dst_rows: slice) -> None:
        exact = (
            isinstance(loaded, QuantizedWeight)
            and loaded.bits == 8
            and loaded.group_size == loaded.shape[1]
        )
        if exact:
            codes, scales = loaded.codes, loaded.scales[:, 0]  # type: ignore[union-attr]
        else:
            codes, scales = quantize_int8_per_channel(as_float(loaded))
        self.notes.add(loaded, exact, "int8 per-channel")
        layer.weight.data[dst_rows].copy_(codes)
        layer.weight_scale.data[dst_rows].copy_(scales)

    def process_after_loading(self, layer: nn.Module) -> None:
        scales = layer.weight_scale.data
        kernel = scales.to(kernel_dtype(scales.dtype, scales.device))
        layer.kernel_scale = nn.Parameter(kernel, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _run(torch.ops.aten._weight_int8pack_mm, x, layer.weight, layer.kernel_scale)
        return y if bias is None else y + bias

    def refine_logits(
        self, layer: nn.Module, x: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """The kernel's bf16 output resolves a logit of 25 to 0.125, enough to swap two
        near-tied tokens; the ``REFINED_LOGITS`` largest of each row are recomputed in the
        fp32 from the int8 rows (a few hundred multiply-adds per row), so greedy choices are
        those of the int8 weights in fp32 (a bf16 model's too)."""
        if layer.kernel_scale.dtype == torch.float32:
            return logits
        top = logits.topk(min(REFINED_LOGITS, logits.shape[-1]), dim=-1).indices  # [n, k]
        rows = layer.weight[top].float() * layer.weight_scale[top].float().unsqueeze(-1)
        exact = torch.einsum("nkd,nd->nk", rows, x.reshape(-1, x.shape[-1]).float())
        return logits.scatter(-1, top, exact)


class Int4WeightOnlyMethod(LinearMethod):
    """4-bit codes in groups along the input dimension, packed for torch's CPU kernel.

    While loading, ``weight`` holds unpacked codes ``[out, in]`` (uint8) so that any rows can
    be written in any order; ``process_after_loading`` packs it to ``[out, in / 2]`` and lays
    scales and zeros out as the kernel wants them.
    """

    aux_params = ("weight_scale", "weight_zero", "scales_and_zeros")

    def __init__(self, group_size: int = 32, name: str = "") -> None:
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}")
        self.group_size = group_size
        self.name = name
        self.notes = _Notes()

    def describe(self) -> str:
        return f"int4 g{self.group_size}"

    @staticmethod
    def unsupported(in_features: int, out_features: int, group_size: int) -> str | None:
        """Why torch's int4 CPU kernel cannot take this shape, or None."""
        if in_features % group_size:
            return f"in_features {in_features} is not a multiple of the group size {group_size}"
        if out_features % INT4_N_MULTIPLE:
            return f"out_features {out_features} is not a multiple of {INT4_N_MULTIPLE}"
        return None

    def fitted(self, in_features: int, out_features: int) -> LinearMethod:
        why = self.unsupported(in_features, out_features, self.group_size)
        if why is None:
            return self
        log.info("%s: int4 does not fit (%s); using int8", self.name or "a layer", why)
        return Int8WeightOnlyMethod(self.name)

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        groups = in_features // self.group_size
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.uint8), requires_grad=False
        )
        layer.weight_scale = nn.Parameter(torch.empty(out_features, groups), requires_grad=False)
        layer.weight_zero = nn.Parameter(torch.empty(out_features, groups), requires_grad=False)

    def load_weight(self, layer: nn.Module, loaded: Loaded, dst_rows: slice) -> None:
        exact = (
            isinstance(loaded, QuantizedWeight)
            and loaded.bits == 4
            and loaded.group_size == self.group_size
        )
        if exact:
            codes, scales, zeros = loaded.codes, loaded.scales, loaded.zeros  # type: ignore[union-attr]
        else:
            codes, scales, zeros = quantize_int4_groups(as_float(loaded), self.group_size)
        self.notes.add(loaded, exact, self.describe())
        layer.weight.data[dst_rows].copy_(codes)
        layer.weight_scale.data[dst_rows].copy_(scales)
        layer.weight_zero.data[dst_rows].copy_(zeros)

    def process_after_loading(self, layer: nn.Module) -> None:
        codes = layer.weight.data
        if codes.device.type != "cpu":
            raise ValueError(
                f"{self.name or 'a layer'}: int4 weights use torch's CPU int4 kernel; on "
                f"{codes.device.type} use --quantization int8 or none"
            )
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # [K / group, N, 2]: (scale, zero) of group g for output n.
        sz = torch.stack([layer.weight_scale.data, layer.weight_zero.data], dim=-1)
        sz = sz.to(kernel_dtype(sz.dtype, sz.device))
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.scales_and_zeros = nn.Parameter(sz.transpose(0, 1).contiguous(), requires_grad=False)
        del layer.weight_scale, layer.weight_zero

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
        y = _run(op, x, layer.weight, self.group_size, layer.scales_and_zeros)
        return y if bias is None else y + bias


def make_method(kind: str, group_size: int = 32, name: str = "") -> LinearMethod | None:
    """The method for ``kind`` ("none", "int8", "int4"); an int4 layer whose shape torch's
    kernel cannot take falls back to int8 when the layer is built, and the log says so."""
    if kind == "none":
        return None
    if kind == "int4":
        return Int4WeightOnlyMethod(group_size, name)
    if kind == "int8":
        return Int8WeightOnlyMethod(name)
    raise ValueError(f"unknown quantization {kind!r} (use none, int8 or int4)")


@dataclass(frozen=True)
class QuantConfig:
    """Which linear layers are quantized how; called with a layer's full prefix
    (``"model.layers.3.mlp.down_proj"``, ``"lm_head"``) it is a ``LinearMethodFor``.

    ``default`` applies to every linear layer of the decoder stack not named in ``layers``;
    ``lm_head`` to the output projection (tied or not). Kinds: "none", "int8", "int4".
    """

    default: str = "none"
    lm_head: str = "none"
    layers: tuple[tuple[str, str], ...] = ()
    group_size: int = 32

    def kind(self, prefix: str) -> str:
        for name, kind in self.layers:
            if name == prefix:
                return kind
        return self.lm_head if prefix == "lm_head" else self.default

    def __call__(self, prefix: str) -> LinearMethod | None:
        return make_method(self.kind(prefix), self.group_size, prefix)

    @property
    def quantizes(self) -> bool:
        return (
            self.default != "none"
            or self.lm_head != "none"
            or any(kind != "none" for _, kind in self.layers)
        )


def quantization_report(model: nn.Module) -> dict[str, int]:
    """``{"<source> -> <format> (exact|re-quantized)": number of layers}`` for the log and
    for tests: what every quantized layer was built from."""
    report: dict[str, int] = {}
    for module in model.modules():
        notes = getattr(getattr(module, "quant_method", None), "notes", None)
        if notes is None:
            continue
        lines = [f"{n} (exact)" for n in notes.exact]
        lines += [f"{n} (re-quantized)" for n in notes.requantized]
        for line in lines:
            report[line] = report.get(line, 0) + 1
    return report
