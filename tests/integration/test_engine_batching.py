"""Continuous batching: concurrency changes nothing about a request's greedy tokens, KV
blocks always return to the pool, and bad input is refused without disturbing the engine."""

from __future__ import annotations

import asyncio
import random
import shutil

import pytest
import pytest_asyncio

from engine.api import Engine
from engine.models.loader import ModelLoadError
from engine.sampling import InvalidRequestError, SamplingParams
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory):
    path = make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))
    # A small pool and budget so 64 requests contend: chunked prefills and preemptions happen.
    eng = await Engine.create(tiny_engine_config(path, gpu_blocks=96, max_num_seqs=24, max_num_batched_tokens=96))
    eng.test_model_path = path
    yield eng
    await eng.shutdown()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def pools_whole_after_each_test(engine):
    yield
    assert_pools_whole(await wait_all_blocks_free(engine))


def mixed_requests(n: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(64)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))], rng.randint(1, 24)) for _ in range(n)]


async def test_64_concurrent_requests_match_each_run_alone(engine):
    reqs = mixed_requests(64, engine.model_info["vocab_size"])
    together = await asyncio.gather(
        *(collect(engine, p, SamplingParams(max_tokens=m, temperature=0.0)) for p, m in reqs)
    )
    assert (await engine.stats())["num_preemptions"] > 0  # the pool was contended
    for (prompt, m), (ids, _, _) in zip(reqs, together):
        alone, _, _ = await collect(engine, prompt, SamplingParams(max_tokens=m, temperature=0.0))
        assert ids == alone
        assert 1 <= len(ids) <= m


async def test_aborted_request_returns_its_blocks(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    agen = engine.generate([5, 6, 7, 8] * 8, params, request_id="to-abort")
    first = await agen.__anext__()
    assert not first.finished
    await engine.abort("to-abort")
    rest = [out async for out in agen]
    assert rest and rest[-1].finish_reason == "abort"


async def test_client_that_stops_reading_frees_its_job(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    agen = engine.generate([9, 10, 11], params)
    await agen.__anext__()
    await agen.aclose()  # what an HTTP handler does when its client disconnects


async def test_same_seed_same_output_and_max_tokens_respected(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, b = await asyncio.gather(collect(engine, [4, 5, 6], params), collect(engine, [4, 5, 6], params))
    assert a[0] == b[0] and len(a[0]) <= 12


async def test_stop_token_ids_finish_with_stop(engine):
    ids, _, _ = await collect(engine, [4, 5, 6], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    stop_at = ids[2]
    got, _, reason = await collect(engine, [4, 5, 6], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,)))
    assert reason == "stop" and got == ids[: ids.index(stop_at) + 1]


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -0.5},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2},
])
async def test_bad_sampling_params_are_refused(engine, bad):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**bad)
    assert e.value.param in bad
    assert (await collect(engine, [3, 4], SamplingParams(max_tokens=2, temperature=0.0)))[2] is not None


async def test_bad_prompts_are_refused_and_engine_keeps_serving(engine):
    params = SamplingParams(max_tokens=2, temperature=0.0)
    for prompt in ["", [], [engine.model_info["vocab_size"] + 5], [1] * (engine.max_model_len + 1)]:
        with pytest.raises(InvalidRequestError):
            await collect(engine, prompt, params)
    ids, _, reason = await collect(engine, [3, 4, 5], params)
    assert len(ids) >= 1 and reason is not None


async def test_unknown_model_path_and_corrupt_gguf_are_clear_errors(engine, tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model"):
        await Engine.create(tiny_engine_config(str(tmp_path / "no-such-model")))
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00\x01garbage" * 100)
    with pytest.raises(ModelLoadError):
        await Engine.create(tiny_engine_config(str(corrupt)))
    truncated = tmp_path / "model-dir"
    shutil.copytree(engine.test_model_path, truncated)
    for f in truncated.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelLoadError):
        await Engine.create(tiny_engine_config(str(truncated)))
    ids, _, _ = await collect(engine, [3, 4, 5], SamplingParams(max_tokens=2, temperature=0.0))
    assert ids
