"""An independent reference for the sampler's logit processors: the OpenAI / vLLM
definitions written out in numpy over plain token lists, and greedy decoding with them over
transformers' own logits. Tests compare the engine (counts kept on the device, updated per
draw, across preemption) against this."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from engine.sampling import SamplingParams


def process(logits: np.ndarray, prompt: list[int], output: list[int], p: SamplingParams,
            eos: Iterable[int] = ()) -> np.ndarray:
    """One row's logits after logit_bias, the min_tokens mask and the penalties (float32)."""
    x = np.asarray(logits, dtype=np.float32).copy()
    for tid, bias in p.logit_bias:
        x[tid] += np.float32(bias)
    if len(output) < p.min_tokens:
        for tid in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[tid] = -np.inf
    r = np.float32(p.repetition_penalty)
    if r != 1:
        for tid in set(prompt) | set(output):
            x[tid] = x[tid] / r if x[tid] > 0 else x[tid] * r
    for tid in set(output):
        x[tid] -= np.float32(p.frequency_penalty) * np.float32(output.count(tid))
        x[tid] -= np.float32(p.presence_penalty)
    return x


def load_hf(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def greedy(model: torch.nn.Module, prompt: list[int], p: SamplingParams,
           eos: Iterable[int] = ()) -> list[int]:
    """Greedy tokens under ``p``'s processors, from transformers' logits (its own KV cache).
    Stops as the engine does: EOS (unless ignore_eos) or a stop id once past min_tokens, or
    max_tokens."""
    eos = set(eos)
    out: list[int] = []
    feed, cache = list(prompt), {}
    while len(out) < p.max_tokens:
        with torch.inference_mode():
            res = model(torch.tensor([feed]), use_cache=True, **cache)
        # transformers 5 names the cache ``cache``, earlier versions ``past_key_values``.
        name = "cache" if res.get("cache") is not None else "past_key_values"
        cache = {name: res[name]}
        t = int(np.argmax(process(res.logits[0, -1].float().numpy(), prompt, out, p, eos)))
        out.append(t)
        feed = [t]
        if len(out) > p.min_tokens and (
            (not p.ignore_eos and t in eos) or t in p.stop_token_ids
        ):
            break
    return out
