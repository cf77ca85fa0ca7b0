"""Linear layers that both shard (tensor parallelism) and quantize, and the loader behind them.

Every linear layer owns a :class:`LinearMethod` (how its weight is stored and multiplied: plain
floats, int8 or int4 weight-only, see ``engine.models.quant``) and knows which part of a
checkpoint tensor its rank keeps. A model is written as if it ran on one device: it builds
``QKVParallelLinear`` where it needs q/k/v, ``RowParallelLinear`` where partial sums meet,
and hands checkpoint tensors to :func:`load_named_weights`; ``TPInfo`` and the method decide
the rest. With ``TPInfo()`` (one rank) and the unquantized method every layer computes exactly
what ``nn.Linear`` / ``nn.Embedding`` would, bit for bit.

Sharding, for tensor-parallel size T and rank r:

- Column parallel: output rows split in T contiguous parts; rank r computes its part of the
  output from the full input, no communication.
- Merged column (gate/up): each part of the fused output is split separately, so rank r holds
  ``[gate_r | up_r]`` and can split its own output in two.
- QKV: rank r holds ``[q_r | k_r | v_r]``: its query heads and the KV heads they read. With
  fewer KV heads than ranks each KV head is replicated on the ``T / num_kv_heads`` ranks whose
  query heads use it.
- Row parallel: input columns split; each rank multiplies its slice of the input (the column
  parallel layer's local output) and an all-reduce sums the partial products. A bias is added
  once, after the sum.
- Vocab parallel embedding / LM head (``engine.models.vocab``): vocabulary rows split after
  padding the vocabulary to a multiple of T; the head is a column-parallel layer over them.

A parameter's weight loader is its owning layer's ``weight_loader(param, loaded, shard_id)``,
looked up by name at load time: attributes stuck on an ``nn.Parameter`` do not survive the
meta-device build followed by ``to_empty`` that the loader uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

ShardId = int | str | None
# Which method a layer uses, by its full parameter prefix ("model.layers.0.mlp.down_proj");
# None means unquantized. ``engine.models.quant.QuantConfig`` is one.
LinearMethodFor = Callable[[str], "LinearMethod | None"]


def no_quant(prefix: str) -> LinearMethod | None:
    """The ``LinearMethodFor`` of an unquantized model."""
    return None


@dataclass(frozen=True)
class TPInfo:
    """This process's place in its tensor-parallel group; ``TPInfo()`` is one device.

    ``group`` is a ``torch.distributed`` process group (``None``: the default group).
    ``all_reduce_fn`` / ``all_gather_fn`` replace the collectives, e.g. in tests that compute
    every rank's part in one process.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    all_reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    all_gather_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad tensor-parallel rank {self.rank} of {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group's ranks."""
        if self.size == 1:
            return x
        if self.all_reduce_fn is not None:
            return self.all_reduce_fn(x)
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        if self.all_gather_fn is not None:
            return self.all_gather_fn(x)
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE_DEVICE = TPInfo()


def split_evenly(total: int, tp: TPInfo, what: str) -> int:
    if total % tp.size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor-parallel size {tp.size}")
    return total // tp.size


class CheckpointWeight(Protocol):
    """A quantized checkpoint tensor (``engine.models.quant.QuantizedWeight``) as the layers
    see it: a logical ``[out, in]`` shape that can be narrowed like a tensor."""

    shape: torch.Size

    def narrow(self, dim: int, start: int, length: int) -> CheckpointWeight: ...

    def dequantize(self) -> torch.Tensor: ...


Loaded = torch.Tensor | CheckpointWeight


# --------------------------------------------------------------------------- methods


class LinearMethod(ABC):
    """How a linear layer stores its weight and computes ``x @ W.T + b``.

    Contract: ``create_weights`` registers ``layer.weight`` (whatever its storage: floats,
    int8 codes, int4 codes...) and any auxiliary tensors, named in ``aux_params`` so the
    loader does not expect them in a checkpoint; ``load_weight`` writes logical rows
    ``dst_rows`` of the ``[out, in]`` weight from a float tensor or a quantized checkpoint
    tensor already narrowed to this rank's part; ``process_after_loading`` runs once after
    every tensor has arrived (repacking for a kernel); ``apply`` is the forward.
    """

    aux_params: tuple[str, ...] = ()

    def fitted(self, in_features: int, out_features: int) -> LinearMethod:
        """This method, or the one to use instead when its kernel cannot take the shape."""
        return self

    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None: ...

    @abstractmethod
    def load_weight(self, layer: nn.Module, loaded: Loaded, dst_rows: slice) -> None: ...

    def process_after_loading(self, layer: nn.Module) -> None:
        pass

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor: ...

    def describe(self) -> str:
        return type(self).__name__

    def refine_logits(
        self, layer: nn.Module, x: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """An output layer's fp32 logits, given what ``apply`` returned (a method whose
        kernel rounds its output recomputes the candidates that matter)."""
        return logits


class LazyWeight(ABC):
    """A checkpoint tensor not read yet (``engine.models.loader`` hands these out).

    ``narrow`` only records which part is wanted; ``read`` reads that part and nothing else,
    giving a float tensor or a quantized checkpoint tensor. Weight loaders narrow to their
    rank's rows or columns first and read after, so a tensor-parallel rank never reads or
    holds more of a checkpoint tensor than its own shard.
    """

    shape: torch.Size

    @abstractmethod
    def narrow(self, dim: int, start: int, length: int) -> LazyWeight: ...

    @abstractmethod
    def read(self) -> torch.Tensor | CheckpointWeight: ...

    def dequantize(self) -> torch.Tensor:
        return as_float(self.read())


def read_now(loaded: Loaded) -> Loaded:
    """``loaded`` itself, or what a lazy one reads (call it once narrowed)."""
    return loaded.read() if isinstance(loaded, LazyWeight) else loaded


def as_float(loaded: Loaded) -> torch.Tensor:
    """A checkpoint tensor as floats (quantized ones are dequantized, lazy ones read)."""
    if isinstance(loaded, torch.Tensor):
        return loaded
    return loaded.dequantize()


class UnquantizedLinearMethod(LinearMethod):
    """Plain ``F.linear`` on a float weight in the model's dtype: what ``nn.Linear`` does."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def load_weight(self, layer: nn.Module, loaded: Loaded, dst_rows: slice) -> None:
        layer.weight.data[dst_rows].copy_(as_float(loaded))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = UnquantizedLinearMethod()


# --------------------------------------------------------------------------- layers


class LinearBase(nn.Module, ABC):
    """Shared plumbing: the method's weights, an optional bias, the loader entry point.

    Subclasses say how a checkpoint tensor maps onto this rank's rows and columns
    (``_source_slices``) and what happens around the matmul (``forward``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp: TPInfo,
        quant_method: LinearMethod | None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.tp = tp
        self.quant_method = (quant_method or UNQUANTIZED).fitted(in_features, out_features)
        self.quant_method.create_weights(self, in_features, out_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def aux_params(self) -> tuple[str, ...]:
        return self.quant_method.aux_params

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"tp={self.tp.rank}/{self.tp.size}, method={self.quant_method.describe()}"
        )

    @abstractmethod
    def _source_slices(
        self, full_shape: tuple[int, ...], shard_id: ShardId
    ) -> tuple[list[tuple[int, int, int]], int]:
        """``([(dim, start, length)...] to narrow the checkpoint tensor by, dst row offset)``."""

    @abstractmethod
    def _expected_full_shape(self, shard_id: ShardId, is_bias: bool) -> tuple[int, ...]:
        """The checkpoint tensor's shape (the whole of it, or one shard of a fused one)."""

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: ShardId = None) -> int:
        """Keep this rank's part of ``loaded`` (a checkpoint tensor or one shard of a fused
        one); returns how many elements of ``param`` it filled. Raises ``ValueError`` on a
        shape that does not fit."""
        is_bias = param is self.bias
        if not is_bias and param is not self.weight:
            raise ValueError("not a loadable parameter of this layer")
        want = self._expected_full_shape(shard_id, is_bias)
        if tuple(loaded.shape) != want:
            raise ValueError(f"shape {tuple(loaded.shape)}, expected {want}")
        narrows, dst_start = self._source_slices(want, shard_id)
        for dim, start, length in narrows:
            loaded = loaded.narrow(dim, start, length)
        rows = slice(dst_start, dst_start + loaded.shape[0])
        if is_bias:
            self.bias.data[rows].copy_(as_float(loaded))
            return loaded.shape[0]
        self.quant_method.load_weight(self, read_now(loaded), rows)
        return loaded.shape[0] * self.in_features

    def logical_numel(self, param: nn.Parameter) -> int:
        """Elements the loader must fill for ``param`` (the unpacked weight's, for codes)."""
        if param is self.bias:
            return self.out_features
        return self.out_features * self.in_features

    def process_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (small projections not worth splitting)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TPInfo = SINGLE_DEVICE,
        quant_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, tp, quant_method)

    def _expected_full_shape(self, shard_id: ShardId, is_bias: bool) -> tuple[int, ...]:
        return (self.out_features,) if is_bias else (self.out_features, self.in_features)

    def _source_slices(self, full_shape, shard_id):
        return [], 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output rows split across ranks; ``forward`` returns this rank's output columns."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TPInfo = SINGLE_DEVICE,
        quant_method: LinearMethod | None = None,
        gather_output: bool = False,
    ) -> None:
        self.full_out = out_features
        self.gather_output = gather_output
        local = split_evenly(out_features, tp, "output size")
        super().__init__(in_features, local, bias, tp, quant_method)

    def _expected_full_shape(self, shard_id: ShardId, is_bias: bool) -> tuple[int, ...]:
        return (self.full_out,) if is_bias else (self.full_out, self.in_features)

    def _source_slices(self, full_shape, shard_id):
        return [(0, self.tp.rank * self.out_features, self.out_features)], 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        return self.tp.all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (Llama's gate and up).

    ``shard_id`` is the index of the part in ``output_sizes``; rank r holds part i's r-th
    slice at offset ``sum(local sizes before i)``.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool = False,
        tp: TPInfo = SINGLE_DEVICE,
        quant_method: LinearMethod | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        self.local_sizes = [split_evenly(s, tp, "merged output part") for s in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, tp, quant_method)

    def _expected_full_shape(self, shard_id: ShardId, is_bias: bool) -> tuple[int, ...]:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"merged linear needs a part index, got {shard_id!r}")
        size = self.output_sizes[shard_id]
        return (size,) if is_bias else (size, self.in_features)

    def _source_slices(self, full_shape, shard_id):
        local = self.local_sizes[shard_id]
        return [(0, self.tp.rank * local, local)], sum(self.local_sizes[:shard_id])


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; rank r holds ``[q_r | k_r | v_r]`` (``shard_id`` is
    ``"q"``, ``"k"`` or ``"v"``). KV heads are split when there are at least as many as ranks,
    else replicated: rank r keeps KV head ``r // (T / num_kv_heads)``."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TPInfo = SINGLE_DEVICE,
        quant_method: LinearMethod | None = None,
    ) -> None:
        self.head_dim = head_dim
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
        self.num_heads = split_evenly(num_heads, tp, "number of attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = split_evenly(num_kv_heads, tp, "number of KV heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            if tp.size % num_kv_heads:
                raise ValueError(
                    f"tensor-parallel size {tp.size} is not a multiple of the "
                    f"{num_kv_heads} KV heads to replicate"
                )
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank // (tp.size // num_kv_heads)
        self.q_size = self.num_heads * head_dim  # this rank's
        self.kv_size = self.num_kv_heads * head_dim
        total = (num_heads + 2 * self.num_kv_heads * tp.size) * head_dim
        # Built as a column-parallel layer over the per-rank concatenation (replicated KV heads
        # counted once per rank), so the local output is q_size + 2 * kv_size.
        super().__init__(hidden_size, total, bias, tp, quant_method)

    def _expected_full_shape(self, shard_id: ShardId, is_bias: bool) -> tuple[int, ...]:
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"qkv linear needs shard id 'q', 'k' or 'v', got {shard_id!r}")
        heads = self.total_heads if shard_id == "q" else self.total_kv_heads
        rows = heads * self.head_dim
        return (rows,) if is_bias else (rows, self.in_features)

    def _source_slices(self, full_shape, shard_id):
        if shard_id == "q":
            return [(0, self.tp.rank * self.q_size, self.q_size)], 0
        start = self.kv_head_start * self.head_dim
        offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
        return [(0, start, self.kv_size)], offset


class RowParallelLinear(LinearBase):
    """Input columns split across ranks; partial products are summed by an all-reduce, then
    the bias is added once. ``reduce_results=False`` leaves the sum to the caller."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TPInfo = SINGLE_DEVICE,
        quant_method: LinearMethod | None = None,
        reduce_results: bool = True,
    ) -> None:
        self.full_in = in_features
        self.reduce_results = reduce_results
        local = split_evenly(in_features, tp, "input size")
        super().__init__(local, out_features, bias, tp, quant_method)

    def _expected_full_shape(self, shard_id: ShardId, is_bias: bool) -> tuple[int, ...]:
        return (self.out_features,) if is_bias else (self.out_features, self.full_in)

    def _source_slices(self, full_shape, shard_id):
        if len(full_shape) == 1:  # the bias is whole on every rank
            return [], 0
        return [(1, self.tp.rank * self.in_features, self.in_features)], 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:  # one fused matmul + bias, as nn.Linear computes it
            return self.quant_method.apply(self, x, self.bias)
        y = self.quant_method.apply(self, x, None)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


# --------------------------------------------------------------------------- loading

# Maps a checkpoint tensor name to (parameter name, shard id or None), or None for tensors to
# skip on purpose (a tied head, rotary buffers).
WeightTarget = tuple[str, ShardId]


def load_named_weights(
    module: nn.Module,
    weights: Iterable[tuple[str, Loaded]],
    target: Callable[[str], WeightTarget | None],
) -> None:
    """Hand checkpoint tensors to their layers' weight loaders; every parameter must be
    filled exactly, then each layer's method finishes its weights (repacking).

    Raises ``ValueError`` naming unknown tensors, shape mismatches and unfilled parameters,
    so a naming mistake fails at load time instead of producing garbage text.
    """
    owners = dict(module.named_modules())
    params: dict[str, tuple[nn.Module, nn.Parameter]] = {}
    for prefix, owner in owners.items():
        aux = set(getattr(owner, "aux_params", ()))
        for pname, param in owner.named_parameters(recurse=False):
            if pname not in aux:
                params[f"{prefix}.{pname}" if prefix else pname] = (owner, param)
    filled = dict.fromkeys(params, 0)
    with torch.no_grad():
        for name, tensor in weights:
            where = target(name)
            if where is None:
                continue
            param_name, shard_id = where
            if param_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            owner, param = params[param_name]
            loader = getattr(owner, "weight_loader", None)
            try:
                if loader is not None:
                    filled[param_name] += loader(param, tensor, shard_id)
                else:
                    filled[param_name] += _default_loader(param, tensor)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {name!r}: {exc}") from None
        missing = [n for n, (owner, p) in params.items() if filled[n] != _logical_numel(owner, p)]
        if missing:
            raise ValueError(f"checkpoint lacks weights for {', '.join(missing[:5])}")
        for owner in owners.values():
            if isinstance(owner, LinearBase):
                owner.process_after_loading()


def _default_loader(param: nn.Parameter, loaded: Loaded) -> int:
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(as_float(loaded))
    return param.numel()


def _logical_numel(owner: nn.Module, param: nn.Parameter) -> int:
    if isinstance(owner, LinearBase):
        return owner.logical_numel(param)
    return param.numel()
