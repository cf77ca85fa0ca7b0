"""Schemathesis against the server's own ``GET /openapi.json`` (fake engine, 64-token
context so every generated request is cheap): for each route, valid and invalid bodies
(hypothesis, bounded examples) must never get a 5xx, a status the document does not list,
or a response that violates the documented schema; invalid ones must get a 4xx.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from engine.config import ServerConfig
from engine.server import build_app, start_http
from engine.server.testing import FakeEngine

pytestmark = pytest.mark.timeout(300)

EXAMPLES = 40  # per route and mode: bounded so the run takes seconds, not minutes
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


class ServerThread:
    """The aiohttp app on its own event loop in a thread, for a synchronous fuzzer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.base = ""
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        engine = FakeEngine(max_model_len=64)
        config = ServerConfig(host="127.0.0.1", port=0, max_body_bytes=64 * 1024)
        runner, port = await start_http(build_app(engine, config, "fake-model"), "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{port}"
        self.ready.set()
        try:
            await self.stop.wait()
        finally:
            await runner.cleanup()

    def __enter__(self) -> ServerThread:  # noqa: PYI034 - Self needs Python 3.11
        self.thread.start()
        assert self.ready.wait(30), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread() as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server: ServerThread):
    doc = requests.get(server.base + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    return schemathesis.openapi.from_dict(doc)


def test_openapi_document_lists_every_route(schema) -> None:
    labels = {op.ok().label for op in schema.get_all_operations()}
    assert labels == {
        "POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize",
        "POST /detokenize", "GET /v1/models", "GET /v1/models/{model_id}", "GET /health", "GET /version", "GET /metrics",
        "GET /v1/scheduler", "GET /openapi.json",
    }


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_get_no_5xx_and_documented_responses(server, schema, mode) -> None:
    session = requests.Session()
    operations = [op.ok() for op in schema.get_all_operations()]
    if mode is GenerationMode.NEGATIVE:  # GET routes take no input to corrupt
        operations = [op for op in operations if op.method.upper() == "POST"]
    strategy = st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations))
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    seen: set[str] = set()
    statuses: set[int] = set()

    @settings(max_examples=EXAMPLES * len(operations), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case) -> None:
        seen.add(case.operation.label)
        response = case.call(base_url=server.base, session=session, timeout=30)
        statuses.add(response.status_code)
        case.validate_response(response, checks=checks)

    run()
    session.close()
    assert len(seen) == len(operations)  # every route was exercised
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses  # the fuzzer got past validation, too
    assert any(400 <= s < 500 for s in statuses)
    health = requests.get(server.base + "/health", timeout=10)
    assert health.status_code == 200
