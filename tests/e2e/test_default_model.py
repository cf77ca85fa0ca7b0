"""The bundled SmolLM2-135M-Instruct, end to end."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import pytest_asyncio
import torch

from engine.api import Engine
from engine.bench.hf_reference import transformers_model_from_gguf
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.models.loader import default_model_path
from engine.sampling import SamplingParams
from tests.integration.engine_utils import assert_pools_whole, collect, wait_all_blocks_free

pytestmark = pytest.mark.slow
in_module_loop = pytest.mark.asyncio(loop_scope="module")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity in one sentence.",
]
NEW_TOKENS = 32


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    # fp32 weights and compute: compared token for token with transformers' fp32 (``auto``
    # may pick bf16 here, and packed int4 weights for the GGUF). The default path is checked
    # by the CLI test below and tests/unit/test_quant.py. Default policies, no start-up
    # profiling (its cost is not what this tests).
    eng = await Engine.create(EngineConfig(model=ModelConfig(dtype="float32", quantization="none"),
                                           cache=CacheConfig(kv_cache_memory=64 * 1024**2),
                                           scheduler=SchedulerConfig(measure_profile=False)))
    yield eng
    assert_pools_whole(await wait_all_blocks_free(eng))
    await eng.shutdown()


def transformers_greedy(prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' own GGUF parsing (config and dequantized, un-permuted tensors) and
    generate on the same file: an independent reference for our loader and forward pass."""
    model = transformers_model_from_gguf(default_model_path())
    model.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


@in_module_loop
async def test_greedy_chat_equals_transformers_first_32_tokens(engine):
    chats = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    ours = await asyncio.gather(*(collect(engine, ids, params) for ids in chats))
    want = await asyncio.get_running_loop().run_in_executor(None, transformers_greedy, chats, NEW_TOKENS)
    for prompt, (ids, _, _), ref in zip(PROMPTS, ours, want):
        assert ids == ref, prompt


@in_module_loop
async def test_chat_answer_mentions_paris(engine):
    _, text, reason = await collect(engine, None, SamplingParams(max_tokens=32, temperature=0.0),
                                    messages=[{"role": "user", "content": PROMPTS[0]}])
    assert "Paris" in text and reason in ("stop", "length")


def test_cli_generate_chat_answers_paris():
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "generate", "--chat", "--prompt", PROMPTS[0], "--max-tokens", "32"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout


def test_cli_help_on_every_command():
    for args in (["--help"], ["generate", "--help"]):
        out = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 0 and "usage" in out.stdout
