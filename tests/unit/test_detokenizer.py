"""IncrementalDetokenizer: streamed deltas, multi-byte characters, stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tiny_models import make_tiny_tokenizer
from tests.unit.test_tokenizer import make_llama_style_tokenizer, smollm2_gguf_path

MULTIBYTE = "Hi 😀 世界! naïve 👩‍💻 ok 🎉🎉 日本語のテキスト"


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    """Byte-level BPE trained on ASCII: any non-ASCII character is split into byte tokens."""
    path = tmp_path_factory.mktemp("bytelevel")
    make_tiny_tokenizer().save_pretrained(path)
    return Tokenizer.load(str(path))


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory) -> Tokenizer:
    """SentencePiece-like: leading space stripped on decode, byte fallback."""
    path = tmp_path_factory.mktemp("llama")
    make_llama_style_tokenizer().save_pretrained(path)
    return Tokenizer.load(str(path))


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.load(smollm2_gguf_path())  # the default cache makes reruns fast


def stream(tok: Tokenizer, prompt: Sequence[int], out: Sequence[int], *, per_step: int = 1,
           stop: Sequence[str] = (), skip_special_tokens: bool = True,
           ) -> tuple[list[str], str, bool, IncrementalDetokenizer]:
    """Feed ``out`` ``per_step`` ids at a time, then flush unless stopped."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens, stop)
    deltas: list[str] = []
    stopped = False
    for i in range(0, len(out), per_step):
        delta, stopped = d.step(out[i : i + per_step])
        deltas.append(delta)
        if stopped:
            break
    final = "" if stopped else d.flush()
    return deltas, final, stopped, d


def split_mid_character(text: str) -> bool:
    return "\ufffd" in text


# -- deltas add up to the decoded output ---------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_deltas_concatenate_to_decode_for_random_sequences(byte_level, skip):
    rng = random.Random(1234)
    for _ in range(200):
        prompt = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randrange(0, 8))]
        out = [rng.randrange(byte_level.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas, final, _, d = stream(byte_level, prompt, out, per_step=rng.choice([1, 1, 2, 3]),
                                     skip_special_tokens=skip)
        expected = byte_level.decode(out, skip_special_tokens=skip)
        # A prompt ending mid-character is not primed with, so its output bytes decode alone.
        assert "".join(deltas) + final == expected
        assert d.text == expected


def test_multibyte_characters_are_never_split_across_deltas(byte_level):
    out = byte_level.encode(MULTIBYTE, add_special_tokens=False)
    assert len(out) > len(MULTIBYTE)  # the characters really span several tokens
    deltas, final, _, _ = stream(byte_level, byte_level.encode("Say: "), out)
    assert not any(split_mid_character(x) for x in deltas)
    assert "".join(deltas) + final == MULTIBYTE


def test_held_character_is_released_as_soon_as_it_completes(byte_level):
    emoji = byte_level.encode("😀", add_special_tokens=False)
    d = IncrementalDetokenizer(byte_level, [1])
    assert [d.step([t]) for t in emoji[:-1]] == [("", False)] * (len(emoji) - 1)
    assert d.step(emoji[-1:]) == ("😀", False)


def test_output_ending_mid_character_flushes_a_replacement_char(byte_level):
    emoji = byte_level.encode("a😀", add_special_tokens=False)
    deltas, final, _, _ = stream(byte_level, [1], emoji[:-1])
    assert "".join(deltas) == "a" and final.startswith("\ufffd")
    assert "".join(deltas) + final == byte_level.decode(emoji[:-1])


def test_prompt_ending_mid_character_loses_no_output_text(byte_level):
    ids = byte_level.encode("😀ok", add_special_tokens=False)
    prompt, out = ids[:2], ids[2:]
    deltas, final, _, _ = stream(byte_level, prompt, out)
    assert "".join(deltas) + final == byte_level.decode(out)
    assert "".join(deltas).endswith("ok")


def test_sentencepiece_first_token_keeps_its_leading_space(llama_style):
    prompt = llama_style.encode("Hello")
    out = llama_style.encode("Hello world the", add_special_tokens=False)[1:]
    assert llama_style.decode(out) == "world the"  # decoded alone, the space is stripped
    deltas, final, _, _ = stream(llama_style, prompt, out)
    assert deltas == [" world", " the"] and final == ""


def test_byte_fallback_characters_are_held_until_complete(llama_style):
    out = llama_style.encode("Hello 😀 世界!", add_special_tokens=False)
    deltas, final, _, _ = stream(llama_style, [1], out)
    assert not any(split_mid_character(x) for x in deltas)
    assert "".join(deltas) + final == "Hello 😀 世界!"


def test_skipped_special_tokens_emit_nothing(byte_level):
    out = byte_level.encode("hi", add_special_tokens=False) + [2]  # EOS
    deltas, final, _, _ = stream(byte_level, [1], out)
    assert "".join(deltas) + final == "hi"
    deltas, final, _, _ = stream(byte_level, [1], out, skip_special_tokens=False)
    assert "".join(deltas) + final == "hi<|im_end|>"


def test_each_step_decodes_a_short_window(byte_level):
    """O(new tokens) per step: decode never sees the whole output."""
    seen: list[int] = []
    decode = byte_level.decode

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            seen.append(len(ids))
            return decode(ids, skip_special_tokens)

    out = byte_level.encode("the quick brown fox " * 40, add_special_tokens=False)
    d = IncrementalDetokenizer(Spy(), [1, 2, 3], True)  # type: ignore[arg-type]
    text = "".join(d.step([t])[0] for t in out) + d.flush()
    assert text == "the quick brown fox " * 40
    assert len(out) > 100 and max(seen) <= 8


# -- stop strings -------------------------------------------------------------------------------
def test_stop_string_spanning_tokens_truncates_before_it(llama_style):
    out = llama_style.encode("Hello world the stop here", add_special_tokens=False)
    deltas, final, stopped, d = stream(llama_style, [1], out, stop=["lo wo"])
    assert stopped and final == ""
    assert "".join(deltas) == "Hel" == d.text


def test_first_occurrence_of_any_stop_string_wins(llama_style):
    out = llama_style.encode("Hello world the stop here", add_special_tokens=False)
    _, _, stopped, d = stream(llama_style, [1], out, stop=["here", "the", "world the"])
    assert stopped and d.text == "Hello "
    # Several tokens in one step: still the first occurrence.
    _, _, stopped, d = stream(llama_style, [1], out, per_step=len(out), stop=["here", "the"])
    assert stopped and d.text == "Hello world "


def test_possible_stop_prefix_is_held_back_then_released(llama_style):
    stop = ["the stop!"]
    d = IncrementalDetokenizer(llama_style, [1], True, stop)
    ids = llama_style.encode("Hello the stop here", add_special_tokens=False)
    assert d.step(ids[:1]) == ("Hello", False)
    assert d.step(ids[1:2]) == (" ", False)  # "the" may start "the stop!"
    assert d.step(ids[2:3]) == ("", False)  # "the stop" still may
    assert d.step(ids[3:]) == ("the stop here", False)  # " here" settles it: no stop
    assert d.flush() == "" and d.text == "Hello the stop here"


def test_flush_releases_a_held_stop_prefix(llama_style):
    ids = llama_style.encode("Hello the stop", add_special_tokens=False)
    deltas, final, stopped, _d = stream(llama_style, [1], ids, stop=["stop here"])
    assert not stopped and "".join(deltas) == "Hello the " and final == "stop"


def test_after_a_stop_nothing_more_is_emitted(llama_style):
    d = IncrementalDetokenizer(llama_style, [1], True, ["world"])
    ids = llama_style.encode("Hello world the", add_special_tokens=False)
    assert d.step(ids[:2]) == ("Hello ", True)
    assert d.step(ids[2:]) == ("", True)
    assert d.flush() == "" and d.text == "Hello " and d.stopped


def test_stop_string_at_the_very_start_gives_empty_text(llama_style):
    ids = llama_style.encode("Hello world", add_special_tokens=False)
    assert stream(llama_style, [1], ids, stop=["Hello"])[3].text == ""


def test_stop_string_in_special_token_text_only_when_not_skipped(byte_level):
    out = byte_level.encode("hi", add_special_tokens=False) + [2] + byte_level.encode("x")
    assert not stream(byte_level, [1], out, stop=["<|im_end|>"])[2]
    _, _, stopped, d = stream(byte_level, [1], out, stop=["<|im_end|>"], skip_special_tokens=False)
    assert stopped and d.text == "hi"


# -- the bundled SmolLM2 tokenizer --------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_random_sequences_concatenate_to_decode(smollm2):
    rng = random.Random(99)
    for _ in range(300):
        prompt = [rng.randrange(smollm2.vocab_size) for _ in range(rng.randrange(1, 6))]
        out = [rng.randrange(smollm2.vocab_size) for _ in range(rng.randrange(1, 60))]
        deltas, final, _, _ = stream(smollm2, prompt, out, per_step=rng.choice([1, 2, 5]))
        assert "".join(deltas) + final == smollm2.decode(out)


@pytest.mark.slow
def test_smollm2_multibyte_text_streams_without_broken_characters(smollm2):
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "emoji please"}])
    out = smollm2.encode(MULTIBYTE, add_special_tokens=False) + [2]
    assert split_mid_character("".join(smollm2.token_to_text(t) for t in out))
    deltas, final, _, _ = stream(smollm2, prompt, out)
    assert not any(split_mid_character(x) for x in deltas)
    assert "".join(deltas) + final == MULTIBYTE


@pytest.mark.slow
@pytest.mark.parametrize("stop, expected", [
    (["wn fo"], "The quick bro"),
    (["世界"], "The quick brown fox 😀 "),
    (["😀", "quick"], "The "),
    (["\n"], "The quick brown fox 😀 世界"),
])
def test_smollm2_stop_strings(smollm2, stop, expected):
    out = smollm2.encode("The quick brown fox 😀 世界\nmore", add_special_tokens=False)
    deltas, _, stopped, d = stream(smollm2, [1], out, stop=stop)
    assert stopped and "".join(deltas) == expected == d.text
