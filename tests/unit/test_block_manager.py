from __future__ import annotations

import pytest

from engine.memory.block_manager import BlockManager, OutOfBlocksError, Residency


def test_allocation_grows_table_by_whole_blocks():
    bm = BlockManager(num_gpu_blocks=8, num_host_blocks=0, block_size=4)
    assert bm.allocate("a", 5) and len(bm.gpu_table("a")) == 2
    assert bm.allocate("a", 8) == []  # still fits in two blocks
    assert len(bm.allocate("a", 9)) == 1
    assert bm.num_free_gpu_blocks == 5
    bm.check_integrity()


def test_failed_allocation_changes_nothing():
    bm = BlockManager(num_gpu_blocks=2, num_host_blocks=0, block_size=4)
    bm.allocate("a", 4)
    assert not bm.can_allocate("b", 8)
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", 8)
    assert bm.num_free_gpu_blocks == 1 and bm.residency("b") is Residency.NONE
    bm.check_integrity()


def test_free_returns_blocks_of_both_pools():
    bm = BlockManager(num_gpu_blocks=4, num_host_blocks=4, block_size=4)
    bm.allocate("a", 8)
    bm.swap_out("a")
    bm.allocate("b", 4)
    bm.free("a")
    bm.free("b")
    bm.end_step()
    assert (bm.num_free_gpu_blocks, bm.num_free_host_blocks) == (4, 4)
    bm.check_integrity()


def test_swap_round_trip_moves_whole_table():
    bm = BlockManager(num_gpu_blocks=4, num_host_blocks=4, block_size=4)
    bm.allocate("a", 12)
    gpu = bm.gpu_table("a")
    out = bm.swap_out("a")
    assert [g for g, _ in out] == gpu and bm.residency("a") is Residency.HOST
    assert bm.num_free_gpu_blocks == 4  # GPU blocks are reusable within the same plan
    back = bm.swap_in("a")
    assert [h for h, _ in back] == [h for _, h in out]
    assert bm.residency("a") is Residency.GPU
    bm.end_step()
    bm.check_integrity()


def test_host_blocks_vacated_by_swap_in_are_not_reused_in_the_same_step():
    bm = BlockManager(num_gpu_blocks=2, num_host_blocks=1, block_size=4)
    bm.allocate("a", 4)
    bm.swap_out("a")
    bm.end_step()
    bm.allocate("b", 4)
    bm.swap_in("a")  # a's host block is still being read in this step...
    assert not bm.can_swap_out("b")  # ...so b cannot be written over it
    bm.end_step()
    assert bm.can_swap_out("b")


def test_swap_out_needs_host_room():
    bm = BlockManager(num_gpu_blocks=4, num_host_blocks=1, block_size=4)
    bm.allocate("a", 8)
    assert not bm.can_swap_out("a")
    with pytest.raises(OutOfBlocksError):
        bm.swap_out("a")
    assert bm.residency("a") is Residency.GPU
