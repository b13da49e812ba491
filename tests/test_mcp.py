"""The MCP adapter through real clients: the SDK's client over streamable HTTP and stdio, raw HTTP for
protocol versions and DNS-rebinding checks, against the real GoatCounter test bed."""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from goatcounter_exports.testbed import LocalGoatCounter
from mcp import Client, StdioServerParameters

from .conftest import SEEDED_PATHS, service_env
from .support import SERVE, RecordingProxy, Service, call_tool, goatcounter_binary, running

TOKEN = "an-inbound-token-for-tests-0123"
SEED_TOOLS = {"create-csv-export", "get-export-info", "download-export"}
EXPECTED_TOOLS = {*SEED_TOOLS, "export-pageviews", "pageview-stats"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


async def export_all_rows(client: Client, page: int = 7) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    """What an agent does: create, poll until finished, page through the rows."""
    created = await client.call_tool("create-csv-export", {})
    assert not created.is_error, text_of(created)
    export_id = created.structured_content["id"]
    for _ in range(100):
        info = await client.call_tool("get-export-info", {"id": export_id})
        assert not info.is_error, text_of(info)
        if info.structured_content["state"] == "finished":
            break
        assert info.structured_content["state"] == "running"
        await asyncio.sleep(0.3)
    else:
        raise AssertionError("export did not finish")
    assert "start_from_hit_id=" in text_of(info)  # the cursor for the next incremental export
    columns: list[str] = []
    rows: list[list[str]] = []
    offset: int | None = 0
    last: dict[str, Any] = {}
    while offset is not None:
        result = await client.call_tool("download-export", {"id": export_id, "offset": offset, "limit": page})
        assert not result.is_error, text_of(result)
        last = result.structured_content
        assert last["ready"] is True and last["hash_ok"] is True
        assert last["rows_returned"] <= page
        resource = next(block for block in result.content if block.type == "resource")
        assert resource.resource.mime_type == "text/csv"
        parsed = list(csv.reader(io.StringIO(resource.resource.text)))
        columns = parsed[0]
        rows.extend(parsed[1:])
        offset = last["next_offset"]
    return columns, rows, last


def check_tools(tools: list[Any]) -> None:
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == EXPECTED_TOOLS
    for name in ("get-export-info", "download-export"):
        schema = by_name[name].input_schema
        assert schema["properties"]["id"]["type"] == "integer" and schema["required"] == ["id"]
        assert by_name[name].annotations.read_only_hint is True
        assert by_name[name].annotations.idempotent_hint is True
    create = by_name["create-csv-export"]
    assert create.input_schema["properties"]["start_from_hit_id"]["type"] == "integer"
    assert "body" not in create.input_schema["properties"]  # its fields are arguments of their own
    assert "one export an hour" in create.description and "exclusive" in create.description
    assert create.annotations.read_only_hint is False and create.annotations.destructive_hint is False
    assert all(by_name[name].annotations.open_world_hint is True for name in SEED_TOOLS)
    assert all(tool.output_schema and tool.description for tool in tools)
    assert by_name["pageview-stats"].annotations.read_only_hint is True
    assert by_name["pageview-stats"].annotations.open_world_hint is False  # local data only
    assert set(by_name["download-export"].input_schema["properties"]) == {"id", "offset", "limit", "table"}


def test_sdk_client_over_http_exports_and_pages_through_the_seeded_pageviews(service: Service) -> None:
    async def scenario() -> None:
        async with Client(service.mcp) as client:
            check_tools((await client.list_tools()).tools)
            columns, rows, last = await export_all_rows(client)
        assert columns[0] == "Path"
        assert last["format_version"] == "2" and last["total_rows"] == len(SEEDED_PATHS)
        assert Counter(row[0] for row in rows) == Counter(SEEDED_PATHS)

    asyncio.run(scenario())


def test_sdk_client_over_stdio(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path)
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "goatcounter_exports", "mcp", "--stdio"], env=env
    )

    async def scenario() -> None:
        async with Client(params) as client:
            check_tools((await client.list_tools()).tools)
            _, rows, _ = await export_all_rows(client, page=50)
        assert Counter(row[0] for row in rows) == Counter(SEEDED_PATHS)

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_sdk_client_modes(service: Service, mode: str) -> None:
    async def scenario() -> str:
        async with Client(service.mcp, mode=mode) as client:
            check_tools((await client.list_tools()).tools)
            return client.protocol_version

    version = asyncio.run(scenario())
    assert version == ("2026-07-28" if mode != "legacy" else "2025-11-25")


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
def test_handshake_versions_desktop_clients_speak(service: Service, version: str) -> None:
    body = {**INIT, "params": {**INIT["params"], "protocolVersion": version}}  # type: ignore[dict-item]
    response = httpx.post(service.mcp, json=body, headers=MCP_HEADERS, timeout=30)
    assert response.status_code == 200
    assert f'"protocolVersion":"{version}"' in response.text.replace(" ", "")


def test_dns_rebinding_protection_on_loopback(service: Service) -> None:
    body = {**INIT, "params": {**INIT["params"], "protocolVersion": "2025-06-18"}}  # type: ignore[dict-item]
    bad_host = httpx.post(service.mcp, json=body, headers={**MCP_HEADERS, "Host": "evil.example:80"}, timeout=30)
    bad_origin = httpx.post(
        service.mcp, json=body, headers={**MCP_HEADERS, "Origin": "http://evil.example"}, timeout=30
    )
    assert bad_host.status_code == 421
    assert bad_origin.status_code == 403


def test_dns_rebinding_protection_when_bound_to_all_interfaces(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    # A network bind needs inbound authentication; with the token, Host is still checked.
    env = service_env(
        goatcounter,
        tmp_path,
        GOATCOUNTER_EXPORTS_ALLOWED_HOSTS="analytics.internal",
        GOATCOUNTER_EXPORTS_AUTH_TOKEN=TOKEN,
    )
    args = [*SERVE, "--host", "0.0.0.0", "--allowed-host", "stats.internal"]
    with running(args, env, want=("REST", "MCP")) as service:
        port = service.mcp.split(":")[2].split("/")[0]
        url = f"http://127.0.0.1:{port}/mcp"
        body = {**INIT, "params": {**INIT["params"], "protocolVersion": "2025-06-18"}}  # type: ignore[dict-item]

        def status(host: str) -> int:
            headers = {**MCP_HEADERS, "Host": host, "Authorization": f"Bearer {TOKEN}"}
            return httpx.post(url, json=body, headers=headers, timeout=30).status_code

        evil = status("evil.example")
        from_flag = status(f"stats.internal:{port}")
    assert evil == 421
    assert from_flag == 200
    env_only = service_env(goatcounter, tmp_path, GOATCOUNTER_EXPORTS_ALLOWED_HOSTS="analytics.internal")
    with running([*SERVE, "--host", "0.0.0.0", "--insecure-no-auth"], env_only, want=("REST", "MCP")) as service:
        port = service.mcp.split(":")[2].split("/")[0]
        answer = httpx.post(
            f"http://127.0.0.1:{port}/mcp",
            json=body,
            headers={**MCP_HEADERS, "Host": f"analytics.internal:{port}"},
            timeout=30,
        )
    assert answer.status_code == 200


@pytest.mark.parametrize(
    "arguments",
    [{"id": "seven"}, {"id": 0}, {"id": 2**31}, {}, {"id": 1, "limit": 0}, {"id": 1, "offset": -1}, {"id": 1, "x": 1}],
)
def test_bad_arguments_are_errors_without_upstream_call(
    goatcounter: LocalGoatCounter, tmp_path: Path, arguments: dict[str, Any]
) -> None:
    with RecordingProxy(goatcounter.url) as proxy:
        env = service_env(goatcounter, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env, want=("REST", "MCP")) as service:
            proxy.requests.clear()  # serve's checks at start (GET /status, the key) are not the call's
            result = call_tool(service.mcp, "download-export", arguments)
    assert result.is_error
    assert "Invalid arguments" in text_of(result)
    assert proxy.requests == []


def test_bad_create_arguments_spend_nothing(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with RecordingProxy(goatcounter.url) as proxy:
        env = service_env(goatcounter, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env, want=("REST", "MCP")) as service:
            results = [
                call_tool(service.mcp, "create-csv-export", {"start_from_hit_id": "x"}),
                call_tool(service.mcp, "create-csv-export", {"body": {"unknown": 1}}),
                call_tool(service.mcp, "create-csv-export", {"start_from_hit_id": 3, "body": {"start_from_hit_id": 4}}),
            ]
    assert all(r.is_error for r in results), [text_of(r) for r in results]
    assert proxy.paths("POST") == []


def test_unknown_export_is_an_error_with_advice(service: Service) -> None:
    result = call_tool(service.mcp, "get-export-info", {"id": 424242})
    assert result.is_error
    assert "404" in text_of(result) and "not found" in text_of(result) and "create-csv-export" in text_of(result)


def test_bad_key_and_missing_permission_are_errors_with_advice(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    for key, status, words in (
        ("wrong-key-xyz", "401", "GOATCOUNTER_API_KEY"),
        (goatcounter.noexport_key, "403", "export"),
    ):
        env = service_env(goatcounter, tmp_path, key=key)
        with running(SERVE, env, want=("REST", "MCP")) as service:
            result = call_tool(service.mcp, "get-export-info", {"id": 1})
            output = service.output()
        assert result.is_error
        assert status in text_of(result) and words in text_of(result)
        assert key not in text_of(result) and key not in output


def test_download_before_finished_is_a_normal_result_and_a_deleted_file_an_error(tmp_path: Path) -> None:

    async def scenario(url: str) -> tuple[Any, Any, Any]:
        async with Client(url) as client:
            created = await client.call_tool("create-csv-export", {})
            export_id = created.structured_content["id"]
            early = await client.call_tool("download-export", {"id": export_id})
            for _ in range(100):
                info = await client.call_tool("get-export-info", {"id": export_id})
                if info.structured_content["state"] == "finished":
                    break
                await asyncio.sleep(0.3)
            for stored in big.export_dir.glob("*.csv.gz"):
                stored.unlink()  # as GoatCounter's clean-up does after a day
            gone = await client.call_tool("download-export", {"id": export_id})
            return early, info, gone

    with LocalGoatCounter(goatcounter_binary(), tmp_path / "big") as big:
        big.seed([f"/bulk-{i}" for i in range(10_200)])  # three batches: GoatCounter pauses 0.5 s after each full one
        with running(SERVE, service_env(big, tmp_path / "state")) as service:
            early, info, gone = asyncio.run(scenario(service.mcp))
    assert not early.is_error
    assert early.structured_content["ready"] is False and "still being generated" in text_of(early)
    assert info.structured_content["state"] == "finished"
    assert gone.is_error
    assert "kept for 24 hours" in text_of(gone) and "create a new export" in text_of(gone)
