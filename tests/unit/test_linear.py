"""The shared linear layers: each rank keeps exactly its slice, and the slices add up.

No processes: a tensor-parallel group is simulated either by computing every rank's part in
turn and summing (the all-reduce done by hand) or by running the ranks as threads that meet
in a barrier-based fake collective.
"""

from __future__ import annotations

import threading
from functools import partial

import pytest
import torch

from engine.models.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TPInfo,
)
from engine.models.loader import load_model
from engine.models.vocab import VocabParallelEmbedding
from tests.tiny_models import PagedDriver, make_tiny_model

TOKENS = [5, 9, 200, 31, 8, 77, 13, 4, 300, 21, 1, 99]


class ThreadGroup:
    """A fake process group for ranks running as threads of one process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * size

    def info(self, rank: int) -> TPInfo:
        return TPInfo(
            rank,
            self.size,
            all_reduce_fn=partial(self._reduce, rank),
            all_gather_fn=partial(self._gather, rank),
        )

    def _exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read them
        return parts  # type: ignore[return-value]

    def _reduce(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(rank, x)).sum(0)  # the same order on every rank

    def _gather(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(rank, x), dim=-1)


def run_ranks(size: int, fn) -> list:
    """``fn(rank, tp_info)`` on ``size`` threads; their results in rank order."""
    group = ThreadGroup(size)
    results: list = [None] * size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, group.info(rank))
        except Exception as exc:  # noqa: BLE001 - re-raised below; breaks the barrier for the rest
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def load_ranks(path: str, size: int) -> list[torch.nn.Module]:
    return [load_model(path, torch.float32, "cpu", TPInfo(r, size))[0] for r in range(size)]


# --------------------------------------------------------------------------- shards


def assert_llama_shards_rebuild(reference, shards: list[torch.nn.Module]) -> None:
    full = reference.state_dict()
    size = len(shards)
    heads, kv_heads = reference.config.num_attention_heads, reference.config.num_key_value_heads
    for i in range(reference.config.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = [s.model.layers[i].self_attn.qkv_proj for s in shards]
        q = torch.cat([m.weight[: m.q_size] for m in qkv])
        k = [m.weight[m.q_size : m.q_size + m.kv_size] for m in qkv]
        v = [m.weight[m.q_size + m.kv_size :] for m in qkv]
        if kv_heads < size:  # replicated: ranks sharing a KV head hold identical copies
            per = size // kv_heads
            assert all(torch.equal(k[r], k[r - r % per]) for r in range(size))
            k, v = k[::per], v[::per]
        assert qkv[0].num_heads == heads // size
        torch.testing.assert_close(q, full[p + "self_attn.q_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(torch.cat(k), full[p + "self_attn.k_proj.weight"])
        torch.testing.assert_close(torch.cat(v), full[p + "self_attn.v_proj.weight"])
        o = torch.cat([s.model.layers[i].self_attn.o_proj.weight for s in shards], dim=1)
        torch.testing.assert_close(o, full[p + "self_attn.o_proj.weight"], rtol=0, atol=0)
        gate_up = [s.model.layers[i].mlp.gate_up_proj.weight for s in shards]
        half = gate_up[0].shape[0] // 2
        gate = torch.cat([w[:half] for w in gate_up])
        up = torch.cat([w[half:] for w in gate_up])
        torch.testing.assert_close(gate, full[p + "mlp.gate_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(up, full[p + "mlp.up_proj.weight"], rtol=0, atol=0)
        down = torch.cat([s.model.layers[i].mlp.down_proj.weight for s in shards], dim=1)
        torch.testing.assert_close(down, full[p + "mlp.down_proj.weight"], rtol=0, atol=0)
    embed = torch.cat([s.model.embed_tokens.weight for s in shards])
    vocab = reference.config.vocab_size
    torch.testing.assert_close(embed[:vocab], full["model.embed_tokens.weight"], rtol=0, atol=0)
    assert not embed[vocab:].any()  # padding rows


@pytest.mark.parametrize(
    ("size", "overrides"),
    [
        (2, {}),  # GQA: 4 query heads, 2 KV heads, one of each per rank pair
        (4, {}),  # 2 KV heads over 4 ranks: each replicated twice
        (2, {"num_key_value_heads": 1, "vocab_size": 511}),  # 1 KV head, padded vocabulary
    ],
)
def test_llama_rank_shards_concatenate_to_the_checkpoint(tmp_path, size, overrides):
    reference = make_tiny_model("llama", **overrides)
    reference.save_pretrained(tmp_path)
    shards = load_ranks(str(tmp_path), size)
    assert_llama_shards_rebuild(reference, shards)
    kv = reference.config.num_key_value_heads
    assert all(s.num_kv_heads == max(1, kv // size) for s in shards)


@pytest.mark.parametrize("size", [2, 4])
def test_opt_rank_shards_concatenate_to_the_checkpoint(tmp_path, size):
    reference = make_tiny_model("opt")
    reference.save_pretrained(tmp_path)
    full = reference.state_dict()
    shards = load_ranks(str(tmp_path), size)
    for i in range(reference.config.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        layers = [s.model.decoder.layers[i] for s in shards]
        qkv = [x.self_attn.qkv_proj for x in layers]
        q_size = qkv[0].q_size
        for j, name in enumerate("qkv"):
            rows = slice(j * q_size, (j + 1) * q_size)
            for kind in ("weight", "bias"):
                got = torch.cat([getattr(m, kind)[rows] for m in qkv])
                want = full[f"{p}self_attn.{name}_proj.{kind}"]
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        out = torch.cat([x.self_attn.out_proj.weight for x in layers], dim=1)
        torch.testing.assert_close(out, full[p + "self_attn.out_proj.weight"], rtol=0, atol=0)
        for x in layers:  # row parallel: the bias is whole on every rank, added once
            assert torch.equal(x.self_attn.out_proj.bias, full[p + "self_attn.out_proj.bias"])
            assert torch.equal(x.fc2.bias, full[p + "fc2.bias"])
        fc1 = torch.cat([x.fc1.weight for x in layers])
        fc1_bias = torch.cat([x.fc1.bias for x in layers])
        fc2 = torch.cat([x.fc2.weight for x in layers], dim=1)
        torch.testing.assert_close(fc1, full[p + "fc1.weight"], rtol=0, atol=0)
        torch.testing.assert_close(fc1_bias, full[p + "fc1.bias"], rtol=0, atol=0)
        torch.testing.assert_close(fc2, full[p + "fc2.weight"], rtol=0, atol=0)


# --------------------------------------------------------------------------- partial sums


@pytest.mark.parametrize("size", [1, 2, 4])
def test_column_then_row_partial_outputs_sum_to_the_full_output(size):
    torch.manual_seed(0)
    w1, b1 = torch.randn(96, 32), torch.randn(96)
    w2, b2 = torch.randn(32, 96), torch.randn(32)
    x = torch.randn(5, 32)
    want = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    partials = []
    for rank in range(size):
        # The all-reduce is done here by hand: each rank's output before it, summed.
        tp = TPInfo(rank, size, all_reduce_fn=lambda t: t)
        col = ColumnParallelLinear(32, 96, True, tp)
        row = RowParallelLinear(96, 32, True, tp, reduce_results=False)
        col.weight_loader(col.weight, w1)
        col.weight_loader(col.bias, b1)
        row.weight_loader(row.weight, w2)
        row.weight_loader(row.bias, b2)
        with torch.no_grad():
            partials.append(row(torch.relu(col(x))) - (b2 if size > 1 else 0))
    torch.testing.assert_close(sum(partials) + (b2 if size > 1 else 0), want)


@pytest.mark.parametrize("size", [2, 4])
def test_merged_and_qkv_layers_match_their_unfused_parts(size):
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    q, k, v = torch.randn(64, 64), torch.randn(32, 64), torch.randn(32, 64)  # 4 q, 2 kv heads
    for rank in range(size):
        tp = TPInfo(rank, size)
        merged = MergedColumnParallelLinear(64, [128, 128], False, tp)
        merged.weight_loader(merged.weight, gate, 0)
        merged.weight_loader(merged.weight, up, 1)
        g, u = merged(x).split(128 // size, dim=-1)
        rows = slice(rank * 128 // size, (rank + 1) * 128 // size)
        torch.testing.assert_close(g, x @ gate[rows].T)
        torch.testing.assert_close(u, x @ up[rows].T)
        qkv = QKVParallelLinear(64, 16, 4, 2, False, tp)
        for shard, w in zip("qkv", (q, k, v)):
            qkv.weight_loader(qkv.weight, w, shard)
        got_q, got_k, got_v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        heads = slice(rank * 64 // size, (rank + 1) * 64 // size)
        kv_head = rank * 2 // size  # the KV head this rank's query heads read
        torch.testing.assert_close(got_q, x @ q[heads].T)
        kv_rows = slice(kv_head * 16, kv_head * 16 + qkv.kv_size)
        torch.testing.assert_close(got_k, x @ k[kv_rows].T)
        torch.testing.assert_close(got_v, x @ v[kv_rows].T)


def test_vocab_parallel_embedding_and_head_rebuild_the_full_lookup():
    torch.manual_seed(2)
    vocab, hidden, size = 11, 8, 4  # padded to 12: the last rank holds 2 real rows
    table = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 3, 10, 7, 2])

    def rank_fn(rank: int, tp: TPInfo):
        from engine.models.vocab import ParallelLMHead

        embed = VocabParallelEmbedding(vocab, hidden, tp)
        embed.weight_loader(embed.weight, table)
        head = ParallelLMHead(vocab, hidden, tp, tied=embed)
        x = embed(ids)
        return x, head(x)

    for x, logits in run_ranks(size, rank_fn):
        torch.testing.assert_close(x, table[ids])
        assert logits.shape == (5, vocab) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, table[ids] @ table.T)


def test_wrong_shard_shape_is_refused_with_both_shapes():
    layer = QKVParallelLinear(64, 16, 4, 2, False, TPInfo(0, 2))
    with pytest.raises(ValueError, match=r"shape \(16, 64\), expected \(32, 64\)"):
        layer.weight_loader(layer.weight, torch.zeros(16, 64), "k")


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize(
    ("arch", "size", "overrides"),
    [("llama", 2, {}), ("llama", 2, {"num_key_value_heads": 1}), ("opt", 2, {})],
)
def test_tensor_parallel_model_on_threads_gives_the_single_device_logits(
    tmp_path, arch, size, overrides
):
    reference = make_tiny_model(arch, **overrides)
    reference.save_pretrained(tmp_path)
    single, _ = load_model(str(tmp_path), torch.float32, "cpu")
    want = PagedDriver(single).greedy([TOKENS], max_new_tokens=4)[0]
    want_logits = PagedDriver(single).step([(0, TOKENS)])[0]

    def rank_fn(rank: int, tp: TPInfo):
        model, _ = load_model(str(tmp_path), torch.float32, "cpu", tp)
        logits = PagedDriver(model).step([(0, TOKENS)])[0]
        return logits, PagedDriver(model).greedy([TOKENS], max_new_tokens=4)[0]

    for logits, tokens in run_ranks(size, rank_fn):
        torch.testing.assert_close(logits, want_logits, atol=2e-4, rtol=1e-4)
        assert tokens == want
