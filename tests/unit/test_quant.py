"""Quantized weights: packed matmuls equal dequantize-then-matmul, GGUF blocks decode exactly,
and a model loaded with its GGUF precision kept agrees with the dequantized fp32 one.

Tolerances: a packed matmul is compared with ``F.linear`` on the very weights it stands for
(its codes dequantized with its own scales). The kernels take bf16 activations (see
``engine.models.quant``), so they agree within ``KERNEL_TOL`` = 1 % of the output's largest
magnitude (measured: ~0.4 %). Decoding a GGUF block is exact: equal to gguf-py's dequantize
within 1e-6 (fp32 rounding where a zero point is formed as a sum).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from engine.models.gguf_blocks import DECODERS, dequantize_decoded
from engine.models.gguf_file import GGUFFile
from engine.models.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, TPInfo
from engine.models.loader import default_model_path, load_model
from engine.models.quant import (
    Int4WeightOnlyMethod,
    Int8WeightOnlyMethod,
    QuantizedWeight,
    quantization_report,
    quantize_int4_groups,
    quantize_int8_per_channel,
)
from tests.tiny_models import PagedDriver, make_tiny_model, write_tiny_gguf
from tests.unit.test_linear import run_ranks

Q = GGMLQuantizationType
TOKENS = [5, 9, 200, 31, 8, 77, 13, 4, 300, 21, 1, 99]
KERNEL_TOL = 1e-2


def packed_layer(method, w: torch.Tensor, bias: torch.Tensor | None = None) -> ReplicatedLinear:
    layer = ReplicatedLinear(w.shape[1], w.shape[0], bias is not None, quant_method=method)
    layer.weight_loader(layer.weight, w)
    if bias is not None:
        layer.weight_loader(layer.bias, bias)
    layer.process_after_loading()
    return layer


def dequantized(layer: ReplicatedLinear) -> torch.Tensor:
    """The float weight a packed layer stands for, rebuilt from what it stores."""
    method = layer.quant_method
    if isinstance(method, Int8WeightOnlyMethod):
        return layer.weight.float() * layer.kernel_scale.float()[:, None]
    sz = layer.scales_and_zeros.float()  # [K / group, N, (scale, zero)]
    g = method.group_size
    scales = sz[..., 0].T.repeat_interleave(g, dim=1)
    zeros = sz[..., 1].T.repeat_interleave(g, dim=1)
    codes = unpack_int4(layer)
    return (codes.float() - 8) * scales + zeros


def unpack_int4(layer: ReplicatedLinear) -> torch.Tensor:
    """The codes back out of the packed weight: the kernel run on one-hot inputs with unit
    scales and zero points of 8 (so each output is exactly a code, small enough for bf16)."""
    k = layer.in_features
    unit = torch.zeros_like(layer.scales_and_zeros)
    unit[..., 0] = 1
    unit[..., 1] = 8
    eye = torch.eye(k, dtype=unit.dtype)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    return op(eye, layer.weight, layer.quant_method.group_size, unit).T.round().to(torch.uint8)


def close(got: torch.Tensor, want: torch.Tensor, tol: float = KERNEL_TOL) -> None:
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


# --------------------------------------------------------------------------- random tensors


def test_int8_packed_matmul_equals_dequantize_then_matmul():
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 160), torch.randn(96), torch.randn(7, 160)
    layer = packed_layer(Int8WeightOnlyMethod(), w, b)
    close(layer(x), F.linear(x, dequantized(layer), b))
    # Per-channel rounding: every weight within half a step of its row's scale.
    codes, scales = quantize_int8_per_channel(w)
    assert ((codes.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_packed_matmul_equals_dequantize_then_matmul(group):
    torch.manual_seed(group)
    w, x = torch.randn(48, 256), torch.randn(5, 256)
    layer = packed_layer(Int4WeightOnlyMethod(group), w)
    close(layer(x), F.linear(x, dequantized(layer)))
    codes, scales, zeros = quantize_int4_groups(w, group)
    assert torch.equal(unpack_int4(layer), codes)  # packing loses nothing
    # Min/max rounding: every weight within half a step of its group's scale.
    deq = QuantizedWeight(4, group, codes, scales, zeros).dequantize()
    step = scales.repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()


def test_int4_codes_given_exactly_are_kept_exactly():
    torch.manual_seed(3)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    scales, zeros = torch.rand(32, 2) + 0.1, torch.randn(32, 2)
    weight = QuantizedWeight(4, 32, codes, scales, zeros, source="Q4_1")
    layer = packed_layer(Int4WeightOnlyMethod(32), weight)
    assert torch.equal(unpack_int4(layer), codes)
    close(dequantized(layer), weight.dequantize())  # scales and zeros held in bf16
    assert layer.quant_method.notes.exact == {"Q4_1 -> int4 g32"}


def test_int4_layer_whose_shape_the_kernel_refuses_falls_back_to_int8(caplog):
    with caplog.at_level(logging.INFO, logger="fastserve.quant"):
        layer = ReplicatedLinear(64, 40, quant_method=Int4WeightOnlyMethod(32, "odd_proj"))
    assert isinstance(layer.quant_method, Int8WeightOnlyMethod)
    assert "odd_proj: int4 does not fit (out_features 40 is not a multiple of 16)" in caplog.text


@pytest.mark.parametrize("method", [Int8WeightOnlyMethod, lambda: Int4WeightOnlyMethod(32)])
def test_quantized_column_then_row_shards_sum_to_the_whole_quantized_layer(method):
    """A quantized linear shards too: rank outputs of column -> row add up."""
    torch.manual_seed(4)
    w1, w2, x = torch.randn(128, 64), torch.randn(64, 128), torch.randn(3, 64)
    total = 0
    for rank in range(2):
        tp = TPInfo(rank, 2)
        col = ColumnParallelLinear(64, 128, False, tp, method())
        row = RowParallelLinear(128, 64, False, tp, method(), reduce_results=False)
        for layer, w in ((col, w1), (row, w2)):
            layer.weight_loader(layer.weight, w)
            layer.process_after_loading()
        total = total + row(torch.relu(col(x)))
    want = F.linear(torch.relu(F.linear(x, w1)), w2)
    # Each shard was quantized on its own: close to the float layer, within quantization error.
    assert (total - want).abs().max() < 0.1 * want.abs().max()


# --------------------------------------------------------------------------- GGUF blocks


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid blocks of any type: random bytes, with sane fp16 scale fields."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    fp16_fields = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (size - 2,)}[qtype]
    for at in fp16_fields:
        d = rng.uniform(0.0005, 0.002, (len(blocks), 1)).astype(np.float16)
        blocks[:, at : at + 2] = d.view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K])
def test_gguf_blocks_decode_to_gguf_pys_own_dequantization(qtype):
    if qtype == Q.Q4_K:  # gguf-py cannot quantize K-quants: random blocks are valid ones
        raw = random_blocks(qtype, 16, 512, seed=1)
    else:
        w = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32)
        raw = quantize(w, qtype)
    decoded = DECODERS[qtype](raw)
    np.testing.assert_allclose(
        dequantize_decoded(decoded), dequantize(raw, qtype), rtol=0, atol=1e-6
    )


@pytest.fixture(scope="module")
def smollm2_file():
    return GGUFFile(default_model_path())


@pytest.mark.parametrize(
    "name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_gate.weight"]
)
def test_bundled_q4_1_tensors_as_int4_match_their_dequantized_matmul(smollm2_file, name):
    info = smollm2_file.tensors[name]
    assert info.qtype == Q.Q4_1
    from engine.models.loader import _gguf_quantized

    weight = _gguf_quantized(smollm2_file, info)
    want_w = torch.from_numpy(smollm2_file.read(info))
    torch.testing.assert_close(weight.dequantize(), want_w, rtol=0, atol=1e-6)
    layer = packed_layer(Int4WeightOnlyMethod(32), weight)
    assert torch.equal(unpack_int4(layer), weight.codes)
    assert layer.quant_method.notes.exact == {"Q4_1 -> int4 g32"}
    x = torch.randn(4, info.shape[1], generator=torch.Generator().manual_seed(0))
    close(layer(x), F.linear(x, want_w))


def test_bundled_q8_0_embedding_as_int8_per_channel_is_close(smollm2_file):
    info = smollm2_file.tensors["token_embd.weight"]
    assert info.qtype == Q.Q8_0
    w = torch.from_numpy(smollm2_file.read(info))[:4096]  # a slice keeps the test quick
    layer = packed_layer(Int8WeightOnlyMethod(), w)
    x = torch.randn(4, info.shape[1], generator=torch.Generator().manual_seed(0))
    close(layer(x), F.linear(x, dequantized(layer)))
    close(layer(x), F.linear(x, w), tol=2e-2)  # re-quantized per channel: still close


# --------------------------------------------------------------------------- whole models

# GGUF kind -> type stored in the synthetic file: every block format the loader knows, and
# two it must re-quantize.
SYNTHETIC_TYPES = {
    "attn_q": Q.Q4_1,
    "attn_k": Q.Q4_0,
    "attn_v": Q.Q4_K,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q4_K,
    "ffn_up": Q.Q5_K,
    "ffn_down": Q.Q6_K,
    "token_embd": Q.Q8_0,
}


def encode_synthetic(name: str, w: np.ndarray):
    kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    qtype = SYNTHETIC_TYPES.get(kind)
    if qtype is None or w.ndim != 2:
        return None
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_blocks(qtype, w.shape[0], w.shape[1], seed=len(name)), qtype
    return quantize(w, qtype), qtype


@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory):
    """A tiny Llama (K = 256, for the K-quants' 256-wide blocks) with mixed GGML types."""
    reference = make_tiny_model(
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    return write_tiny_gguf(reference, path, encode=encode_synthetic)


def test_mixed_gguf_keeps_each_tensors_precision_and_says_what_was_requantized(synthetic_gguf):
    fp32, _ = load_model(synthetic_gguf, torch.float32, "cpu", quantization="none")
    packed, _ = load_model(synthetic_gguf, torch.float32, "cpu", quantization="auto")
    layer = packed.model.layers[0]
    # Fused layers take the most precise format of their parts: q/k/v has Q4_K/Q4_0/Q4_1 ->
    # int4; gate (Q4_K) + up (Q5_K) -> int8.
    assert layer.self_attn.qkv_proj.quant_method.describe() == "int4 g32"
    assert layer.self_attn.o_proj.quant_method.describe() == "int8"
    assert layer.mlp.gate_up_proj.quant_method.describe() == "int8"
    assert layer.mlp.down_proj.quant_method.describe() == "int8"
    assert packed.lm_head.quant_method.describe() == "int8"
    report = quantization_report(packed)
    assert report["Q4_0 -> int4 g32 (exact)"] == 2
    assert report["Q4_1 -> int4 g32 (exact)"] == 2
    assert report["Q4_K -> int4 g32 (exact)"] == 2
    assert report["Q8_0 -> int8 per-channel (re-quantized)"] == 2  # o_proj
    assert report["Q4_K -> int8 per-channel (re-quantized)"] == 2  # gate, fused with up
    # Q5_K (up) and Q6_K (down) have no packed form: dequantized, then re-quantized; and the
    # head built from the (dequantized Q8_0) tied embedding.
    assert report["float -> int8 per-channel (re-quantized)"] == 5
    got = PagedDriver(packed).step([(0, TOKENS)])[0]
    want = PagedDriver(fp32).step([(0, TOKENS)])[0]
    # Exact formats differ only by the kernels' bf16 activations; Q5_K/Q6_K/Q8_0 also by
    # their per-channel re-quantization to int8.
    assert (got - want).norm() < 0.05 * want.norm()


def test_quantized_model_split_over_two_ranks_matches_one_rank(synthetic_gguf):
    single, _ = load_model(synthetic_gguf, torch.float32, "cpu", quantization="auto")
    want = PagedDriver(single).step([(0, TOKENS)])[0]

    def rank_fn(rank: int, tp: TPInfo):
        model, _ = load_model(synthetic_gguf, torch.float32, "cpu", tp, quantization="auto")
        return PagedDriver(model).step([(0, TOKENS)])[0]

    for got in run_ranks(2, rank_fn):
        # Row-parallel int8 layers quantize each half of their columns on its own.
        assert (got - want).norm() < 0.05 * want.norm()


def fake_quantized(reference, mode: str):
    """The transformers model with every weight our ``mode`` quantizes replaced by its
    quantize -> dequantize round trip (rows are quantized independently, so fusing q/k/v or
    gate/up does not change them)."""
    with torch.no_grad():
        for name, param in reference.named_parameters():
            int8 = name == "lm_head.weight" or (name.endswith("proj.weight") and mode == "int8")
            if int8:
                codes, scales = quantize_int8_per_channel(param)
                param.copy_(codes.float() * scales[:, None])
            elif name.endswith("proj.weight"):
                param.copy_(QuantizedWeight(4, 32, *quantize_int4_groups(param, 32)).dequantize())
    return reference


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_safetensors_checkpoint_quantized_at_load_equals_its_dequantized_weights(tmp_path, mode):
    reference = make_tiny_model("llama")
    reference.save_pretrained(tmp_path)
    packed, _ = load_model(str(tmp_path), torch.float32, "cpu", quantization=mode)
    assert packed.model.layers[0].mlp.down_proj.quant_method.describe().startswith(mode)
    assert packed.model.layers[0].mlp.down_proj.weight.dtype in (torch.int8, torch.uint8)
    got = PagedDriver(packed).step([(0, TOKENS)])[0]
    with torch.no_grad():
        want = fake_quantized(reference, mode)(torch.tensor([TOKENS])).logits[0]
    # What is left is the kernels' bf16 activations, through two layers.
    assert (got - want).norm() < 0.02 * want.norm()


# --------------------------------------------------------------------------- SmolLM2

# The chat template around "What is the capital of France?"
PARIS_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
PARIS_PROMPT += [7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282]
PARIS_PROMPT += [4649, 47, 2, 198, 1, 520, 9531, 198]
TEACHER_TEXT = (
    "The history of the city begins with a small settlement on an island in the river. Over "
    "the centuries it grew into a centre of trade, learning and government. Its bridges, "
    "markets and churches were rebuilt many times after floods, fires and wars. In the "
    "nineteenth century wide avenues replaced narrow streets, and railways connected the "
    "city to the rest of the country. Today millions of visitors come every year to see its "
    "museums, gardens and monuments, to eat in its restaurants and to walk along the river "
    "in the evening. Scientists have studied how the climate of the region changed, how the "
    "population grew, and how the economy moved from farming to industry and then to "
    "services. Schools teach children to read, write, count and think about the world, and "
    "universities train doctors, engineers, teachers and artists. Music and theatre fill the "
    "nights, while sport brings crowds to the stadiums on weekends. The weather is mild in "
    "spring and autumn, hot in summer and cold but rarely snowy in winter. Farmers outside "
    "the city grow wheat, grapes and vegetables, and their markets open before sunrise. "
    "Writers have described its light, its noise and its quiet courtyards in hundreds of "
    "novels, and painters have tried to catch the colour of its roofs at dusk. Engineers "
    "keep the water clean, the trains on time and the lights on, while nurses and doctors "
    "work through the night in its hospitals. Children play in the parks after school, "
    "old friends meet in cafes to talk about politics, and tourists get lost in the small "
    "streets behind the cathedral, looking for a view they saw once on a postcard."
)


@pytest.fixture(scope="module")
def smollm2_pair():
    fp32, _ = load_model(None, torch.float32, "cpu", quantization="none")
    packed, _ = load_model(None, torch.float32, "cpu", quantization="auto")
    return fp32, packed


@pytest.mark.slow
def test_smollm2_quantized_agrees_with_fp32_on_teacher_forced_predictions(smollm2_pair):
    from engine.tokenizer import Tokenizer

    fp32, packed = smollm2_pair
    ids = Tokenizer.load(default_model_path()).encode(TEACHER_TEXT)[:257]
    assert len(ids) == 257
    want = PagedDriver(fp32, num_blocks=32, block_size=16).step([(0, ids)])[0].argmax(-1)
    got = PagedDriver(packed, num_blocks=32, block_size=16).step([(0, ids)])[0].argmax(-1)
    agreement = (got[:256] == want[:256]).float().mean().item()
    assert agreement >= 0.95, agreement


@pytest.mark.slow
def test_smollm2_quantized_chat_answer_says_paris(smollm2_pair):
    from engine.tokenizer import Tokenizer

    _, packed = smollm2_pair
    assert packed.model.layers[0].mlp.down_proj.quant_method.describe() == "int4 g32"
    out = PagedDriver(packed, num_blocks=32, block_size=16).greedy([PARIS_PROMPT], 12)[0]
    assert "Paris" in Tokenizer.load(default_model_path()).decode(out)


@pytest.mark.slow
def test_smollm2_quantized_in_bf16_agrees_with_fp32_and_says_paris(smollm2_pair):
    """What a user gets on a CPU with native bf16 (``--dtype auto --quantization auto``): the
    kernels' own dtype end to end, no casts around them."""
    from engine.tokenizer import Tokenizer

    fp32, _ = smollm2_pair
    packed, _ = load_model(None, torch.bfloat16, "cpu", quantization="auto")
    tokenizer = Tokenizer.load(default_model_path())
    ids = tokenizer.encode(TEACHER_TEXT)[:257]
    want = PagedDriver(fp32, num_blocks=32, block_size=16).step([(0, ids)])[0].argmax(-1)
    got = PagedDriver(packed, num_blocks=32, block_size=16).step([(0, ids)])[0].argmax(-1)
    agreement = (got[:256] == want[:256]).float().mean().item()
    assert agreement >= 0.95, agreement
    out = PagedDriver(packed, num_blocks=32, block_size=16).greedy([PARIS_PROMPT], 12)[0]
    assert "Paris" in tokenizer.decode(out)


def test_packed_kernels_are_cpu_only_auto_dequantizes_elsewhere():
    from engine.models.loader import load_hf_config, plan_quantization

    path = default_model_path()
    config = load_hf_config(path)
    cuda = torch.device("cuda")
    assert not plan_quantization(path, config, "auto", cuda).quantizes
    assert plan_quantization(path, config, "auto").quantizes
    with pytest.raises(ValueError, match="CPU weight-only kernels"):
        plan_quantization(path, config, "int4", cuda)
