"""Structured output without a model: the worker's bitmask application against a reference
loop, xgrammar's bitmasks against its own matcher, the compiler (cache, refusals, the
bundled SmolLM2 vocabulary as xgrammar decodes it), and the scheduler actor driving
matchers through preemption, swapping and recompute with a fake worker."""

from __future__ import annotations

import asyncio
import re
import threading
import zlib

import numpy as np
import pytest
import torch
import xgrammar as xgr

from engine.actors.scheduler import SchedulerActor, TokenEvent
from engine.config import SchedulerConfig
from engine.memory.block_manager import BlockManager
from engine.policies.registry import create_scheduling_policy, create_swap_policy
from engine.request import Job
from engine.sampler import Sampler
from engine.sampling import InvalidRequestError, SamplingParams
from engine.scheduler import Scheduler
from engine.structured.bitmask import apply_token_bitmask, unpack_bitmask
from engine.structured.book import GrammarBook
from engine.structured.compiler import GrammarCompiler, choice_grammar

# A tiny raw vocabulary: token 0 ends a sequence; the rest spell letters, digits and dashes.
VOCAB = ["<eos>", "a", "b", "c", "ab", "ba", "abc", "-", "--", "a-"] + [str(d) for d in range(10)] \
    + ["12", "345", "x", "y", "xy", "{", "}", '"', ":", ",", " "]
V = len(VOCAB)
EOS = 0


def tiny_info() -> object:
    return xgr.TokenizerInfo(VOCAB, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[EOS])


def text_of(ids: list[int]) -> str:
    return "".join(VOCAB[t] for t in ids if t != EOS)


# -- the worker side: bitmask -> -inf --------------------------------------------------------
def reference_allowed(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    out = np.zeros((bitmask.shape[0], vocab), dtype=bool)
    for r in range(bitmask.shape[0]):
        for t in range(vocab):
            word = int(bitmask[r, t // 32]) & 0xFFFFFFFF
            out[r, t] = (word >> (t % 32)) & 1 == 1
    return out


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 257])
def test_unpack_bitmask_matches_a_bit_by_bit_reference(vocab):
    rng = np.random.default_rng(vocab)
    words = (vocab + 31) // 32
    bitmask = rng.integers(-(2**31), 2**31, size=(3, words), dtype=np.int64).astype(np.int32)
    got = unpack_bitmask(torch.from_numpy(bitmask), vocab).numpy()
    assert (got == reference_allowed(bitmask, vocab)).all()


def test_tokens_past_the_mask_are_refused():
    bitmask = np.full((1, 1), -1, dtype=np.int32)  # 32 tokens allowed; the logits have 40
    allowed = unpack_bitmask(torch.from_numpy(bitmask), 40)[0]
    assert allowed[:32].all() and not allowed[32:].any()


def test_apply_token_bitmask_masks_only_the_constrained_rows():
    logits = torch.randn(4, 70, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    bitmask = rng.integers(-(2**31), 2**31, size=(2, 3), dtype=np.int64).astype(np.int32)
    rows = torch.tensor([3, 1])
    out = apply_token_bitmask(logits, rows, torch.from_numpy(bitmask))
    allowed = reference_allowed(bitmask, 70)
    for i, r in enumerate([3, 1]):
        want = torch.where(torch.from_numpy(allowed[i]), logits[r], torch.tensor(float("-inf")))
        assert torch.equal(out[r], want)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isfinite(logits).all()  # the input is left alone


def test_a_row_with_no_finite_allowed_logit_falls_back_to_the_raw_logits():
    raw = torch.zeros(1, 40)
    processed = raw.clone()
    processed[0, 0] = float("-inf")  # e.g. min_tokens forbids EOS...
    bitmask = np.zeros((1, 2), dtype=np.int32)
    bitmask[0, 0] = 1  # ...and the grammar allows only EOS (token 0)
    out = apply_token_bitmask(processed, torch.tensor([0]), torch.from_numpy(bitmask), raw=raw)
    assert out[0, 0] == 0 and torch.isneginf(out[0, 1:]).all()  # the grammar wins


def test_sampler_picks_only_allowed_tokens_greedy_and_random_and_logprobs_stay_raw():
    vocab = 64
    allowed_ids = [5, 17, 40]
    bitmask = np.zeros((1, 2), dtype=np.int32)
    for t in allowed_ids:
        bitmask[0, t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(2**31))
    s = Sampler(seed=0)
    s.add("greedy", SamplingParams(temperature=0.0, logprobs=1).worker_view())
    s.add("free", SamplingParams(temperature=0.0).worker_view())
    for i in range(20):
        s.add(f"r{i}", SamplingParams(temperature=1.5, top_k=10, top_p=0.9).worker_view())
    ids = ["greedy", "free"] + [f"r{i}" for i in range(20)]
    logits = torch.randn(len(ids), vocab, generator=torch.Generator().manual_seed(3)) * 4
    rows = [0] + list(range(2, len(ids)))  # every row but "free" is constrained
    masks = torch.from_numpy(np.repeat(bitmask, len(rows), axis=0))
    result = s.sample(logits, ids, (rows, masks))
    tokens = result.token_ids
    assert tokens[0] == max(allowed_ids, key=lambda t: logits[0, t].item())
    assert tokens[1] == int(logits[1].argmax())
    assert all(t in allowed_ids for i, t in enumerate(tokens) if i != 1)
    assert len({tokens[i] for i in range(2, len(ids))}) > 1  # random rows did draw
    raw_lp = torch.log_softmax(logits[0], dim=-1)
    assert result.logprobs[0] == pytest.approx(raw_lp[tokens[0]].item(), abs=1e-5)
    assert result.top_logprobs[0][0][0] == int(logits[0].argmax())  # raw top-1, maybe refused


# -- xgrammar's bitmasks, as the engine fills them ---------------------------------------------
def test_book_bitmask_allows_exactly_the_tokens_the_matcher_accepts():
    compiled = xgr.GrammarCompiler(tiny_info()).compile_regex(r"(ab|ba)-[0-9]{2}")
    book = GrammarBook(V)
    book.add("j", compiled)
    probe = xgr.GrammarMatcher(compiled)
    for token in [4, 7, 11, 12]:  # "ab" "-" "1" "2"
        allowed = unpack_bitmask(torch.from_numpy(book.bitmask(["j"])), V)[0]
        accepts = []
        for t in range(V):
            trial = probe.fork()
            accepts.append(bool(trial.accept_token(t)))
        assert allowed.tolist() == accepts
        assert book.accept("j", token) == (True, False)
        assert probe.accept_token(token)
    assert unpack_bitmask(torch.from_numpy(book.bitmask(["j"])), V)[0].nonzero().flatten().tolist() \
        == [EOS]
    assert book.accept("j", EOS) == (True, True)


def test_book_refuses_a_token_outside_the_grammar_without_moving():
    book = GrammarBook(V)
    book.add("j", xgr.GrammarCompiler(tiny_info()).compile_regex("ab"))
    assert book.accept("j", 3) == (False, False)  # "c"
    assert book.accept("j", 4) == (True, False)  # "ab": the matcher did not move before
    book.remove("j")
    assert "j" not in book and len(book) == 0


# -- the scheduler actor drives the matchers -----------------------------------------------------
class FakeWorkers:
    """The worker group's stand-in: the real Sampler on logits that depend only on (job,
    position), so a job's tokens cannot depend on batching, preemption or swapping; only
    wrong grammar state could change them."""

    world_size = 1
    startup_timeout_s = 1.0

    def __init__(self, honour_masks: bool = True) -> None:
        self.sampler = Sampler(seed=0)
        self.died = asyncio.Event()
        self.honour_masks = honour_masks
        self.constrained_rows = 0

    async def submit(self, kind: str, **msg: object) -> asyncio.Future:
        assert kind == "step"
        for jid in msg["free"]:
            self.sampler.remove(jid)
        for new in msg["new"]:
            self.sampler.add(new["id"], new["params"])
        ids, positions = [], []
        for jid, start, n, _blocks, _reset, sample, *_ in msg["seqs"]:
            if sample:
                ids.append(jid)
                positions.append(start + n)
        tokens: list[int] = []
        if ids:
            logits = torch.stack([self._logits(j, p) for j, p in zip(ids, positions)])
            grammar = msg.get("grammar")
            bitmask = None
            if grammar and self.honour_masks:
                rows = [ids.index(j) for j in grammar["ids"]]
                bitmask = (rows, torch.from_numpy(grammar["bitmask"]))
                self.constrained_rows += len(rows)
            tokens = self.sampler.sample(logits, ids, bitmask).token_ids
        fut = asyncio.get_running_loop().create_future()
        fut.set_result({"ids": ids, "tokens": tokens, "elapsed": 0.001})
        return fut

    @staticmethod
    def _logits(jid: str, position: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(f"{jid}:{position}".encode()))
        return torch.randn(V, generator=g) * 3


class Harness:
    def __init__(self, scheduler: Scheduler, workers: FakeWorkers) -> None:
        self.finished: dict[str, str] = {}
        self.failed: dict[str, Exception] = {}
        self.done = asyncio.Event()
        self.expect = 0
        self.actor = SchedulerActor(scheduler, workers, emit=self._emit, fail=self._fail,  # type: ignore[arg-type]
                                    grammars=GrammarBook(V))

    def _emit(self, events: list[TokenEvent]) -> None:
        for ev in events:
            if ev.finish_reason is not None:
                self.finished.setdefault(ev.job_id, ev.finish_reason.value)
        self._check()

    def _fail(self, ids: list[str], error: Exception) -> None:
        for jid in ids:
            self.failed[jid] = error
        self._check()

    def _check(self) -> None:
        if len(self.finished) + len(self.failed) >= self.expect:
            self.done.set()

    async def run(self, jobs: list[Job]) -> None:
        self.expect = len(jobs)
        for job in jobs:  # all at once, before the first step: they compete for the pool
            self.actor.on_add(job)
        self.actor.start()
        try:
            await asyncio.wait_for(self.done.wait(), 60)
        finally:
            await self.actor.stop()


REGEX = r"(a|b|ab|ba){3,6}-[0-9]{3,5}"
COMPILED: dict[str, object] = {}


def compiled(regex: str = REGEX) -> object:
    if regex not in COMPILED:
        COMPILED[regex] = xgr.GrammarCompiler(tiny_info()).compile_regex(regex)
    return COMPILED[regex]


def regex_jobs(n: int, prompt_len: int = 10, **params: object) -> list[Job]:
    return [
        Job(job_id=f"j{i}", prompt_ids=[1 + (i + k) % 20 for k in range(prompt_len)],
            params=SamplingParams(max_tokens=40, temperature=0.0 if i % 2 else 0.8, seed=i,
                                  structured={"type": "regex", "pattern": REGEX}, **params),
            arrival_time=0.0, eos_token_ids=frozenset({EOS}), grammar=compiled())
        for i in range(n)
    ]


def scheduler(policy: str, swap: str, gpu_blocks: int, host_blocks: int, max_seqs: int) -> Scheduler:
    opts = {"base_quantum_s": 0.001, "quantum_ratio": 2.0} if policy == "mlfq" else {}
    return Scheduler(
        SchedulerConfig(policy=policy, swap_policy=swap, max_num_seqs=max_seqs,
                        max_num_batched_tokens=64, fixed_step_time_s=0.001),
        create_scheduling_policy(policy, opts), create_swap_policy(swap, {}),
        BlockManager(gpu_blocks, host_blocks, 4))


async def run_jobs(sched: Scheduler, jobs: list[Job], workers: FakeWorkers | None = None) -> Harness:
    h = Harness(sched, workers or FakeWorkers())
    await h.run(jobs)
    return h


async def test_constrained_jobs_follow_their_grammar_and_end_with_stop():
    jobs = regex_jobs(6)
    workers = FakeWorkers()
    h = await run_jobs(scheduler("fcfs", "reactive", 256, 256, 8), jobs, workers)
    assert h.failed == {}
    for job in jobs:
        assert re.fullmatch(REGEX, text_of(job.output_ids)), text_of(job.output_ids)
        assert job.output_ids[-1] == EOS and h.finished[job.job_id] == "stop"
    assert workers.constrained_rows == sum(len(j.output_ids) for j in jobs)
    assert len(h.actor.grammars) == 0  # every matcher freed


async def test_a_grammar_that_ends_finishes_its_job_even_when_eos_is_ignored():
    jobs = regex_jobs(2, ignore_eos=True)
    h = await run_jobs(scheduler("fcfs", "reactive", 256, 256, 8), jobs)
    for job in jobs:
        assert h.finished[job.job_id] == "stop" and job.output_ids[-1] == EOS
        assert re.fullmatch(REGEX, text_of(job.output_ids))


@pytest.mark.parametrize("swap", ["reactive", "recompute"])
async def test_preemption_swap_and_recompute_keep_the_grammar_state_exact(swap):
    """Tokens depend only on (job, position) and the grammar state, so a job preempted any
    number of times must produce exactly what it produces alone; a matcher advanced twice
    (recompute refeeding outputs) or not at all would change the masks and the tokens."""
    alone = regex_jobs(8)
    await run_jobs(scheduler("fcfs", "reactive", 256, 256, 8), alone)
    jobs = regex_jobs(8)
    # 8 jobs of up to ~24 tokens (6 blocks) on 12 blocks, two at a time, a 1-step quantum.
    h = await run_jobs(scheduler("mlfq", swap, 12, 64, 2), jobs)
    assert h.failed == {}
    for a, b in zip(alone, jobs):
        assert b.output_ids == a.output_ids
        assert re.fullmatch(REGEX, text_of(b.output_ids))
    stats = [j.stats for j in jobs]
    if swap == "reactive":
        assert sum(s.swap_outs for s in stats) > 0
    else:
        assert sum(s.recomputes for s in stats) > 0
    assert len(h.actor.grammars) == 0


async def test_a_token_the_grammar_refuses_fails_the_job_instead_of_corrupting_it():
    jobs = regex_jobs(1)
    h = await run_jobs(scheduler("fcfs", "reactive", 256, 256, 8), jobs,
                       FakeWorkers(honour_masks=False))
    if "j0" in h.failed:  # the unmasked draw left the grammar at some token
        assert "breaks its grammar" in str(h.failed["j0"])
    else:  # by chance every free draw fit the grammar
        assert re.fullmatch(REGEX, text_of(jobs[0].output_ids))
    assert len(h.actor.grammars) == 0


async def test_abort_frees_the_matcher():
    sched = scheduler("fcfs", "reactive", 256, 256, 8)
    h = Harness(sched, FakeWorkers())
    job = regex_jobs(1)[0]
    h.actor.on_add(job)
    assert job.job_id in h.actor.grammars
    h.actor.on_abort(job.job_id)
    assert job.job_id not in h.actor.grammars and h.finished == {"j0": "abort"}


# -- the compiler, on the bundled model's vocabulary ---------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    from engine.models.loader import default_model_path, load_model_info
    from engine.tokenizer import Tokenizer

    path = default_model_path()
    tok = Tokenizer.load(path)
    info = load_model_info(path)
    compiler = GrammarCompiler(tok, info.vocab_size, frozenset(info.eos_token_ids) | tok.eos_token_ids)
    yield tok, compiler
    compiler.close()


def test_smollm2_vocabulary_is_byte_level_and_decodes_like_the_engine(smollm):
    tok, compiler = smollm
    info = compiler.tokenizer_info()
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    assert info.vocab_size == compiler.vocab_size
    decoded = info.decoded_vocab
    special = set(tok.hf.all_special_ids)
    for t in range(len(tok.hf)):
        if t not in special:
            assert decoded[t] == tok.token_bytes(t), (t, tok.convert_ids_to_tokens([t]))
    # real token strings: a space-prefixed word and a newline are bytes, not 'Ġ' / 'Ċ'
    world = tok.encode(" world", add_special_tokens=False)
    assert [decoded[t] for t in world] == [b" world"]
    assert b"".join(decoded[t] for t in tok.encode("{\n", add_special_tokens=False)) == b"{\n"
    assert set(info.stop_token_ids) == set(compiler.stop_token_ids)


async def test_compiled_grammars_are_cached_by_spec_and_compiled_once_concurrently(smollm):
    _, compiler = smollm
    spec = {"type": "json_schema", "schema": {"type": "object", "properties": {
        "k": {"type": "string", "enum": ["v", "w"]}}, "required": ["k"]}, "strict": True}
    before = compiler.num_compiled
    a, b = await asyncio.gather(compiler.compile(spec), compiler.compile(dict(reversed(spec.items()))))
    assert a is b and compiler.num_compiled == before + 1
    assert await compiler.compile(spec) is a and compiler.num_compiled == before + 1
    matcher = xgr.GrammarMatcher(a)
    assert matcher.accept_string('{"k": "w"}') and matcher.is_completed()


@pytest.mark.parametrize("spec,what", [
    ({"type": "regex", "pattern": "(unclosed"}, "invalid regex"),
    ({"type": "grammar", "grammar": "root ::= missing_rule"}, "invalid grammar"),
    ({"type": "grammar", "grammar": 'start ::= "x"'}, "invalid grammar"),  # no root rule
    ({"type": "json_schema", "schema": {"type": "no-such-type"}, "strict": True},
     "invalid JSON schema"),
])
async def test_specs_that_do_not_compile_are_invalid_requests(smollm, spec, what):
    _, compiler = smollm
    with pytest.raises(InvalidRequestError) as e:
        await compiler.compile(spec)
    assert e.value.param == "structured" and what in str(e.value)


def test_choice_grammar_accepts_exactly_the_choices_even_with_quotes_and_escapes(smollm):
    _, compiler = smollm
    choices = ['say "hi"', "back\\slash", "two\nlines", "tab\there", "café ☕", "plain"]
    grammar = compiler.compile_sync({"type": "choice", "choices": choices})
    for c in choices:
        m = xgr.GrammarMatcher(grammar)
        assert m.accept_string(c) and m.is_completed(), c
    m = xgr.GrammarMatcher(grammar)
    assert not (m.accept_string("plai") and m.is_completed())
    assert choice_grammar(["a"]) == 'root ::= "a"'


def accepts(grammar: object, text: str) -> bool:
    m = xgr.GrammarMatcher(grammar)
    return bool(m.accept_string(text)) and m.is_completed()


def test_json_object_is_any_compact_object(smollm):
    _, compiler = smollm
    g = compiler.compile_sync({"type": "json_object"})
    assert accepts(g, '{"a": [1, {"b": null}], "c": "d"}')
    assert accepts(g, "{}")
    assert not accepts(g, "[1, 2]") and not accepts(g, '"text"')
    assert not accepts(g, '{\n"a": 1}')  # no whitespace outside strings (any_whitespace off)


def test_schemas_are_strict_unless_they_allow_more(smollm):
    _, compiler = smollm
    props = {"a": {"type": "integer"}}
    closed = compiler.compile_sync({"type": "json_schema", "strict": False,
                                    "schema": {"type": "object", "properties": props}})
    assert accepts(closed, '{"a": 1}') and not accepts(closed, '{"a": 1, "z": 2}')
    opened = compiler.compile_sync({"type": "json_schema", "strict": False, "schema": {
        "type": "object", "properties": props, "additionalProperties": True}})
    assert accepts(opened, '{"a": 1, "z": 2}')


async def test_compilation_runs_off_the_event_loop(smollm, monkeypatch):
    """A slow compilation (a large schema) must not stall the loop that serves everyone:
    the compiler here waits until the loop releases it, which a compilation on the loop
    itself would never allow."""
    tok, real = smollm
    compiler = GrammarCompiler(tok, real.vocab_size, real.stop_token_ids)
    compile_started = asyncio.Event()
    loop = asyncio.get_running_loop()
    release = threading.Event()

    def slow(spec: dict) -> object:
        loop.call_soon_threadsafe(compile_started.set)
        assert release.wait(10)
        return "compiled"

    monkeypatch.setattr(compiler, "compile_sync", slow)
    try:
        task = asyncio.ensure_future(compiler.compile({"type": "regex", "pattern": "x"}))
        await asyncio.wait_for(compile_started.wait(), 10)  # the loop runs meanwhile
        assert not task.done()
        release.set()
        assert await asyncio.wait_for(task, 10) == "compiled"
    finally:
        release.set()
        compiler.close()


def test_grammar_mask_composes_with_min_tokens_and_wins_when_only_the_end_is_left():
    vocab = 64
    s = Sampler(seed=0)
    s.add("j", SamplingParams(temperature=0.0, min_tokens=4, max_tokens=8).worker_view(
        eos_token_ids=[EOS]))
    logits = torch.zeros(1, vocab)
    logits[0, EOS], logits[0, 9], logits[0, 5] = 5.0, 3.0, 1.0

    def mask(*allowed: int) -> tuple[list[int], torch.Tensor]:
        words = np.zeros((1, 2), dtype=np.uint32)
        for t in allowed:
            words[0, t // 32] |= np.uint32(1 << (t % 32))
        return [0], torch.from_numpy(words.view(np.int32))

    # min_tokens keeps EOS out, the grammar keeps 9 out: 5 is what both allow
    assert s.sample(logits, ["j"], mask(EOS, 5)).token_ids == [5]
    # the grammar allows only the end: it wins over min_tokens instead of leaving nothing
    assert s.sample(logits, ["j"], mask(EOS)).token_ids == [EOS]


async def test_overlapped_steps_never_continue_a_batch_with_a_constrained_job():
    """A continuation feeds a token the engine has not seen yet, but a constrained job's
    next bitmask needs that token: while one is in the batch, the actor plans after each
    result; once only unconstrained jobs are left it overlaps, with the same tokens."""
    def mixed() -> list[Job]:
        free = [Job(job_id=f"u{i}", prompt_ids=[3 + i] * 6,
                    params=SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                    arrival_time=0.0, eos_token_ids=frozenset({EOS})) for i in range(3)]
        return regex_jobs(3) + free

    plain = mixed()
    await run_jobs(scheduler("fcfs", "reactive", 256, 256, 8), plain)
    jobs, workers = mixed(), FakeWorkers()
    h = Harness(scheduler("fcfs", "reactive", 256, 256, 8), workers)
    h.actor.overlap = True
    await h.run(jobs)
    assert h.failed == {}
    assert [j.output_ids for j in jobs] == [j.output_ids for j in plain]
    for job in jobs[:3]:
        assert re.fullmatch(REGEX, text_of(job.output_ids))
    assert workers.constrained_rows == sum(len(j.output_ids) for j in jobs[:3])
    assert h.actor.num_overlapped_steps > 0
