"""Device-side storage of the paged KV cache, and block copies between two pools.

A pool holds one tensor per layer in the layout of ``engine.models.base.KVCache``:
``[2, num_blocks, block_size, num_kv_heads, head_dim]``. Block ``b`` of a pool is the same
slice of every layer's tensor, so a job's blocks move between the device pool and the host
(swap) pool with :func:`copy_blocks`. Which block belongs to whom is the block manager's
business; this module only owns bytes.
"""

from __future__ import annotations

import torch


def block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes of one block across all layers, K and V."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def num_blocks_for_budget(
    budget_bytes: int,
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    """How many whole blocks fit in ``budget_bytes``."""
    per_block = block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)
    return max(0, budget_bytes // per_block)


class KVCachePool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pin_memory: bool = False,
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        # Pinning only helps (and only works) when there is an accelerator to copy to.
        pin = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        # Zero-filled, not empty: attention masks padded slots, but a masked NaN would still
        # poison the weighted sum (0 * NaN), and fresh memory may hold NaN bit patterns.
        self.caches: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device, pin_memory=pin)
            for _ in range(num_layers)
        ]
        self.bytes_per_block = block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)

    # Also usable before a pool exists (sizing one from a byte budget).
    block_bytes = staticmethod(block_bytes)
    num_blocks_for_budget = staticmethod(num_blocks_for_budget)


def copy_blocks(
    src: KVCachePool,
    dst: KVCachePool,
    pairs: list[tuple[int, int]],
    non_blocking: bool = False,
) -> None:
    """Copy whole blocks ``src_block -> dst_block`` (all layers, K and V) between two pools.

    One gather, one transfer and one scatter per layer, whatever the number of blocks. With
    ``non_blocking`` a host-to-device copy is queued on the current CUDA stream (its gather
    goes through pinned memory so the transfer is truly asynchronous); a device-to-host copy
    always completes before returning, because the host-side scatter cannot wait on a stream.
    """
    if not pairs:
        return
    if (src.num_layers, src.block_size, src.num_kv_heads, src.head_dim, src.dtype) != (
        dst.num_layers,
        dst.block_size,
        dst.num_kv_heads,
        dst.head_dim,
        dst.dtype,
    ):
        raise ValueError("copy_blocks needs two pools of the same geometry and dtype")
    src_ids = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=src.device)
    dst_ids = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=dst.device)
    cross_device = src.device != dst.device
    async_upload = non_blocking and dst.device.type == "cuda" and src.device.type == "cpu"
    stage_shape = (2, len(pairs), src.block_size, src.num_kv_heads, src.head_dim)
    for src_cache, dst_cache in zip(src.caches, dst.caches):
        if async_upload:
            # Staged into fresh pinned memory per layer: the transfer may still be reading
            # a buffer when the next layer is gathered, so buffers must not be reused.
            blocks = torch.empty(stage_shape, dtype=src.dtype, pin_memory=True)
            torch.index_select(src_cache, 1, src_ids, out=blocks)
        else:
            blocks = src_cache.index_select(1, src_ids)
        if cross_device:
            blocks = blocks.to(dst.device, non_blocking=async_upload)
        dst_cache.index_copy_(1, dst_ids, blocks)


class AsyncBlockCopier:
    """Runs a step's proactive block moves while the step computes.

    ``submit`` starts the copies and returns at once; ``wait`` returns when they have
    landed, with the seconds they took. On CUDA the copies go on a side stream (the host
    pool is pinned) and ``wait`` makes the compute stream wait for its event; on CPU a
    single background thread with one intra-op thread does them (torch's copy kernels
    release the GIL). The worker calls ``wait`` before anything else in the next step, so
    a job never runs before its blocks have arrived, and a block is never reused while a
    copy still reads it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = None
        self._pending = None  # CPU: a Future; CUDA: (event, start event, kinds)

    def submit(self, gpu: KVCachePool, host: KVCachePool, offload: list, prefetch: list) -> None:
        if not (offload or prefetch):
            return
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self._stream):
                start.record()
                copy_blocks(gpu, host, offload)
                copy_blocks(host, gpu, prefetch, non_blocking=True)
                done.record()
            self._pending = (start, done)
            return
        self.start()
        self._pending = self._pool.submit(_timed_copies, gpu, host, offload, prefetch)

    def start(self) -> None:
        """Start the CPU copy thread now rather than at the first move, so that a worker
        with a host pool has the same threads from its first step to its last (the
        leak checks and the ``process_threads`` gauge see a flat line). No-op on CUDA."""
        if self._stream is not None or self._pool is not None:
            return
        from concurrent.futures import ThreadPoolExecutor

        # One intra-op thread for the copies: a second thread that runs multi-threaded
        # torch ops gets its own OpenMP team, and from then on every forward in the
        # main thread runs ~25% slower (measured on the 2-core CI machine, 135M model),
        # for the rest of the process, whether or not a copy is in flight.
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="kv-copy", initializer=torch.set_num_threads, initargs=(1,)
        )
        self._pool.submit(int).result()  # the executor spawns its thread on first submit

    def wait(self) -> float:
        """Block until the submitted copies are done; returns their duration in seconds."""
        pending, self._pending = self._pending, None
        if pending is None:
            return 0.0
        if self._stream is not None:
            start, done = pending
            torch.cuda.current_stream(self.device).wait_event(done)
            done.synchronize()
            return start.elapsed_time(done) / 1000.0
        return pending.result()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


def _timed_copies(gpu: KVCachePool, host: KVCachePool, offload: list, prefetch: list) -> float:
    import time

    t0 = time.perf_counter()
    copy_blocks(gpu, host, offload)
    copy_blocks(host, gpu, prefetch)
    return time.perf_counter() - t0
