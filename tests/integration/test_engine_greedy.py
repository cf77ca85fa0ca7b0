"""Greedy output of the real engine equals transformers' own greedy generate, token for token."""

from __future__ import annotations

import asyncio
import random

import pytest
import pytest_asyncio
import torch

from engine.api import Engine
from engine.sampling import SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = pytest.mark.asyncio(loop_scope="module")

ARCHS = ["llama", "qwen2", "opt"]
NEW_TOKENS = 16


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare n tokens; the engine ignores EOS below
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ARCHS)
async def arch_engine(request, tmp_path_factory):
    path = make_tiny_model_dir(request.param, str(tmp_path_factory.mktemp(request.param)))
    engine = await Engine.create(tiny_engine_config(path))
    yield request.param, path, engine
    assert_pools_whole(await wait_all_blocks_free(engine))
    await engine.shutdown()


async def test_greedy_equals_transformers_generate(arch_engine):
    arch, path, engine = arch_engine
    rng = random.Random(arch)
    vocab = engine.model_info["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 17, 33)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    # All prompts at once: prefills of different lengths share a batch, then decode together.
    got = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    loop = asyncio.get_running_loop()
    for prompt, (ids, _, reason) in zip(prompts, got):
        want = await loop.run_in_executor(None, hf_greedy, path, prompt, NEW_TOKENS)
        assert ids == want, f"{arch}: prompt of {len(prompt)} tokens diverged"
        assert reason == "length"
