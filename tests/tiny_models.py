"""Tiny random Hugging Face models (and a matching tokenizer) for tests, built offline.

``make_tiny_model_dir(arch, path)`` writes a directory that both ``transformers``
(``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(path)``) and the engine's loader
read: config.json, generation_config.json, model.safetensors and tokenizer files. Everything
is seeded, so the same call gives the same bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ("llama", "qwen2", "mistral", "opt")
VOCAB_SIZE = 512
# Same ids as SmolLM2: 0 pads / ends text, 1 and 2 delimit chat turns; 2 is the EOS.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "What is the capital of France? The capital of France is Paris, a city of light.",
    "Serving large language models quickly means scheduling jobs and caching keys.",
    "Once upon a time there was a small model that learned to count: one two three.",
    "Hello, world! How are you today? I am fine, thank you, and you?",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in text too.",
    "def main():\n    print('hello')\n    return 0\n",
]


def make_tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens: any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    # The corpus may run out of merges first; pad so ids cover the model's whole vocab.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<extra_{i}>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[BOS_ID],
        eos_token=SPECIAL_TOKENS[EOS_ID],
        pad_token=SPECIAL_TOKENS[PAD_ID],
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str, vocab_size: int = VOCAB_SIZE, **overrides: object) -> PretrainedConfig:
    """2 layers, hidden 64; the Llama family uses GQA (4 query heads, 2 KV heads)."""
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    if arch == "opt":
        return OPTConfig(**{**common, "ffn_dim": 128, "word_embed_proj_dim": 64, **overrides})
    llama_like = {
        **common,
        "intermediate_size": 128,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    }
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return config_cls(**{**llama_like, **overrides})


def make_tiny_model(arch: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A randomly initialised transformers model (fp32, eval mode)."""
    config = tiny_config(arch, **overrides)
    model_cls = {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "mistral": MistralForCausalLM,
        "opt": OPTForCausalLM,
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(config)
    # The default init (std 0.02) gives near-uniform logits, where greedy decoding is decided
    # by rounding noise; larger weights give the peaked distributions a trained model has.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return model.eval()


def make_tiny_model_dir(
    arch: str, path: str | os.PathLike, seed: int = 0, **overrides: object
) -> str:
    """Save a tiny model and its tokenizer under ``path`` (created if needed); returns it."""
    path = os.fspath(path)
    model = make_tiny_model(arch, seed=seed, **overrides)
    model.save_pretrained(path)
    make_tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


# HF -> llama.cpp tensor names, as convert_hf_to_gguf writes them.
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (interleaves the RoPE halves of each head)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama3_rope_factors(config: PretrainedConfig) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf writes for Llama 3 rope scaling."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (
                rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]
            ) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_tiny_gguf(
    model: PreTrainedModel,
    path: str | os.PathLike,
    encode: Callable[[str, np.ndarray], tuple[np.ndarray, Any] | None] | None = None,
) -> str:
    """Write a Llama or Qwen2 transformers model as an fp32 GGUF file, the way llama.cpp's
    converter does (q/k rows permuted for llama, Llama 3 rope scaling as ``rope_freqs``).
    Only the token list of the tokenizer is stored.

    ``encode(gguf_name, fp32 array)`` may return ``(raw uint8 blocks, GGML type)`` to store
    a tensor quantized instead (``None``: keep it fp32)."""
    import gguf

    config = model.config
    arch = config.model_type
    assert arch in ("llama", "qwen2"), arch
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            w = _gguf_permute(w, heads)
        elif arch == "llama" and ".k_proj." in name:
            w = _gguf_permute(w, kv_heads)
        if name in _GGUF_NAMES:
            gguf_name = _GGUF_NAMES[name]
        else:
            _, _, layer, *part, suffix = name.split(".")
            gguf_name = f"blk.{layer}.{_GGUF_LAYER_PARTS['.'.join(part)]}.{suffix}"
        encoded = encode(gguf_name, w) if encode is not None else None
        if encoded is None:
            writer.add_tensor(gguf_name, w)
        else:
            writer.add_tensor(gguf_name, encoded[0], raw_dtype=encoded[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


class PagedDriver:
    """Feeds a model through a paged KV cache the way the worker does, for tests.

    Stands in for the block manager: each sequence gets blocks from a shuffled free list, so
    block tables are non-contiguous and out of order (``shuffle=False``: in order).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int = 64,
        block_size: int = 4,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        from engine.memory.kv_cache import KVCachePool

        self.model = model
        dtype = next(model.parameters()).dtype
        self.pool = KVCachePool(
            model.num_layers,
            num_blocks,
            block_size,
            model.num_kv_heads,
            model.head_dim,
            dtype,
            "cpu",
        )
        generator = torch.Generator().manual_seed(seed)
        # Popped from the end: unshuffled, a lone sequence gets ascending, consecutive blocks
        # (as from the block manager's free stack).
        self.free = (
            torch.randperm(num_blocks, generator=generator).tolist()
            if shuffle
            else list(range(num_blocks - 1, -1, -1))
        )
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run one step over ``(seq_id, new_token_ids)`` chunks; logits per chunk."""
        from engine.models.base import AttentionMetadata

        bs = self.pool.block_size
        ids, positions, slots, query_lens, context_lens = [], [], [], [], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * bs < end:
                table.append(self.free.pop())
            ids += tokens
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_lens.append(len(tokens))
            context_lens.append(end)
            self.lengths[seq] = end
        width = max(len(self.tables[seq]) for seq, _ in chunks)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _ in chunks]
        attn = AttentionMetadata(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=torch.tensor(tables, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_size=bs,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.pool.caches, attn)
            logits = self.model.compute_logits(hidden)
        return list(logits.split(query_lens))

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Batched greedy decoding: one prefill step for all prompts, then decode steps."""
        first = len(self.tables)
        seqs = list(range(first, first + len(prompts)))
        logits = self.step(list(zip(seqs, prompts)))
        outputs = [[int(chunk[-1].argmax())] for chunk in logits]
        for _ in range(max_new_tokens - 1):
            logits = self.step([(seq, out[-1:]) for seq, out in zip(seqs, outputs)])
            for out, chunk in zip(outputs, logits):
                out.append(int(chunk[-1].argmax()))
        return outputs
