"""The ZeroMQ client protocol, shared by the SDK and the server (docs/client.md).

One msgpack map per ZeroMQ message, never pickle. The client is a DEALER, the server a
ROUTER: the client sends ``[body]``, the server replies ``[body]`` to that client only.
Every map has a string ``kind``; requests carry a client-chosen string ``id`` that the
replies for that request repeat.
"""

from __future__ import annotations

import tempfile
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# The server tells each client, this often, which of its requests are still running, so a
# client can tell "slow" (heartbeats keep coming) from "server gone" (silence).
HEARTBEAT_INTERVAL_S = 1.0

# Request kinds (client -> server) and reply kinds (server -> client).
GENERATE, ABORT, HEALTH, MODELS = "generate", "abort", "health", "models"
OUTPUT, ERROR, HEARTBEAT = "output", "error", "heartbeat"

# ``type`` of an error reply.
INVALID_REQUEST = "InvalidRequest"  # a field is wrong; ``param`` names it
QUEUE_FULL = "QueueFull"  # the engine's waiting queue is full: retry later
ENGINE_UNAVAILABLE = "EngineUnavailable"  # the engine cannot serve (worker died, shutting down)
INTERNAL = "Internal"  # a server bug
BAD_MESSAGE = "BadMessage"  # not a decodable request map
UNAUTHORIZED = "Unauthorized"  # the server wants an ``api_key`` field and got none or another

# Fields of an ``output`` reply besides kind/id (engine.actors.frontend.RequestOutput).
OUTPUT_FIELDS = (
    "request_id",
    "text",
    "token_ids",
    "finished",
    "finish_reason",
    "num_prompt_tokens",
    "num_output_tokens",
    "logprobs",
    "queue_level",
    "stats",
    "prompt_token_ids",
    "stop_reason",
    "prompt_logprobs",  # with params.prompt_logprobs, first output only: None, then per token
    "tool_calls",  # chat with tools: call deltas in OpenAI's streaming shape, else None
)


class WireError(ValueError):
    """Bytes that are not a protocol message."""


def default_zmq_address(http_port: int = 8000) -> str:
    """Where ``fastserve serve`` listens for ZeroMQ clients unless told otherwise; derived
    from the HTTP port so several servers on one host do not collide."""
    return f"ipc://{tempfile.gettempdir()}/fastserve-{http_port}.ipc"


def encode(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def decode(raw: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types
        raise WireError(f"not a msgpack message: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
        raise WireError("a message must be a map with a string 'kind'")
    return msg


def output_message(client_id: str, out: Any) -> dict[str, Any]:
    msg = {"kind": OUTPUT, "id": client_id}
    for name in OUTPUT_FIELDS:
        msg[name] = getattr(out, name, None)
    msg["token_ids"] = list(msg["token_ids"] or [])
    return msg


def error_message(
    client_id: str | None, type_: str, message: str, param: str | None = None
) -> dict[str, Any]:
    return {"kind": ERROR, "id": client_id, "type": type_, "message": message, "param": param}
