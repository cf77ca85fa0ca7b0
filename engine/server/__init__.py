"""Serving frontends: OpenAI-compatible HTTP (aiohttp) and ZeroMQ, over the engine API.

``build_app`` / ``serve`` / ``run_server`` are in ``engine.server.http``; what they need
from an engine is ``engine.server.protocol.EngineLike``.
"""

from __future__ import annotations

from engine.server.http import build_app, default_model_name, run_server, serve, start_http
from engine.server.protocol import EngineLike

__all__ = ["EngineLike", "build_app", "default_model_name", "run_server", "serve", "start_http"]
