"""KVCachePool sizing and block copies between pools (the swap data path)."""

from __future__ import annotations

import pytest
import torch

from engine.memory.kv_cache import AsyncBlockCopier, KVCachePool, copy_blocks
from engine.models.loader import load_model
from tests.tiny_models import PagedDriver, make_tiny_model


def pool(num_blocks: int, dtype: torch.dtype = torch.float32) -> KVCachePool:
    return KVCachePool(3, num_blocks, 4, 2, 8, dtype, "cpu")


def test_pool_has_one_zeroed_cache_per_layer_in_the_contract_layout():
    p = pool(5, torch.bfloat16)
    assert len(p.caches) == 3
    for cache in p.caches:
        assert cache.shape == (2, 5, 4, 2, 8) and cache.dtype == torch.bfloat16
        assert not cache.any()


def test_block_bytes_counts_k_and_v_of_every_layer():
    assert KVCachePool.block_bytes(3, 4, 2, 8, torch.float16) == 2 * 3 * 4 * 2 * 8 * 2
    assert pool(5).bytes_per_block == 2 * 3 * 4 * 2 * 8 * 4
    per_block = KVCachePool.block_bytes(30, 16, 3, 64, torch.float32)
    budget = 10 * per_block + per_block // 2
    assert KVCachePool.num_blocks_for_budget(budget, 30, 16, 3, 64, torch.float32) == 10
    assert KVCachePool.num_blocks_for_budget(0, 30, 16, 3, 64, torch.float32) == 0


@pytest.mark.parametrize("non_blocking", [False, True])
def test_copy_blocks_moves_whole_blocks_of_every_layer_and_nothing_else(non_blocking):
    src, dst = pool(8), pool(6)
    for cache in src.caches:
        cache.normal_()
    pairs = [(3, 0), (7, 5), (1, 2)]
    copy_blocks(src, dst, pairs, non_blocking=non_blocking)
    for s_cache, d_cache in zip(src.caches, dst.caches):
        for s, d in pairs:
            assert torch.equal(d_cache[:, d], s_cache[:, s])
        untouched = [b for b in range(6) if b not in (0, 5, 2)]
        assert not d_cache[:, untouched].any()


def test_async_copier_moves_blocks_on_a_one_thread_side_thread_and_leaves_the_main_one_alone():
    gpu, host = pool(6), pool(6)
    for cache in gpu.caches:
        cache.normal_()
    gpu.caches[0][:, 4] = 7.0
    main_threads = torch.get_num_threads()
    copier = AsyncBlockCopier(torch.device("cpu"))
    try:
        copier.submit(gpu, host, offload=[(1, 2)], prefetch=[(2, 4)])
        assert copier.wait() >= 0.0
        # offload ran before prefetch: block 1 went out to host 2, then came back to block 4
        for g_cache, h_cache in zip(gpu.caches, host.caches):
            assert torch.equal(h_cache[:, 2], g_cache[:, 1])
            assert torch.equal(g_cache[:, 4], g_cache[:, 1])
        # A copy thread with its own multi-threaded OpenMP team slows every later forward
        # in the main thread on a small CPU; it must run its ops on one thread.
        assert copier._pool.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == main_threads
        assert copier.wait() == 0.0  # nothing pending
    finally:
        copier.close()


def test_copy_blocks_rejects_pools_of_different_geometry():
    with pytest.raises(ValueError):
        copy_blocks(pool(4), KVCachePool(3, 4, 8, 2, 8, torch.float32, "cpu"), [(0, 0)])


def test_sequence_swapped_out_and_back_to_other_blocks_decodes_as_before(tmp_path):
    reference = make_tiny_model("llama")
    reference.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), torch.float32, "cpu")
    driver = PagedDriver(model, num_blocks=16, block_size=4)
    tokens = [5, 9, 200, 31, 8, 77, 13, 4, 300, 21]
    driver.step([(0, tokens)])

    host = KVCachePool(
        model.num_layers, 8, 4, model.num_kv_heads, model.head_dim, torch.float32, "cpu"
    )
    old = driver.tables[0]
    copy_blocks(driver.pool, host, [(b, i) for i, b in enumerate(old)])
    for cache in driver.pool.caches:  # the freed device blocks get reused by someone else
        cache[:, old] = 7.0
    new = [driver.free.pop() for _ in old]
    copy_blocks(host, driver.pool, [(i, b) for i, b in enumerate(new)])
    driver.tables[0] = new

    got = driver.step([(0, [42])])[0][-1]
    with torch.no_grad():
        want = reference(torch.tensor([tokens + [42]])).logits[0, -1]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_copier_thread_starts_once_up_front_so_a_workers_thread_count_stays_flat():
    """A worker with a host pool starts its copy thread before the first step: a lazily
    spawned thread would show up as growth in the leak checks whenever the first proactive
    move happens to come late (it did on a loaded CI machine)."""
    import os

    from engine.parallel.runner import ModelRunner

    def threads() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))

    gpu, host = pool(6), pool(6)
    before = threads()
    runner = ModelRunner(torch.nn.Identity(), gpu, host, 4, torch.device("cpu"))
    try:
        started = threads()
        assert started == before + 1
        runner.copier.start()  # idempotent
        runner.copier.submit(gpu, host, offload=[(1, 2)], prefetch=[(2, 4)])
        runner.copier.wait()
        assert threads() == started  # the moves ran on the thread that was already there
    finally:
        runner.copier.close()
    # No host pool, nothing to move in the background: no thread.
    runner = ModelRunner(torch.nn.Identity(), gpu, None, 4, torch.device("cpu"))
    assert runner.copier._pool is None
    runner.copier.submit(gpu, host, offload=[], prefetch=[])  # nothing to move: no thread
    assert runner.copier._pool is None
