"""ZeroMQ client SDK for a FastServe server (wire format: docs/client.md)."""

from __future__ import annotations

from engine.client.sdk import (
    AsyncClient,
    Client,
    EngineUnavailable,
    FastServeError,
    InvalidRequest,
    Output,
    QueueFull,
    ServerError,
    join_tool_calls,
)
from engine.client.wire import default_zmq_address

__all__ = [
    "AsyncClient",
    "Client",
    "EngineUnavailable",
    "FastServeError",
    "InvalidRequest",
    "Output",
    "QueueFull",
    "ServerError",
    "default_zmq_address",
    "join_tool_calls",
]
