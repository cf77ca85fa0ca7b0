"""A tensor-parallel rank reads only its own slice of each checkpoint tensor, and a pipeline
stage only its own layers: no rank ever reads (or materialises) the whole model.

The checkpoint readers are spied on: safetensors' ``safe_open`` (every element handed out,
through ``get_slice`` or ``get_tensor``) and the GGUF reader's ``read_part`` (every byte
copied out of the mapped file).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import safetensors
import torch

from engine.models.base import PipelineStage
from engine.models.gguf_file import GGUFFile
from engine.models.lazy_weights import GGUFSlice
from engine.models.linear import TPInfo
from engine.models.loader import _unpermute_qk, load_model
from tests.tiny_models import make_tiny_model, write_tiny_gguf
from tests.unit.test_linear import assert_llama_shards_rebuild
from tests.unit.test_quant import encode_synthetic


class _SpySlice:
    def __init__(self, inner, key: str, reads: Counter) -> None:
        self._inner, self._key, self._reads = inner, key, reads

    def get_shape(self):
        return self._inner.get_shape()

    def get_dtype(self):
        return self._inner.get_dtype()

    def __getitem__(self, index):
        out = self._inner[index]
        self._reads[self._key] += out.numel()
        return out


class _SpyFile:
    def __init__(self, inner, reads: Counter, whole: list[str]) -> None:
        self._inner, self._reads, self._whole = inner, reads, whole

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def keys(self):
        return self._inner.keys()

    def get_tensor(self, key: str):
        out = self._inner.get_tensor(key)
        self._whole.append(key)
        self._reads[key] += out.numel()
        return out

    def get_slice(self, key: str):
        return _SpySlice(self._inner.get_slice(key), key, self._reads)


@pytest.fixture
def spy_safetensors(monkeypatch):
    """Element counts read per tensor name, and the names read whole with get_tensor."""
    reads: Counter = Counter()
    whole: list[str] = []
    real = safetensors.safe_open

    def spy_open(path, framework, device="cpu"):
        return _SpyFile(real(path, framework=framework, device=device), reads, whole)

    monkeypatch.setattr(safetensors, "safe_open", spy_open)
    return reads, whole


def _held(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "size", "overrides"),
    [
        ("llama", 2, {}),  # GQA: KV heads split
        ("llama", 4, {}),  # 2 KV heads over 4 ranks: each rank reads its (shared) head
        ("llama", 2, {"num_key_value_heads": 1, "tie_word_embeddings": True}),
        ("opt", 2, {}),
    ],
)
def test_a_tensor_parallel_rank_reads_exactly_the_elements_it_holds(
    tmp_path, spy_safetensors, arch, size, overrides
):
    reads, whole = spy_safetensors
    reference = make_tiny_model(arch, **overrides)
    reference.save_pretrained(tmp_path)
    full = {k: v.numel() for k, v in reference.state_dict().items()}
    cfg = reference.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    per_rank = []
    for rank in range(size):
        reads.clear()
        model, _ = load_model(str(tmp_path), torch.float32, "cpu", TPInfo(rank, size))
        assert whole == []  # nothing read with get_tensor: every tensor through a slice
        assert sum(reads.values()) == _held(model)  # not one element more than it keeps
        per_rank.append(dict(reads))
    for name, numel in full.items():
        got = [r.get(name, 0) for r in per_rank]
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            assert got == [0] * size  # the head is the embedding's matrix: never read
            continue
        split = name.endswith(("proj.weight", "fc1.weight", "fc2.weight", "embed_tokens.weight",
                               "lm_head.weight"))
        kv = ".k_proj." in name or ".v_proj." in name
        if split and not (kv and kv_heads < size):
            assert got == [numel // size] * size, name  # one disjoint share each
        else:
            assert all(g <= numel for g in got), name


def test_a_pipeline_stage_rank_reads_only_its_layers_and_its_slice(tmp_path, spy_safetensors):
    reads, whole = spy_safetensors
    reference = make_tiny_model("llama", num_hidden_layers=4)
    reference.save_pretrained(tmp_path)
    stage = PipelineStage.split(4, 2, 1)
    model, _ = load_model(str(tmp_path), torch.float32, "cpu", TPInfo(1, 2), stage=stage)
    layers = {int(n.split(".")[2]) for n in reads if n.startswith("model.layers.")}
    assert layers == {2, 3}
    assert "model.embed_tokens.weight" not in reads  # untied head: only the last stage's own
    assert whole == [] and sum(reads.values()) == _held(model)


def test_shards_read_slice_by_slice_still_rebuild_the_checkpoint(tmp_path):
    """The lazy reads put the same numbers in the same places as whole-tensor reads did."""
    reference = make_tiny_model("llama", num_key_value_heads=1, vocab_size=511)
    reference.save_pretrained(tmp_path)
    shards = [load_model(str(tmp_path), torch.float32, "cpu", TPInfo(r, 2))[0] for r in range(2)]
    assert_llama_shards_rebuild(reference, shards)


# --------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """Every block format the loader decodes, two it dequantizes, and q/k rows permuted the
    way llama.cpp stores them (the same file as test_quant's)."""
    reference = make_tiny_model("llama", hidden_size=256, intermediate_size=512,
                                num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    return reference, write_tiny_gguf(reference, path, encode=encode_synthetic)


@pytest.fixture
def spy_gguf(monkeypatch):
    """Bytes copied out of the file, per GGUF tensor name."""
    reads: Counter = Counter()
    real = GGUFFile.read_part

    def spy(self, info, rows, byte_cols):
        out = real(self, info, rows, byte_cols)
        reads[info.name] += out.nbytes
        return out

    monkeypatch.setattr(GGUFFile, "read_part", spy)
    return reads


@pytest.mark.parametrize("quantization", ["none", "auto"])
def test_a_gguf_rank_reads_half_the_bytes_of_every_matrix(mixed_gguf, spy_gguf, quantization):
    _, path = mixed_gguf
    infos = GGUFFile(path).tensors
    per_rank = []
    for rank in range(2):
        spy_gguf.clear()
        load_model(path, torch.float32, "cpu", TPInfo(rank, 2), quantization=quantization)
        per_rank.append(dict(spy_gguf))
    for name, info in infos.items():
        if len(info.shape) != 2:
            continue
        # Every split here falls on block boundaries (256 columns per rank of K-quants).
        assert [r.get(name, 0) for r in per_rank] == [info.nbytes // 2] * 2, name


def _boxes(shape: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
    rows, cols = shape
    return [
        [],
        [(0, 0, rows // 2)],
        [(0, rows // 2, rows // 2)],
        [(1, cols // 2, cols // 2)],
        [(1, 32, 32)],  # inside a 256-wide K-quant block: whole rows are read, then cut
        [(0, rows // 4, rows // 4), (1, 0, cols // 2)],
    ]


def test_a_gguf_slice_reads_the_same_values_as_the_whole_tensor_narrowed(mixed_gguf):
    _, path = mixed_gguf
    gguf = GGUFFile(path)
    for info in gguf.tensors.values():
        if len(info.shape) != 2 or info.shape[0] % 4:
            continue
        heads = 4 if ".attn_q." in info.name else 2 if ".attn_k." in info.name else None
        lazy_whole = GGUFSlice(gguf, info, heads=heads)
        whole = gguf.read(info)  # the whole tensor, as the eager loader reads it
        whole = torch.from_numpy(whole if heads is None else _unpermute_qk(whole, heads))
        for box in _boxes(info.shape):
            want, lazy = whole, lazy_whole
            for dim, start, length in box:
                want, lazy = want.narrow(dim, start, length), lazy.narrow(dim, start, length)
            assert tuple(lazy.shape) == tuple(want.shape)
            torch.testing.assert_close(lazy.read(), want, rtol=0, atol=0, msg=f"{info.name} {box}")
            packed = GGUFSlice(gguf, info, packed=True, heads=heads)
            if info.qtype.name in ("Q4_0", "Q4_1", "Q8_0", "Q4_K"):
                for dim, start, length in box:
                    packed = packed.narrow(dim, start, length)
                got = packed.read().dequantize()
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
