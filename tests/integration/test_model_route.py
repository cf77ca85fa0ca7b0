"""GET /v1/models/{id}: the model's card for its id, OpenAI's 404 for any other."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from engine.config import ServerConfig
from engine.server import build_app, start_http
from engine.server.testing import FakeEngine


@pytest.mark.parametrize("model", ["fake-model", "org/fake-model"])
async def test_retrieve_gives_the_card_and_an_unknown_id_is_404(model):
    engine = FakeEngine()
    runner, port = await start_http(build_app(engine, ServerConfig(), model), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    try:
        card = await client.models.retrieve(model)
        assert (card.id, card.object, card.owned_by) == (model, "model", "fastserve")
        listed = await client.models.list()
        assert listed.data[0].model_dump() == card.model_dump()
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("other-model")
        async with aiohttp.ClientSession() as s, s.get(base + "/v1/models/other") as r:
            body = await r.json()
        assert r.status == 404 and body["error"]["code"] == "model_not_found"
        assert body["error"]["param"] == "model"
    finally:
        await client.close()
        await runner.cleanup()
