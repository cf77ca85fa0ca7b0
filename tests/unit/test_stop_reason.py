"""What ended a job (vLLM's ``stop_reason``) and ``min_tokens`` outside the sampler: the
detokenizer's stop strings and the job's stop-token check."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.request import FinishReason, Job, stop_token_reason
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from tests.tiny_models import make_tiny_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bytelevel")
    make_tiny_tokenizer().save_pretrained(path)
    return Tokenizer.load(str(path))


def run(tok: Tokenizer, text: str, stop: list[str], min_tokens: int = 0):
    """Feed ``text``'s tokens one by one; (emitted text, stopped, stop_reason, ids fed)."""
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [1], True, stop, min_tokens)
    out, fed = [], 0
    for t in ids:
        delta, stopped = d.step([t])
        out.append(delta)
        fed += 1
        if stopped:
            return "".join(out), True, d.stop_reason, fed
    return "".join(out) + d.flush(), False, d.stop_reason, fed


def test_stop_reason_is_the_stop_string_that_matched_first(tok):
    text, stopped, reason, _ = run(tok, "one two three four", ["four", "two", "o t"])
    assert stopped and text == "one " and reason == "two"  # the earliest occurrence
    text, stopped, reason, _ = run(tok, "one two three four", ["four", "three"])
    assert stopped and text == "one two " and reason == "three"


def test_stop_strings_are_not_honoured_before_min_tokens(tok):
    ids = tok.encode("ab ab ab ab", add_special_tokens=False)
    first = run(tok, "ab ab ab ab", ["ab"])
    assert first[1] and first[0] == "" and first[2] == "ab"
    # Not before min_tokens ids were generated: the early matches stay in the text...
    text, stopped, reason, fed = run(tok, "ab ab ab ab", ["ab"], min_tokens=len(ids) - 1)
    assert stopped and reason == "ab" and fed >= len(ids) - 1
    assert text.startswith("ab ab") and "ab" in text
    # ...and with min_tokens past the whole output nothing stops it.
    text, stopped, reason, _ = run(tok, "ab ab ab ab", ["ab"], min_tokens=len(ids) + 1)
    assert not stopped and reason is None and text == "ab ab ab ab"


def job(out: list[int], **kw) -> Job:
    j = Job("j", [5, 6], SamplingParams(**kw), 0.0, eos_token_ids=frozenset({EOS}))
    j.output_ids = out
    return j


def test_eos_and_stop_ids_do_not_finish_a_job_before_min_tokens():
    assert job([EOS], min_tokens=1).check_stop() is None
    assert job([3, EOS], min_tokens=1).check_stop() is FinishReason.STOP
    assert job([9], min_tokens=1, stop_token_ids=(9,)).check_stop() is None
    assert job([3, 9], min_tokens=1, stop_token_ids=(9,)).check_stop() is FinishReason.STOP
    assert job([EOS], min_tokens=0).check_stop() is FinishReason.STOP
    assert job([3, 3], min_tokens=2, max_tokens=2).check_stop() is FinishReason.LENGTH


def test_stop_token_reason_is_the_stop_id_and_none_for_eos():
    p = SamplingParams(stop_token_ids=(9, EOS))
    assert stop_token_reason(p, frozenset({EOS}), 9) == 9
    assert stop_token_reason(p, frozenset({EOS}), EOS) is None  # EOS takes precedence (vLLM)
    ignoring = SamplingParams(stop_token_ids=(EOS,), ignore_eos=True)
    assert stop_token_reason(ignoring, frozenset({EOS}), EOS) == EOS
    assert stop_token_reason(SamplingParams(), frozenset({EOS}), 4) is None
