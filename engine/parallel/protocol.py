"""Engine <-> worker messages and their codec.

A message is a msgpack map with a ``kind`` field, sent as a multipart ZeroMQ message:
frame 0 is the msgpack body, frames 1.. are raw tensor buffers. A tensor (``numpy.ndarray``
or CPU ``torch.Tensor``) anywhere in the body is replaced by the ext type below, carrying
``(dtype, shape, frame index)``; its bytes travel untouched in their own frame and are read
back without a copy. Nothing is ever pickled, so a hostile peer can at worst send a bad map.

Kinds, engine -> worker: ``init``, ``resize_cache``, ``step``, ``profile``, ``health``,
``shutdown``. Worker -> engine: ``hello`` (first message of a rank, before any command),
``ready`` (answer to init), ``resized``, ``step_done``, ``profiled``, ``healthy``, ``bye``
and ``error``. Every reply carries the ``call`` id of the command it answers and the
``rank`` that answers; steps and profiles are answered by the driver rank only.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_TENSOR_EXT = 1
PROTOCOL_VERSION = 1


class ProtocolError(RuntimeError):
    pass


def encode(message: dict[str, Any]) -> list[Any]:
    """Message -> frames. Frame buffers are shared with the arrays (zero copy)."""
    frames: list[Any] = [b""]

    def default(obj: Any) -> Any:
        arr = _as_array(obj)
        if arr is None:
            raise TypeError(f"cannot encode {type(obj).__name__}")
        arr = np.ascontiguousarray(arr)
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
        header = msgpack.packb([arr.dtype.str, list(arr.shape), len(frames) - 1])
        return msgpack.ExtType(_TENSOR_EXT, header)

    frames[0] = msgpack.packb(message, default=default, use_bin_type=True)
    return frames


def decode(frames: list[Any]) -> dict[str, Any]:
    """Frames -> message. Arrays are read-only views onto the received frames."""
    if not frames:
        raise ProtocolError("empty message")

    def ext_hook(code: int, data: bytes) -> Any:
        if code != _TENSOR_EXT:
            raise ProtocolError(f"unknown ext type {code}")
        dtype, shape, index = msgpack.unpackb(data)
        if not 0 < index < len(frames):
            raise ProtocolError(f"tensor frame {index} missing")
        buf = frames[index].buffer if hasattr(frames[index], "buffer") else frames[index]
        return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)

    body = frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]
    try:
        msg = msgpack.unpackb(body, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"malformed message: {e}") from e
    if not isinstance(msg, dict) or "kind" not in msg:
        raise ProtocolError("message must be a map with a 'kind'")
    return msg


def _as_array(obj: Any) -> np.ndarray | None:
    if isinstance(obj, np.ndarray):
        return obj
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit pattern
            return t.view(torch.int16).numpy()
        return t.numpy()
    return None


def _torch() -> Any:
    import sys

    return sys.modules.get("torch")  # only if already imported: the engine process may not need it


def driver_rank(tp_size: int, pp_size: int) -> int:
    """The rank that samples and answers steps: the last pipeline stage's TP rank 0."""
    return (pp_size - 1) * tp_size


def plan_to_message(
    plan: Any, call: int, with_feed: bool = False, grammar: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Encode a :class:`engine.plan.StepPlan`; the worker keeps per-job state, so only
    what changed travels: prompts and sampling params of new jobs, block-table deltas.

    ``with_feed`` (several ranks) adds to each sequence the output tokens it feeds: only the
    driver samples, and every other rank learns the tokens from the plan.

    ``grammar`` (only when some sampled row is constrained): ``{"ids": [job ids],
    "bitmask": int32 [n, ceil(vocab / 32)]}``, the next tokens each job's grammar allows
    (engine.structured.book)."""
    msg = {
        "kind": "step",
        "call": call,
        "step": plan.step_id,
        "new": [
            {"id": j.job_id, "prompt": np.asarray(j.prompt_ids, dtype=np.int64),
             "params": j.params.worker_view(j.eos_token_ids)}
            for j in plan.new_jobs
        ],
        "seqs": [
            [s.job.job_id, s.start, s.num_tokens, s.new_blocks, s.reset_table, s.sample]
            + ([_fed_outputs(s)] if with_feed else [])
            for s in plan.seqs
        ],
        "swap_out": plan.swap_out,
        "swap_in": plan.swap_in,
        "offload": plan.offload,
        "prefetch": plan.prefetch,
        "free": plan.free,
    }
    if grammar is not None:
        msg["grammar"] = grammar
    return msg


def _fed_outputs(seq: Any) -> list[int]:
    """Output tokens among the positions ``seq`` feeds (prompt tokens every rank has)."""
    prompt = seq.job.num_prompt_tokens
    end = seq.start + seq.num_tokens - prompt
    if end <= 0:
        return []
    return [int(t) for t in seq.job.output_ids[max(seq.start - prompt, 0) : end]]
