"""How a step's attention indexing is planned, once per forward, from the runner's metadata."""

from __future__ import annotations

import numpy as np
import torch

from engine.models.base import AttentionMetadata
from engine.models.layers import AttentionPlan

BS = 4


def metadata(query_lens: list[int], context_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    padded = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64)
    slots = [
        table[p // BS] * BS + p % BS
        for q, c, table in zip(query_lens, context_lens, tables)
        for p in range(c - q, c)
    ]
    return AttentionMetadata(
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=torch.from_numpy(padded),
        slot_mapping=torch.tensor(slots),
        block_size=BS,
    )


def test_lone_decode_over_consecutive_blocks_reads_a_view_without_mask():
    plan = AttentionPlan.build(metadata([1], [10], [[5, 6, 7]]), torch.device("cpu"))
    assert plan.decode_span == (5, 3) and plan.decode_blocks is None
    assert plan.decode_keys == 10 and plan.decode_mask is None


def test_lone_decode_over_scattered_blocks_gathers_only_its_blocks():
    plan = AttentionPlan.build(metadata([1], [6], [[9, 2, 4]]), torch.device("cpu"))
    assert plan.decode_span is None
    assert plan.decode_blocks.tolist() == [9, 2]  # the third block holds nothing yet
    assert plan.decode_keys == 6 and plan.decode_mask is None


def test_decodes_of_different_lengths_gather_to_the_longest_and_mask_the_rest():
    plan = AttentionPlan.build(metadata([1, 1], [3, 6], [[8], [1, 3]]), torch.device("cpu"))
    assert plan.decode_span is None and plan.decode_rows is None  # every row decodes
    assert plan.decode_blocks.tolist() == [8, 0, 1, 3]  # padded table rows, flattened
    assert plan.decode_keys == 6
    assert plan.decode_mask.shape == (2, 1, 1, 6)
    assert plan.decode_mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 3, [True] * 6]


def test_decodes_of_equal_length_need_no_mask():
    plan = AttentionPlan.build(metadata([1, 1], [5, 5], [[0, 1], [7, 2]]), torch.device("cpu"))
    assert plan.decode_mask is None and plan.decode_keys == 5


def test_mixed_step_plans_prefills_apart_and_picks_the_decode_rows():
    meta = metadata([3, 1, 2], [3, 7, 6], [[0], [4, 5], [2, 6]])
    plan = AttentionPlan.build(meta, torch.device("cpu"))
    assert plan.num_decode == 1 and plan.decode_rows.tolist() == [3]
    plain, chunk = plan.prefills
    assert (plain.start, plain.end, plain.blocks, plain.mask) == (0, 3, None, None)
    assert (chunk.start, chunk.end, chunk.context_len) == (4, 6, 6)
    assert chunk.blocks.tolist() == [2, 6]
    # Its two queries sit at positions 4 and 5 and see keys up to themselves.
    assert chunk.mask.tolist() == [[True] * 5 + [False], [True] * 6]
