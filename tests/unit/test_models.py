"""Our model implementations against transformers' forward and generate, same weights."""

from __future__ import annotations

import pytest
import torch

from engine.models.loader import load_model
from tests.tiny_models import EOS_ID, PagedDriver, make_tiny_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-llama3rope-bias-tied": (
        "llama",
        {"rope_parameters": LLAMA3_ROPE, "attention_bias": True, "tie_word_embeddings": True},
    ),
    "llama-linear-rope-mha": (
        "llama",
        {
            "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
            "num_key_value_heads": 4,
        },
    ),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "opt": ("opt", {}),
    "opt-proj-postnorm": ("opt", {"word_embed_proj_dim": 32, "do_layer_norm_before": False}),
}
TOL = {"atol": 2e-4, "rtol": 1e-4}


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    """(transformers reference, ours loaded from its saved directory)."""
    arch, overrides = VARIANTS[request.param]
    reference = make_tiny_model(arch, seed=len(request.param), **overrides)
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    ours, _ = load_model(str(path), torch.float32, "cpu")
    return reference, ours


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits[0].float()


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def test_flat_prefill_of_several_sequences_matches_transformers(models):
    reference, ours = models
    seqs = prompts(5, 11, 1, 8)  # a one-token prompt takes the decode path with no history
    driver = PagedDriver(ours)
    logits = driver.step(list(enumerate(seqs)))
    for tokens, got in zip(seqs, logits):
        torch.testing.assert_close(got, reference_logits(reference, tokens), **TOL)


def test_decode_steps_through_shuffled_blocks_match_transformers(models):
    reference, ours = models
    seqs = prompts(6, 3, 9, seed=1)
    driver = PagedDriver(ours, block_size=4)
    logits = driver.step(list(enumerate(seqs)))
    for _ in range(7):  # crosses block boundaries for every sequence
        for tokens, got in zip(seqs, logits):
            tokens.append(int(got[-1].argmax()))
        logits = driver.step([(i, tokens[-1:]) for i, tokens in enumerate(seqs)])
        for tokens, got in zip(seqs, logits):
            torch.testing.assert_close(got[-1], reference_logits(reference, tokens)[-1], **TOL)
    assert any(t != sorted(t) for t in driver.tables.values())  # tables really are shuffled


def test_mixed_batch_of_decode_prefill_and_chunked_prefill_matches_transformers(models):
    reference, ours = models
    a, b, c, d = prompts(7, 9, 13, 4, seed=2)
    driver = PagedDriver(ours, block_size=4)
    driver.step([(0, a), (2, c[:6]), (3, d)])  # c's prompt arrives in two chunks
    logits = driver.step([(0, [17]), (1, b), (2, c[6:]), (3, [42])])
    expected = [(a + [17], 1), (b, len(b)), (c, len(c) - 6), (d + [42], 1)]
    for got, (tokens, new) in zip(logits, expected):
        torch.testing.assert_close(got, reference_logits(reference, tokens)[-new:], **TOL)


def test_greedy_decoding_equals_transformers_generate(models):
    reference, ours = models
    seqs = prompts(5, 12, seed=3)
    ours_out = PagedDriver(ours, num_blocks=32).greedy(seqs, max_new_tokens=16)
    for tokens, got in zip(seqs, ours_out):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([tokens]), do_sample=False, max_new_tokens=16, pad_token_id=0
            )
        want = out[0, len(tokens) :].tolist()
        # transformers stops at EOS; everything it produced must agree token for token.
        assert got[: len(want)] == want
        assert len(want) == 16 or want[-1] == EOS_ID


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close_to_fp32(tmp_path, dtype):
    reference = make_tiny_model("llama")
    reference.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path), dtype, "cpu")
    assert next(ours.parameters()).dtype == dtype
    tokens = prompts(10, seed=4)[0]
    got = PagedDriver(ours).step([(0, tokens)])[0]
    assert got.dtype == torch.float32  # compute_logits always returns fp32
    want = reference_logits(reference, tokens)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_lone_decode_over_consecutive_blocks_matches_transformers(models):
    """A lone decode sequence with in-order blocks reads its K/V as a view of the pool."""
    reference, ours = models
    tokens = prompts(6, seed=5)[0]
    driver = PagedDriver(ours, block_size=4, shuffle=False)
    logits = driver.step([(0, tokens)])
    for _ in range(6):  # crosses block boundaries
        tokens.append(int(logits[0][-1].argmax()))
        logits = driver.step([(0, tokens[-1:])])
        torch.testing.assert_close(logits[0][-1], reference_logits(reference, tokens)[-1], **TOL)
    assert driver.tables[0] == sorted(driver.tables[0])


def test_bf16_decode_steps_stay_close_to_fp32(tmp_path):
    reference = make_tiny_model("llama")
    reference.save_pretrained(tmp_path)
    ours, _ = load_model(str(tmp_path), torch.bfloat16, "cpu")
    a, b = prompts(9, 5, seed=6)
    driver = PagedDriver(ours, block_size=4)
    driver.step([(0, a), (1, b)])
    for step in range(5):  # K/V written in bf16 and read back through the cache
        a, b = a + [7 + step], b + [11 + step]
        got = driver.step([(0, a[-1:]), (1, b[-1:])])
        for tokens, logits in zip((a, b), got):
            want = reference_logits(reference, tokens)[-1]
            assert (logits[-1] - want).abs().max() < 0.05 * want.abs().max()


def test_bundled_model_in_bf16_still_answers_paris():
    """bf16 is what ``--dtype auto`` picks on a CPU with native bf16: the real model, greedy."""
    from engine.models.loader import default_model_path
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(default_model_path())
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    model, _ = load_model(None, torch.bfloat16, "cpu")
    out = PagedDriver(model, num_blocks=16, block_size=16).greedy([prompt], max_new_tokens=8)[0]
    assert "Paris" in tokenizer.decode(out)
