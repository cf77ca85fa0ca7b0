"""Engine outputs -> OpenAI response shapes (JSON bodies and SSE chunks). Pure, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.server.openai_api import GenerationRequest


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, Any]] = field(default_factory=list)  # (token id, engine entry)
    # completions logprobs: characters of the token strings so far (the echoed prompt's
    # tokens first), as vLLM counts them
    text_offset: int = 0
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    echo: str = ""  # completions with echo: the prompt's text, sent before the first text

    def add(self, out: Any) -> None:
        self.text.append(out.text)
        self.num_prompt_tokens = max(self.num_prompt_tokens, out.num_prompt_tokens)
        self.num_output_tokens = max(
            self.num_output_tokens,
            out.num_output_tokens,
            self.num_output_tokens + len(out.token_ids),
        )
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = getattr(out, "stop_reason", None)


def usage(req: GenerationRequest, states: dict[int, ChoiceState]) -> dict:
    # A prompt shared by n choices is counted once, as OpenAI and vLLM do.
    prompt: dict[int, int] = {}
    for c in req.choices:
        prompt[c.prompt_index] = max(
            prompt.get(c.prompt_index, 0), states[c.index].num_prompt_tokens
        )
    p = sum(prompt.values())
    g = sum(s.num_output_tokens for s in states.values())
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


class TokenText:
    """How a logprob entry shows a token. Uses the engine tokenizer's ``token_to_text`` /
    ``token_bytes`` when it has them (special tokens visible, exact bytes of a token that
    holds part of a character), else falls back to ``decode([id])``."""

    def __init__(self, tokenizer: Any) -> None:
        self._text: Callable[[int], str] = getattr(
            tokenizer, "token_to_text", lambda t: tokenizer.decode([t])
        )
        self._bytes: Callable[[int], bytes] = getattr(
            tokenizer, "token_bytes", lambda t: self._text(t).encode("utf-8")
        )

    def text(self, tid: int) -> str:
        return self._text(tid)

    def bytes(self, tid: int) -> list[int]:
        return list(self._bytes(tid))


def completion_logprobs(tok: TokenText, pairs: list[tuple[int, Any]], state: ChoiceState) -> dict:
    """OpenAI's legacy completions shape: parallel arrays, ``top_logprobs`` as dicts."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for tid, entry in pairs:
        s = tok.text(tid)
        out["tokens"].append(s)
        if entry is None:  # an echoed prompt's first token: nothing before it to condition on
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(entry[0])
            out["top_logprobs"].append({tok.text(t): lp for t, lp in entry[1]})
        out["text_offset"].append(state.text_offset)
        state.text_offset += len(s)
    return out


def chat_logprobs(tok: TokenText, pairs: list[tuple[int, Any]]) -> dict:
    def item(tid: int, lp: float) -> dict:
        return {"token": tok.text(tid), "logprob": lp, "bytes": tok.bytes(tid)}

    return {
        "content": [
            {**item(tid, e[0]), "top_logprobs": [item(t, lp) for t, lp in e[1]]} for tid, e in pairs
        ]
    }


def logprob_pairs(out: Any, echo: bool = False) -> list[tuple[int, Any]]:
    """(token id, entry) of an output's new tokens; with ``echo``, the prompt's tokens lead
    the first output (its ``prompt_logprobs``: None for the first token)."""
    pairs = list(zip(out.token_ids, out.logprobs or [], strict=False))
    prompt = getattr(out, "prompt_logprobs", None)
    if echo and prompt is not None and out.prompt_token_ids:
        pairs = list(zip(out.prompt_token_ids, prompt, strict=True)) + pairs
    return pairs


def render_logprobs(
    req: GenerationRequest, tok: TokenText, pairs: list, state: ChoiceState
) -> dict | None:
    if req.logprobs is None:
        return None
    return chat_logprobs(tok, pairs) if req.chat else completion_logprobs(tok, pairs, state)


def chunk(
    req: GenerationRequest,
    choices: list[dict],
    usage_: dict | None = None,
    with_usage: bool = False,
) -> dict:
    obj = {
        "id": req.id,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": req.created,
        "model": req.model,
        "choices": choices,
    }
    if with_usage:  # OpenAI: every chunk carries "usage": null, the last one the totals
        obj["usage"] = usage_
    return obj


def final_response(req: GenerationRequest, states: dict[int, ChoiceState], tok: TokenText) -> dict:
    choices = []
    for c in req.choices:
        st = states[c.index]
        st.text_offset = 0
        lp = render_logprobs(req, tok, st.logprobs, st)
        text = "".join(st.text)
        if req.chat:
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": st.finish_reason,
                    "stop_reason": st.stop_reason,
                }
            )
        else:
            choices.append(
                {
                    "index": c.index,
                    "text": st.echo + text,
                    "logprobs": lp,
                    "finish_reason": st.finish_reason,
                    "stop_reason": st.stop_reason,
                }
            )
    return {
        "id": req.id,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": req.created,
        "model": req.model,
        "choices": choices,
        "usage": usage(req, states),
    }
