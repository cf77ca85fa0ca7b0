"""Pipeline stages: each stage holds a contiguous range of layers, and chaining the stages'
forwards (hidden states handed from one to the next) gives the whole model's logits."""

from __future__ import annotations

import pytest
import torch

from engine.memory.kv_cache import KVCachePool
from engine.models.base import AttentionMetadata, PipelineStage
from engine.models.loader import iter_weights, load_hf_config, load_model
from tests.tiny_models import make_tiny_model

VARIANTS = {
    "llama-gqa-3layers": ("llama", {"num_hidden_layers": 3}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "num_hidden_layers": 3}),
    "opt-proj": ("opt", {"word_embed_proj_dim": 32, "num_hidden_layers": 3}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model_dir(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make_tiny_model(arch, seed=3, **overrides).save_pretrained(path)
    return str(path)


def test_split_gives_contiguous_ranges_covering_every_layer():
    stages = [PipelineStage.split(7, 3, i) for i in range(3)]
    assert [(s.start_layer, s.end_layer) for s in stages] == [(0, 3), (3, 5), (5, 7)]
    assert [(s.is_first, s.is_last) for s in stages] == [(True, False), (False, False), (False, True)]
    with pytest.raises(ValueError):
        PipelineStage.split(2, 3, 0)


def _run(model, pool: KVCachePool, tokens: list[int], hidden=None) -> torch.Tensor:
    n = len(tokens)
    attn = AttentionMetadata(
        query_lens=[n], context_lens=[n], block_tables=torch.arange(4).view(1, 4),
        slot_mapping=torch.arange(n), block_size=4,
    )
    with torch.inference_mode():
        return model(torch.tensor(tokens), torch.arange(n), pool.caches, attn, hidden)


def _pool(model) -> KVCachePool:
    return KVCachePool(model.stage.num_layers, 4, 4, model.num_kv_heads, model.head_dim, torch.float32, "cpu")


@pytest.mark.parametrize("num_stages", [2, 3])
def test_chained_stages_give_the_whole_models_logits(model_dir, num_stages):
    config = load_hf_config(model_dir)
    tokens = [5, 17, 300, 42, 9, 11, 3]
    whole, _ = load_model(model_dir, torch.float32, "cpu")
    want = whole.compute_logits(_run(whole, _pool(whole), tokens))
    hidden = None
    for i in range(num_stages):
        stage = PipelineStage.split(config["num_hidden_layers"], num_stages, i)
        stage_model, _ = load_model(model_dir, torch.float32, "cpu", stage=stage)
        hidden = _run(stage_model, _pool(stage_model), tokens, hidden)
    got = stage_model.compute_logits(hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_stage_holds_and_reads_only_its_own_tensors(model_dir):
    config = load_hf_config(model_dir)
    stage = PipelineStage.split(config["num_hidden_layers"], 2, 1)
    model, _ = load_model(model_dir, torch.float32, "cpu", stage=stage)
    read = [name for name, _ in iter_weights(model_dir, config, keep=model.owns)]
    for names in (read, [n for n, _ in model.named_parameters()]):
        layers = {int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n}
        assert layers == set(range(stage.start_layer, stage.end_layer))
        assert not any("embed_positions" in n or "project_in" in n for n in names)
    everything = [name for name, _ in iter_weights(model_dir, config)]
    assert len(read) < len(everything)
