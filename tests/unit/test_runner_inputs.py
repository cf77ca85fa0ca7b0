"""The worker's batch assembly: a step plan becomes the model's flat inputs in one go."""

from __future__ import annotations

import torch

from engine.parallel.runner import ModelRunner, _JobState


def runner_with(jobs: dict[str, list[int]]) -> ModelRunner:
    runner = ModelRunner(None, None, None, block_size=4, device=torch.device("cpu"))  # type: ignore[arg-type]
    runner.jobs = {jid: _JobState(tokens=list(tokens)) for jid, tokens in jobs.items()}
    return runner


def test_mixed_step_becomes_flat_tokens_positions_slots_and_padded_tables():
    runner = runner_with({"a": list(range(100, 106)), "b": [7, 8, 9], "c": list(range(50, 60))})
    runner.jobs["a"].table = [3, 8]  # a decodes its 6th token (position 5), in its 2nd block
    inputs = runner._assemble([
        ["a", 5, 1, [], False, True],
        ["b", 0, 3, [6], True, True],  # a fresh prefill
        ["c", 4, 4, [1, 2], True, False],  # a middle chunk: nothing to sample
    ])
    assert inputs.input_ids.tolist() == [105, 7, 8, 9, 54, 55, 56, 57]
    assert inputs.positions.tolist() == [5, 0, 1, 2, 4, 5, 6, 7]
    assert inputs.attn.slot_mapping.tolist() == [8 * 4 + 1, 24, 25, 26, 8, 9, 10, 11]
    assert inputs.attn.block_tables.tolist() == [[3, 8], [6, 0], [1, 2]]
    assert inputs.attn.query_lens == [1, 3, 4] and inputs.attn.context_lens == [6, 3, 8]
    assert inputs.sample_ids == ["a", "b"] and inputs.sample_rows.tolist() == [0, 3]


def test_pure_decode_step_samples_every_row_without_selecting():
    runner = runner_with({"a": [1, 2, 3, 4, 5], "b": [6, 7]})
    runner.jobs["a"].table, runner.jobs["b"].table = [0, 1], [2]
    inputs = runner._assemble([["a", 4, 1, [5], False, True], ["b", 1, 1, [], False, True]])
    assert runner.jobs["a"].table == [0, 1, 5]  # a's delta was appended
    assert inputs.input_ids.tolist() == [5, 7] and inputs.positions.tolist() == [4, 1]
    assert inputs.attn.slot_mapping.tolist() == [1 * 4 + 0, 2 * 4 + 1]
    assert inputs.sample_rows is None and inputs.sample_ids == ["a", "b"]
