"""The fast tier: the app built in process by the composition root, over the real GoatCounter test bed.

REST through httpx's ASGI transport, MCP through the SDK's in-memory client: no subprocess, no
ports of ours, the same `build_app` the CLI uses. Run alone with `pytest -m fast`.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from goatcounter_exports.app import App, build_app
from goatcounter_exports.errors import IntegrityError
from goatcounter_exports.settings import Settings
from goatcounter_exports.spec import load_default
from goatcounter_exports.testbed import LocalGoatCounter
from mcp import Client

from .conftest import SEEDED_PATHS
from .support import RecordingProxy, poll_export_async

pytestmark = pytest.mark.fast

KEY = "GOATCOUNTER_API_KEY"


def settings_for(site_url: str, key: str, state_dir: Path) -> Settings:
    return Settings(site_url=site_url, secrets={KEY: key}, state_dir=state_dir)


@asynccontextmanager
async def rest_client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with app:
        transport = httpx.ASGITransport(app=app.rest_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080", timeout=30) as client:
            yield client


@pytest.fixture(scope="module")
def finished(goatcounter: LocalGoatCounter, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One finished export of every seeded pageview, made through the in-process REST app."""

    async def scenario() -> dict[str, Any]:
        app = build_app(
            load_default(), settings_for(goatcounter.url, goatcounter.export_key, tmp_path_factory.mktemp("s"))
        )
        async with rest_client(app) as client:
            created = await client.post("/v1/export", json={})
            assert created.status_code == 202, created.text
            return await poll_export_async(client, int(created.json()["id"]))

    return asyncio.run(scenario())


@pytest.fixture
def app(goatcounter: LocalGoatCounter, tmp_path: Path) -> Iterator[App]:
    yield build_app(load_default(), settings_for(goatcounter.url, goatcounter.export_key, tmp_path))


def test_rest_download_is_goatcounters_file_and_its_csv(app: App, finished: dict[str, Any]) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with rest_client(app) as client:
            url = f"/v1/export/{finished['id']}/download"
            return await client.get(url), await client.get(url, headers={"Accept": "text/csv"})

    gz, plain = asyncio.run(scenario())
    assert gz.status_code == 200 and gz.headers["content-type"] == "application/gzip"
    assert finished["hash"] == "sha256-" + hashlib.sha256(gz.content).hexdigest()
    assert plain.headers["content-type"].startswith("text/csv")
    assert gzip.decompress(gz.content) == plain.content
    rows = list(csv.reader(io.StringIO(plain.text)))
    assert rows[0][0] == "2Path" and Counter(r[0] for r in rows[1:]) == Counter(SEEDED_PATHS)


def test_rest_refuses_bad_input_before_any_upstream_call(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with RecordingProxy(goatcounter.url) as proxy:
        app = build_app(load_default(), settings_for(proxy.url, goatcounter.export_key, tmp_path))

        async def scenario() -> list[httpx.Response]:
            async with rest_client(app) as client:
                return [
                    await client.get("/v1/export/0"),
                    await client.get("/v1/export/abc/download"),
                    await client.post("/v1/export", json={"start_from_hit_id": -1}),
                    await client.post("/v1/export", json={"unknown": 1}),
                ]

        answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [400, 400, 400, 400]
    assert all("error" in a.json() for a in answers)
    assert proxy.requests == []


def test_openapi_document_names_the_routes_and_goatcounters_answers(app: App) -> None:
    async def scenario() -> dict[str, Any]:
        async with rest_client(app) as client:
            document: dict[str, Any] = (await client.get("/openapi.json")).json()
            return document

    document = asyncio.run(scenario())
    assert set(document["paths"]) == {"/v1/export", "/v1/export/{id}", "/v1/export/{id}/download"}
    assert "410" in document["paths"]["/v1/export/{id}/download"]["get"]["responses"]
    assert "Export" in document["components"]["schemas"]


def test_mcp_in_memory_pages_through_every_row(app: App, finished: dict[str, Any]) -> None:
    async def scenario() -> tuple[set[str], list[list[str]], dict[str, Any]]:
        rows: list[list[str]] = []
        async with app, Client(app.mcp_server()) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            offset: int | None = 0
            last: dict[str, Any] = {}
            while offset is not None:
                result = await client.call_tool("download-export", {"id": finished["id"], "offset": offset, "limit": 7})
                assert not result.is_error, result.content
                last = dict(result.structured_content or {})
                page = list(csv.reader(io.StringIO(result.content[1].resource.text)))  # type: ignore[union-attr]
                rows.extend(page[1:])
                offset = last["next_offset"]
        return names, rows, last

    names, rows, last = asyncio.run(scenario())
    assert {"create-csv-export", "get-export-info", "download-export", "export-pageviews", "pageview-stats"} == names
    assert Counter(row[0] for row in rows) == Counter(SEEDED_PATHS)
    assert last["hash_ok"] is True and last["total_rows"] == len(SEEDED_PATHS)


def test_mcp_arguments_are_checked_once_against_the_published_schema(app: App) -> None:
    async def scenario() -> list[Any]:
        async with app, Client(app.mcp_server()) as client:
            return [
                await client.call_tool("get-export-info", {"id": 0}),
                await client.call_tool("download-export", {"id": 1, "limit": 5000}),
                await client.call_tool("create-csv-export", {"start_from_hit_id": 1, "body": {"start_from_hit_id": 2}}),
                await client.call_tool("create-csv-export", {"start_from_hit_id": 1.0}),
            ]

    results = asyncio.run(scenario())
    assert all(r.is_error for r in results)
    texts = [r.content[0].text for r in results]
    assert texts[0].startswith("Invalid arguments: id:") and "Nothing was sent" in texts[0]
    assert "limit" in texts[1]
    assert "unexpected input: 'body'" in texts[2]  # the body's fields are the arguments
    assert "must be of type integer" in texts[3]


def test_a_tampered_file_is_an_error_for_every_reader(goatcounter: LocalGoatCounter, app: App) -> None:
    """One integrity policy: the MCP page, REST and the reader itself all refuse a file that does not match."""
    start = goatcounter.max_hit_id() - 3  # a range of its own, so the stored file's name is its own too
    created = goatcounter.request(
        "POST", "/api/v0/export", key=goatcounter.export_key, body={"start_from_hit_id": start}
    ).json()

    async def scenario() -> tuple[Any, int, BaseException | None]:
        async with app:
            reader = app.goatcounter["goatcounter-exports"].reader
            export = await reader.get(created["id"])
            while export.status == "running":
                await asyncio.sleep(0.2)
                export = await reader.get(created["id"])
            (stored,) = [p for p in goatcounter.export_dir.glob("*.csv.gz") if p.name.endswith(f"-{start}.csv.gz")]
            stored.write_bytes(gzip.compress(b"2Path,Title\n/forged,x\n"))
            failure: BaseException | None = None
            try:
                await reader.page(export, 0, 10)
            except IntegrityError as exc:
                failure = exc
            async with Client(app.mcp_server()) as client:
                page = await client.call_tool("download-export", {"id": export.id})
            transport = httpx.ASGITransport(app=app.rest_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                received = 0
                try:
                    async with client.stream("GET", f"/v1/export/{export.id}/download") as response:
                        async for chunk in response.aiter_raw():
                            received += len(chunk)
                except IntegrityError:
                    pass  # in process, the cut-off stream surfaces as the error itself
            return page, received, failure

    page, received, failure = asyncio.run(scenario())
    assert isinstance(failure, IntegrityError) and "does not match" in str(failure)
    assert page.is_error and "does not match" in page.content[0].text
    assert received == 0  # the file is one chunk, held back until its hash is checked: nothing goes out
