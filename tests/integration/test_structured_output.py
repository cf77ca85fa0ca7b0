"""Structured output end to end: the unmodified ``openai`` client (and the ZeroMQ SDK)
against the real server and engine with the bundled SmolLM2-135M-Instruct GGUF.

Every constrained answer must parse and validate against what was asked (JSON schemas
with nested objects, arrays and enums, JSON mode, a regex, a choice, a grammar), under
greedy and sampled decoding, streamed or not; and a job preempted and swapped out
mid-generation must still validate. Schemas bound their strings and numbers (maxLength,
enums, ranges) so the answers finish in few tokens. Refusals (a schema, regex or grammar
that does not compile, two constraints at once) are 400s naming the field, and queue
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator

import jsonschema_rs
import openai
import pytest
import pytest_asyncio
from pydantic import BaseModel, Field

from engine.api import Engine
from engine.client import AsyncClient
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, ServerConfig
from engine.sampling import SamplingParams
from engine.server import build_app, start_http
from engine.server.zmq_frontend import ZmqFrontend
from tests.tiny_models import make_tiny_model_dir

from .engine_utils import assert_pools_whole, collect, tiny_engine_config, wait_all_blocks_free

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the pipeline test's ranks talk over loopback

MODEL = "smollm2"
MAX_TOKENS = 96  # every schema below finishes well within it

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CITY = {  # nested object, enum, boolean
    "type": "object",
    "properties": {
        "city": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 12},
                "country": {"enum": ["France", "Germany", "Italy", "Spain"]},
            },
            "required": ["name", "country"],
            "additionalProperties": False,
        },
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "is_capital"],
    "additionalProperties": False,
}
COLORS = {  # array of enums with bounds, and an integer range
    "type": "object",
    "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]},
                   "minItems": 1, "maxItems": 3},
        "count": {"type": "integer", "minimum": 1, "maximum": 3},
    },
    "required": ["colors", "count"],
    "additionalProperties": False,
}
SCHEMAS = {
    "person": (PERSON, "Describe a person called Ann who is 31 years old, as JSON."),
    "city": (CITY, "Describe Paris as JSON: its name, its country, and whether it is a capital."),
    "colors": (COLORS, "List up to three colours of a rainbow as JSON, with their count."),
}
DECODING = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "seed": 7}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def response_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def assert_valid(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema_rs.validate(schema, value)
    return value


@contextlib.asynccontextmanager
async def serving(engine: Engine) -> AsyncIterator[tuple[str, str]]:
    """HTTP and ZeroMQ frontends on 127.0.0.1 (free ports): (http base, zmq address)."""
    config = ServerConfig(host="127.0.0.1", port=0)
    runner, port = await start_http(build_app(engine, config, MODEL), "127.0.0.1", 0)
    front = ZmqFrontend(engine, "tcp://127.0.0.1:*", MODEL)
    await front.start()
    try:
        yield f"http://127.0.0.1:{port}", front.address
    finally:
        await front.stop()
        await runner.cleanup()


def smollm_config(**scheduler: object) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(kv_cache_memory=64 * 1024**2),
        scheduler=SchedulerConfig(measure_profile=False, **scheduler),  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    eng = await Engine.create(smollm_config())
    yield eng
    await eng.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine):
    async with serving(engine) as addresses:
        yield addresses


@pytest_asyncio.fixture(loop_scope="module")
async def oai(server):
    client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0,
                                timeout=120)
    yield client
    await client.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def pools_whole_after_each_test(request):
    yield
    if "engine" in request.fixturenames:
        engine = request.getfixturevalue("engine")
        assert_pools_whole(await wait_all_blocks_free(engine, timeout=20))


# -- JSON schemas --------------------------------------------------------------------------------
async def test_json_schema_answers_validate_under_greedy_and_sampled_decoding(oai):
    cases = [(name, mode) for name in SCHEMAS for mode in DECODING]

    async def ask(name: str, mode: str):
        schema, prompt = SCHEMAS[name]
        return await oai.chat.completions.create(
            model=MODEL, messages=user(prompt), max_tokens=MAX_TOKENS,
            response_format=response_format(name, schema), **DECODING[mode])

    answers = await asyncio.gather(*(ask(n, m) for n, m in cases))
    for (name, mode), r in zip(cases, answers):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (name, mode, choice.message.content)
        assert_valid(choice.message.content, SCHEMAS[name][0])


async def test_pydantic_model_through_the_clients_parse_helper(oai):
    class Pet(BaseModel):
        species: str = Field(max_length=10)
        legs: int = Field(ge=0, le=8)

    r = await oai.chat.completions.parse(
        model=MODEL, messages=user("Describe a cat as JSON."), response_format=Pet,
        max_tokens=MAX_TOKENS, temperature=0.0)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


async def test_streamed_json_schema_answer_validates(oai):
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user(SCHEMAS["city"][1]), max_tokens=MAX_TOKENS, temperature=0.0,
        response_format=response_format("city", CITY), stream=True)
    parts, reasons = [], []
    async for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop"
    assert_valid("".join(parts), CITY)


async def test_guided_json_on_completions_and_n_choices_all_validate(oai):
    r = await oai.completions.create(
        model=MODEL, prompt="A person as JSON:", max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
        n=3, extra_body={"guided_json": json.dumps(PERSON)})
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c.text
        assert_valid(c.text, PERSON)


async def test_json_object_mode_answers_an_object(oai):
    r = await oai.chat.completions.create(
        model=MODEL, messages=user('Reply with the JSON object {"ok": true} and nothing else.'),
        max_tokens=MAX_TOKENS, temperature=0.0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


# -- regex, choice, grammar ----------------------------------------------------------------------
async def test_guided_regex_choice_and_grammar(oai):
    regex = r"[0-9]{3}-[0-9]{4}"
    grammar = 'root ::= answer "."\nanswer ::= "yes" | "no"'
    choices = ["Paris", "London", "Berlin", "Madrid"]
    ask = user("What is the capital of France?")
    r_regex, r_choice, r_grammar, r_sampled = await asyncio.gather(
        oai.chat.completions.create(model=MODEL, messages=user("Give me a phone number."),
                                    max_tokens=20, temperature=0.0,
                                    extra_body={"guided_regex": regex}),
        oai.chat.completions.create(model=MODEL, messages=ask, max_tokens=20, temperature=0.0,
                                    extra_body={"guided_choice": choices}),
        oai.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=20,
                               temperature=0.0, extra_body={"guided_grammar": grammar}),
        oai.chat.completions.create(model=MODEL, messages=ask, max_tokens=20, temperature=1.0,
                                    seed=11, n=4, extra_body={"guided_choice": choices}),
    )
    assert re.fullmatch(regex, r_regex.choices[0].message.content)
    assert r_choice.choices[0].message.content in choices
    assert r_grammar.choices[0].text in ("yes.", "no.")
    for r in (r_regex, r_choice, r_grammar):
        assert r.choices[0].finish_reason == "stop"
    assert all(c.message.content in choices for c in r_sampled.choices)


async def test_zmq_sdk_takes_the_same_constraints(server):
    async with AsyncClient(server[1], timeout=120) as client:
        text, reason = "", None
        async for out in client.generate(messages=user(SCHEMAS["person"][1]), max_tokens=MAX_TOKENS,
                                         temperature=0.0, guided_json=PERSON):
            text += out.text
            reason = out.finish_reason or reason
        assert reason == "stop"
        assert_valid(text, PERSON)
        text = ""
        async for out in client.generate("Yes or no?", max_tokens=8, temperature=0.0,
                                         structured={"type": "choice", "choices": ["yes", "no"]}):
            text += out.text
        assert text in ("yes", "no")


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,param", [
    ({"response_format": response_format("bad", {"type": "no-such-type"})}, "response_format"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
     "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
async def test_bad_constraints_are_400_naming_the_field_and_queue_nothing(engine, oai, extra, param):
    steps = (await engine.stats())["num_steps"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            await oai.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4,
                                              stream=stream, extra_body=extra)
        assert e.value.status_code == 400
        assert e.value.body["param"] == param, e.value.body
    stats = await engine.stats()
    assert stats["jobs"] == [] and stats["num_steps"] == steps


# -- preemption ----------------------------------------------------------------------------------
STEP_S = 0.002


@pytest.mark.parametrize("swap", ["reactive", "recompute"])
async def test_jobs_preempted_and_swapped_mid_answer_still_validate(swap):
    """Six constrained answers on a KV pool that holds about two of them, two at a time, with
    a one-iteration quantum: jobs are demoted, preempted and swapped to host and back (or
    dropped and recomputed: prompt and answer so far fed again) while they answer; each
    answer still validates (the matcher stays with the job and moves once per token)."""
    config = smollm_config(policy="mlfq", swap_policy=swap, max_num_seqs=2,
                           policy_options=(("base_quantum_s", STEP_S), ("quantum_ratio", 2.0)),
                           fixed_step_time_s=STEP_S)
    config = config.replace(cache=CacheConfig(block_size=4, num_gpu_blocks_override=64,
                                              num_host_blocks_override=512))
    engine = await Engine.create(config)
    try:
        async with serving(engine) as (base, _):
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                        timeout=240)
            cases = [(name, mode) for name in SCHEMAS for mode in DECODING]
            try:
                answers = await asyncio.gather(*(
                    client.chat.completions.create(
                        model=MODEL, messages=user(SCHEMAS[name][1]), max_tokens=MAX_TOKENS,
                        response_format=response_format(name, SCHEMAS[name][0]),
                        **DECODING[mode])
                    for name, mode in cases))
            finally:
                await client.close()
        for (name, _), r in zip(cases, answers):
            assert r.choices[0].finish_reason == "stop"
            assert_valid(r.choices[0].message.content, SCHEMAS[name][0])
        stats = await wait_all_blocks_free(engine)
        assert_pools_whole(stats)
        assert stats["num_preemptions"] > 0
        if swap == "reactive":
            assert stats["memory"]["swap_out_blocks"] > 0
            assert stats["memory"]["swap_in_blocks"] == stats["memory"]["swap_out_blocks"]
        else:
            assert stats["memory"]["swap_out_blocks"] == 0
    finally:
        await engine.shutdown()


TINY_REGEX = r"[a-z]{3,6}-[0-9]{2,4}"


async def test_pipeline_stages_with_two_batches_in_flight_keep_every_grammar_exact(tmp_path):
    """Two pipeline stages (two batches in flight, so a plan is built while another batch
    computes) on a pool that forces swaps: every answer of a tiny random model still fits
    its regex, and greedy answers equal those of a single process with a roomy pool."""
    path = make_tiny_model_dir("llama", str(tmp_path / "llama"))
    prompts = [[(7 * i + 3 * n) % 497 + 3 for i in range(n)] for n in (6, 19, 20, 20, 12, 9)]
    params = [SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 1.0, seed=i,
                             structured={"type": "regex", "pattern": TINY_REGEX})
              for i in range(len(prompts))]

    async def answers(config: EngineConfig) -> tuple[list, dict]:
        engine = await Engine.create(config)
        try:
            got = await asyncio.wait_for(
                asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params))), 120)
            stats = await wait_all_blocks_free(engine)
            assert_pools_whole(stats)
            return got, stats
        finally:
            await engine.shutdown()

    alone, _ = await answers(tiny_engine_config(path))
    staged, stats = await answers(tiny_engine_config(path, gpu_blocks=16, host_blocks=256).replace(
        scheduler=SchedulerConfig(policy="mlfq", swap_policy="reactive", max_num_seqs=2,
                                  policy_options=(("base_quantum_s", STEP_S),
                                                  ("quantum_ratio", 2.0)),
                                  fixed_step_time_s=STEP_S),
        parallel=ParallelConfig(pipeline_parallel_size=2, torch_threads=1, step_timeout_s=60.0,
                                startup_timeout_s=120.0)))
    for i, ((ids, text, reason), (ref_ids, _, _)) in enumerate(zip(staged, alone)):
        assert reason == "stop" and re.fullmatch(TINY_REGEX, text), (i, text)
        if params[i].temperature == 0.0:
            assert ids == ref_ids
    assert stats["memory"]["swap_out_blocks"] > 0


async def test_a_constraint_the_free_answer_already_meets_changes_no_token(engine):
    """Greedy decoding under a constraint that the unconstrained greedy answer satisfies
    gives that answer token for token: the mask removes only refused tokens and never
    reorders the others, and it ends where the free answer ends."""
    ask = user("What is the capital of France?")
    free = await collect(engine, None, SamplingParams(max_tokens=40, temperature=0.0),
                         messages=ask)
    text = free[1]
    assert "Paris" in text
    # Letters become classes, so each constraint admits far more than this one answer.
    letters = "".join("[A-Za-z]" if c.isalpha() else "[0-9]" if c.isdigit() else re.escape(c)
                      for c in text)
    grammar = "root ::= " + " ".join('[A-Za-z]' if c.isalpha() else json.dumps(c) for c in text)
    for spec in ({"type": "regex", "pattern": letters},
                 {"type": "choice", "choices": ["Paris.", text, "The capital is Rome."]},
                 {"type": "grammar", "grammar": grammar}):
        got = await collect(engine, None, SamplingParams(max_tokens=40, temperature=0.0,
                                                         structured=spec), messages=ask)
        assert got == free, spec
