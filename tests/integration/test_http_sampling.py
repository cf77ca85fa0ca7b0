"""The sampling fields vLLM users send, through the unmodified ``openai`` package and the
ZeroMQ SDK, against the REAL engine (tiny random Llama): penalties, ``logit_bias`` and
``min_tokens`` give exactly the tokens of greedy decoding over transformers' logits with the
processors applied by an independent reference (``tests/logit_reference.py``); ``min_p``
keeps only what it should; ``echo`` (with ``logprobs``: the prompt scored, as transformers
scores it) and ``stop_reason`` come back as vLLM returns them;
neutral values change nothing; bad values are 400s naming the field."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest
import pytest_asyncio

from engine.client import AsyncClient, InvalidRequest
from engine.sampling import SamplingParams
from tests import logit_reference as reference
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, wait_all_blocks_free
from .test_http_real_engine import (
    MODEL,
    PROMPTS,
    ascii_stop_string,
    offline,
    serving,
    start_engine,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

N = 12  # tokens per request


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model_dir("llama", str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def hf(model_path):
    return reference.load_hf(model_path)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path):
    eng = await start_engine(model_path)
    yield eng
    await eng.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine):
    async with serving(engine) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def oai(server):
    client = openai.AsyncOpenAI(
        base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=30
    )
    yield client
    await client.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def pools_whole_after_each_test(engine):
    yield
    assert_pools_whole(await wait_all_blocks_free(engine, timeout=20))


def prompt_ids(seed: int, n: int = 10) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


async def hf_greedy(hf, prompt: list[int], **params) -> list[int]:
    p = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, **params)
    return await asyncio.to_thread(reference.greedy, hf, prompt, p)


def fields(ignore_eos: bool = True, **params) -> dict:
    """OpenAI's own fields as arguments, vLLM's through ``extra_body``."""
    own = {k: params.pop(k) for k in ("presence_penalty", "frequency_penalty", "logit_bias")
           if k in params}
    return {**own, "extra_body": {"ignore_eos": ignore_eos, **params}}


# -- penalties, logit_bias, min_tokens: exactly the reference ---------------------------------
CASES = [
    {"presence_penalty": 1.5, "frequency_penalty": 0.5},
    {"frequency_penalty": 2.0},
    {"repetition_penalty": 1.6},
    {"repetition_penalty": 0.8, "presence_penalty": -1.0},
    {"logit_bias": {"42": 4.0, "77": 6.5}, "frequency_penalty": 1.0},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "+".join(sorted(c)))
async def test_completions_with_processors_equal_the_reference(server, oai, hf, case):
    # A random model seldom repeats itself within N tokens: take the first prompt (of a
    # fixed list) whose greedy output the processors change, so the comparison means something.
    for seed in range(20):
        prompt = prompt_ids(seed)
        want = await hf_greedy(hf, prompt, **case)
        if want != await hf_greedy(hf, prompt):
            break
    else:
        pytest.fail(f"{case} changes no greedy output")
    r = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                     **fields(**case))
    assert r.choices[0].text == server.engine.tokenizer.decode(want)
    assert r.usage.completion_tokens == N
    # The same request offline: the token ids themselves.
    got = await offline(server.engine, prompt, max_tokens=N, temperature=0, ignore_eos=True,
                        **case)
    assert got.ids == want


async def test_chat_with_penalties_equals_the_engine_offline(server, oai):
    messages = [{"role": "user", "content": "Say something repetitive."}]
    case = {"frequency_penalty": -2.0, "repetition_penalty": 0.5}  # favour repeating
    want = await offline(server.engine, messages=messages, max_tokens=N, temperature=0,
                         ignore_eos=True, **case)
    plain = await offline(server.engine, messages=messages, max_tokens=N, temperature=0,
                          ignore_eos=True)
    assert want.ids != plain.ids
    r = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=N,
                                          temperature=0, **fields(**case))
    assert r.choices[0].message.content == want.text


async def test_a_bias_of_100_forces_its_token(server, oai):
    r = await oai.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0.8,
                                     seed=1, logit_bias={"65": 100},
                                     extra_body={"ignore_eos": True})
    assert r.choices[0].text == server.engine.tokenizer.decode([65] * 6)


async def test_min_tokens_holds_back_the_stop_id_then_lets_it_stop(server, oai, hf):
    prompt = prompt_ids(99)
    first = (await hf_greedy(hf, prompt))[0]
    want = await hf_greedy(hf, prompt, min_tokens=5, stop_token_ids=(first,))
    r = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                     **fields(min_tokens=5, stop_token_ids=[first]))
    assert first not in want[:5] and len(want) > 5
    assert r.usage.completion_tokens == len(want)
    choice = r.choices[0]
    if want[-1] == first:  # stopped on it once allowed
        assert (choice.finish_reason, choice.stop_reason) == ("stop", first)
        assert choice.text == server.engine.tokenizer.decode(want[:-1])
    else:
        assert (choice.finish_reason, choice.stop_reason) == ("length", None)
        assert choice.text == server.engine.tokenizer.decode(want)
    # Without min_tokens it stops at once.
    r = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                     **fields(stop_token_ids=[first]))
    assert r.usage.completion_tokens == 1 and r.choices[0].stop_reason == first


async def test_min_p_of_one_samples_the_greedy_text(server, oai):
    greedy = await oai.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N,
                                          temperature=0, extra_body={"ignore_eos": True})
    texts = set()
    for seed in range(3):
        sampled = await oai.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=N, temperature=1.5, seed=seed,
            extra_body={"ignore_eos": True, "min_p": 1.0})
        assert sampled.choices[0].text == greedy.choices[0].text
        free = await oai.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=N, temperature=1.5, seed=seed,
            extra_body={"ignore_eos": True})
        texts.add(free.choices[0].text)
    assert texts != {greedy.choices[0].text}  # without min_p these draws wander off


async def test_neutral_values_give_todays_greedy_output(server, oai):
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
               "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0}
    for prompt in PROMPTS:
        plain = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=N,
                                             temperature=0)
        same = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=N,
                                            temperature=0, **fields(False, **neutral))
        assert same.choices[0].text == plain.choices[0].text
        assert same.choices[0].finish_reason == plain.choices[0].finish_reason


# -- echo -------------------------------------------------------------------------------------
async def test_echo_puts_the_prompt_before_the_text(server, oai):
    prompt = PROMPTS[0]
    plain = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0, "echo": True}
    r = await oai.completions.create(**kw)
    assert r.choices[0].text == prompt + plain.choices[0].text
    chunks = [c async for c in await oai.completions.create(stream=True, **kw)]
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in chunks) == prompt + plain.choices[0].text
    ids = prompt_ids(3)
    r = await oai.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0,
                                     echo=True)
    assert r.choices[0].text.startswith(server.engine.tokenizer.decode(ids))
    # Two prompts: each choice echoes its own.
    r = await oai.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=2,
                                     temperature=0, echo=True)
    for c in r.choices:
        assert c.text.startswith(PROMPTS[c.index])


def reference_logprobs(hf, ids: list[int]):
    """Row p: log P(next token | ids[: p + 1]) by transformers, fp32."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


async def test_echo_with_logprobs_scores_the_prompt_then_the_output(server, oai, hf):
    tok = server.engine.tokenizer
    prompt = PROMPTS[1]
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    plain = await oai.completions.create(**kw)
    r = await oai.completions.create(echo=True, logprobs=3, **kw)
    c, usage = r.choices[0], r.usage
    assert c.text == prompt + plain.choices[0].text
    lp = c.logprobs
    num_prompt = usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) == num_prompt + usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # The prompt's tokens spell the echoed prompt, each at its text_offset.
    ids = tok.encode(prompt)
    assert len(ids) == num_prompt
    assert lp.tokens[:num_prompt] == [tok.token_to_text(t) for t in ids]
    for t, off in zip(lp.tokens[:num_prompt], lp.text_offset[:num_prompt]):
        assert c.text[off:].startswith(t)
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    # Every logprob, prompt and output, is transformers' over the same ids.
    out = await offline(server.engine, prompt, max_tokens=N, temperature=0, ignore_eos=True)
    full = ids + out.ids
    ref = reference_logprobs(hf, full)
    for p in range(1, len(full)):
        assert lp.token_logprobs[p] == pytest.approx(ref[p - 1, full[p]].item(), abs=1e-4)
        vals, top = ref[p - 1].topk(3)
        # Keyed by text, as the server keys them (tokens that show the same text collapse).
        want = {tok.token_to_text(t): v for t, v in zip(top.tolist(), vals.tolist())}
        assert lp.top_logprobs[p] == pytest.approx(want, abs=1e-4)
    # Streaming: the prompt's entries lead the first chunk; the chunks add up to the same.
    chunks = [ch async for ch in await oai.completions.create(echo=True, logprobs=3, stream=True,
                                                               **kw)]
    with_lp = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    assert len(with_lp[0].tokens) == num_prompt + 1
    assert chunks[0].choices[0].text.startswith(prompt)
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for part in with_lp for x in getattr(part, name)] == getattr(lp, name)
    # logprobs=0: each token's own logprob, no alternatives (as without echo).
    zero = (await oai.completions.create(echo=True, logprobs=0, **kw)).choices[0].logprobs
    assert zero.token_logprobs == lp.token_logprobs
    assert zero.top_logprobs[0] is None and all(t == {} for t in zero.top_logprobs[1:])


async def test_echo_with_logprobs_for_token_prompts_and_several_choices(server, oai, hf):
    prompts = [prompt_ids(21, 9), prompt_ids(22, 5)]
    r = await oai.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0,
                                     echo=True, logprobs=1, n=2, extra_body={"ignore_eos": True})
    assert len(r.choices) == 4
    for c in r.choices:
        ids = prompts[c.index // 2]
        ref = reference_logprobs(hf, ids)
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(
            [ref[p - 1, ids[p]].item() for p in range(1, len(ids))], abs=1e-4)


async def test_sdk_prompt_logprobs_equal_the_http_ones(server, oai):
    ids = prompt_ids(23, 11)
    http = await oai.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0,
                                        echo=True, logprobs=2)
    lp = http.choices[0].logprobs
    async with AsyncClient(server.zmq, timeout=10) as c:
        outs = [o async for o in c.generate(prompt_token_ids=ids, max_tokens=2, temperature=0,
                                            prompt_logprobs=2)]
        with pytest.raises(InvalidRequest) as e:
            async for _ in c.generate("x", prompt_logprobs=21):
                pass
        assert e.value.param == "prompt_logprobs"
    first = outs[0].prompt_logprobs
    assert outs[0].prompt_token_ids == ids and len(first) == len(ids)
    assert all(o.prompt_logprobs is None for o in outs[1:])
    assert first[0] is None and lp.token_logprobs[0] is None
    tok = server.engine.tokenizer
    for p in range(1, len(ids)):
        logprob, top = first[p]
        assert len(top) == 2
        assert logprob == pytest.approx(lp.token_logprobs[p], abs=1e-5)
        assert {tok.token_to_text(t): v for t, v in top} == \
            pytest.approx(lp.top_logprobs[p], abs=1e-5)


# -- stop_reason ------------------------------------------------------------------------------
async def test_stop_reason_is_the_stop_string_or_token_id_or_null(server, oai):
    prompt = PROMPTS[2]
    full = await offline(server.engine, prompt, max_tokens=16, temperature=0, ignore_eos=True)
    stop = ascii_stop_string(full.text)
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    r = await oai.completions.create(stop=["never-appears-zz", stop], **kw,
                                     extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.choices[0].stop_reason) == ("stop", stop)
    chunks = [c async for c in await oai.completions.create(
        stop=[stop], stream=True, **kw, extra_body={"ignore_eos": True})]
    assert chunks[-1].choices[0].stop_reason == stop
    assert all(c.choices[0].stop_reason is None for c in chunks[:-1])
    # A stop token id: the first output token not seen before it.
    k = next(i for i in range(1, len(full.ids)) if full.ids[i] not in full.ids[:i])
    r = await oai.completions.create(**kw, extra_body={"ignore_eos": True,
                                                       "stop_token_ids": [full.ids[k]]})
    assert (r.choices[0].finish_reason, r.choices[0].stop_reason) == ("stop", full.ids[k])
    assert r.usage.completion_tokens == k + 1
    # Length: null.
    r = await oai.completions.create(**kw, extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.choices[0].stop_reason) == ("length", None)


async def test_chat_stop_reason_streaming_and_not(server, oai):
    messages = [{"role": "user", "content": "Count to ten."}]
    full = await offline(server.engine, messages=messages, max_tokens=16, temperature=0,
                         ignore_eos=True)
    stop = ascii_stop_string(full.text)
    kw = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0, "stop": stop,
          "extra_body": {"ignore_eos": True}}
    r = await oai.chat.completions.create(**kw)
    assert (r.choices[0].finish_reason, r.choices[0].stop_reason) == ("stop", stop)
    chunks = [c async for c in await oai.chat.completions.create(stream=True, **kw)]
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)


# -- the ZeroMQ SDK ---------------------------------------------------------------------------
async def test_sdk_takes_the_same_fields_and_reports_stop_reason(server, hf):
    prompt = prompt_ids(5)
    case = {"frequency_penalty": 1.0, "repetition_penalty": 1.4, "logit_bias": {42: 3.0}}
    want = await hf_greedy(hf, prompt, **case)
    async with AsyncClient(server.zmq, timeout=10) as c:
        outs = [o async for o in c.generate(prompt_token_ids=prompt, max_tokens=N,
                                            temperature=0, ignore_eos=True, **case)]
        assert [t for o in outs for t in o.token_ids] == want
        assert outs[-1].finish_reason == "length" and outs[-1].stop_reason is None
        stopped = [o async for o in c.generate(prompt_token_ids=prompt, max_tokens=N,
                                               temperature=0, ignore_eos=True,
                                               stop_token_ids=[want[0]], **case)]
        assert stopped[-1].finish_reason == "stop" and stopped[-1].stop_reason == want[0]
        for bad, param in [({"logit_bias": {"100000": 1}}, "logit_bias"),
                           ({"presence_penalty": 3}, "presence_penalty"),
                           ({"min_p": -1}, "min_p"),
                           ({"min_tokens": 5, "max_tokens": 2}, "min_tokens")]:
            with pytest.raises(InvalidRequest) as e:
                async for _ in c.generate("x", **bad):
                    pass
            assert e.value.param == param


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"logit_bias": {"512": 1}}, "logit_bias"),  # past the tiny model's vocabulary
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 2}, "min_p"),
    ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
    ({"echo": "yes"}, "echo"),
])
async def test_bad_sampling_fields_are_400s_naming_the_field(server, oai, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.completions.create(model=MODEL, prompt="x", extra_body=body)
    assert e.value.param == param
    with pytest.raises(openai.BadRequestError) as e:
        await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}],
            extra_body={k: v for k, v in body.items() if k != "echo"} or {"echo": True})
    assert e.value.param == param
