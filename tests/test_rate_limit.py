"""GoatCounter's own rate limits, kept at their defaults (one export an hour), on a dedicated instance."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from goatcounter_exports.goatcounter.local import LocalGoatCounter, find_binary
from mcp import Client

from .conftest import service_env
from .support import SERVE, Service, running


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalGoatCounter, Service]]:
    instance = LocalGoatCounter(find_binary(), tmp_path_factory.mktemp("limited"), ratelimit=None)
    with instance:
        instance.seed(["/a", "/b"])
        with running(SERVE, service_env(instance, tmp_path_factory.mktemp("state"))) as service:
            yield instance, service


def test_rest_passes_a_429_through_with_its_headers(limited: tuple[LocalGoatCounter, Service]) -> None:
    _, service = limited
    first = httpx.post(f"{service.rest}/v1/export", json={}, timeout=30)
    assert first.status_code == 202
    assert first.headers["x-rate-limit-limit"] == "1"
    second = httpx.post(f"{service.rest}/v1/export", json={}, timeout=30)
    assert second.status_code == 429
    assert 3500 <= int(second.headers["retry-after"]) <= 3600
    assert second.headers["x-rate-limit-remaining"] == "0"
    assert "rate limit" in second.json()["error"]


def test_mcp_429_is_an_error_that_says_how_long_to_wait(limited: tuple[LocalGoatCounter, Service]) -> None:
    _, service = limited

    async def scenario() -> str:
        async with Client(service.mcp) as client:
            await client.call_tool("create-csv-export", {})  # spends the hour, if the REST test did not
            result = await client.call_tool("create-csv-export", {})
            assert result.is_error
            return str(result.content[0].text)

    text = asyncio.run(scenario())
    assert "429" in text and "wait 3" in text and "seconds" in text
