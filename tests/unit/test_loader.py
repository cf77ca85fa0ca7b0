"""Model loading: HF directories, GGUF files (tiny ones and the bundled SmolLM2), errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine.models.loader import (
    ModelLoadError,
    default_model_path,
    iter_weights,
    load_hf_config,
    load_model,
    load_model_info,
)
from tests.tiny_models import (
    PagedDriver,
    make_tiny_model,
    make_tiny_model_dir,
    write_tiny_gguf,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TOKENS = [5, 9, 200, 31, 8, 77, 13, 4, 300, 21, 1, 99]


# --------------------------------------------------------------------------- errors


def test_unknown_path_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_info(str(tmp_path / "nope"))


def test_directory_without_config_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_unsupported_architecture_raises(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model_info(str(tmp_path))


def test_garbage_gguf_raises(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(path), torch.float32, "cpu")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])  # inside the header, the data, the end
def test_truncated_gguf_raises(tmp_path, keep):
    full = write_tiny_gguf(make_tiny_model("llama"), tmp_path / "full.gguf")
    data = Path(full).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_model(str(cut), torch.float32, "cpu")


def test_truncated_safetensors_raises(tmp_path):
    make_tiny_model_dir("qwen2", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_checkpoint_missing_a_weight_raises(tmp_path):
    from safetensors.torch import save_file

    make_tiny_model_dir("llama", tmp_path)
    state = dict(iter_weights(str(tmp_path)))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="layers.1.self_attn.qkv_proj.weight"):
        load_model(str(tmp_path), torch.float32, "cpu")


# --------------------------------------------------------------------------- metadata


def test_model_info_of_hf_directory_reads_config_and_generation_config(tmp_path):
    make_tiny_model_dir("llama", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    info = load_model_info(str(tmp_path))
    assert (info.architecture, info.format, info.path) == ("llama", "hf", str(tmp_path))
    assert (info.num_layers, info.num_attention_heads, info.num_kv_heads) == (2, 4, 2)
    assert (info.head_dim, info.hidden_size, info.vocab_size) == (16, 64, 512)
    assert info.max_model_len == 256
    assert info.eos_token_ids == (2, 0) and info.bos_token_id == 1


def test_opt_model_info_counts_every_head_as_a_kv_head(tmp_path):
    info = load_model_info(make_tiny_model_dir("opt", tmp_path))
    assert (info.architecture, info.num_kv_heads, info.head_dim) == ("opt", 4, 16)


def test_default_model_is_the_bundled_smollm2_gguf():
    path = default_model_path()
    assert path.endswith(".gguf") and os.path.isfile(path)
    info = load_model_info(None)
    assert (info.architecture, info.format, info.path) == ("llama", "gguf", path)
    assert (info.num_layers, info.num_attention_heads, info.num_kv_heads) == (30, 9, 3)
    assert (info.head_dim, info.hidden_size, info.vocab_size) == (64, 576, 49152)
    assert info.max_model_len == 8192
    assert info.eos_token_ids == (2,) and info.bos_token_id == 1


# --------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {"rope_parameters": LLAMA3_ROPE}),  # permuted q/k, rope_freqs tensor
        ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
        ("qwen2", {}),  # unpermuted, with q/k/v biases
    ],
)
def test_gguf_written_like_llama_cpp_loads_to_the_same_logits(tmp_path, arch, overrides):
    reference = make_tiny_model(arch, **overrides)
    path = write_tiny_gguf(reference, tmp_path / "tiny.gguf")
    model, info = load_model(path, torch.float32, "cpu")
    assert info.format == "gguf" and info.vocab_size == 512
    got = PagedDriver(model).step([(0, TOKENS)])[0]
    with torch.no_grad():
        want = reference(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    """(our model, transformers LlamaForCausalLM with the same dequantized weights, path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = default_model_path()
    ours, _ = load_model(path, torch.float32, "cpu")
    config = {k: v for k, v in load_hf_config(path).items() if k != "model_type"}
    reference = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = reference.load_state_dict(dict(iter_weights(path)), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    reference.tie_weights()
    return ours, reference.eval(), path


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_the_same_weights(smollm2):
    ours, reference, _ = smollm2
    got = PagedDriver(ours, block_size=16).step([(0, TOKENS)])[0]
    with torch.no_grad():
        want = reference(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_greedy_decoding_equals_transformers_generate(smollm2):
    ours, reference, _ = smollm2
    # The chat template around "What is the capital of France?"; the answer names Paris.
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018]
    prompt += [411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649]
    prompt += [47, 2, 198, 1, 520, 9531, 198]
    got = PagedDriver(ours, block_size=16).greedy([prompt], max_new_tokens=8)[0]
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)
    want = out[0, len(prompt) :].tolist()
    assert got[: len(want)] == want


@pytest.mark.slow
def test_smollm2_qk_unpermutation_agrees_with_transformers_gguf_loader(smollm2):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, reference, path = smollm2
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=reference)["tensors"]
    ours = dict(iter_weights(path))
    assert set(theirs) == set(ours)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
    ):
        assert not torch.equal(ours[name], torch.from_numpy(_raw(path, name)))  # really permuted
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def _raw(path: str, hf_name: str):
    """The stored (permuted) rows of a layer tensor, dequantized."""
    from engine.models.gguf_file import GGUFFile

    layer, kind = hf_name.split(".")[2], hf_name.split(".")[4][0]
    gguf = GGUFFile(path)
    return gguf.read(gguf.tensors[f"blk.{layer}.attn_{kind}.weight"])
