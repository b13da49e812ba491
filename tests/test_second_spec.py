"""The runtime is generic: a spec of a different API (query and header inputs, other paths, apikey
and basic auth, a template, named outputs) is served by the same code, through the real CLI.

The upstream here is not GoatCounter but a small echo API on a real socket that reports what it
received, which is exactly what this test needs to see.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from .support import SERVE, clean_env, running

SECOND_SPEC = """\
naftiko: 1.0.0-alpha2
info:
  label: Notes API
  description: A second capability, to prove nothing about GoatCounter is hard-coded.
binds:
- namespace: secrets
  keys:
    NOTES_KEY: NOTES_API_KEY
    NOTES_PASSWORD: NOTES_PASSWORD
capability:
  consumes:
  - type: http
    namespace: notes
    baseUri: https://notes.invalid/api
    authentication:
      type: apikey
      key: X-Api-Key
      value: '{{secrets.NOTES_KEY}}'
      placement: header
    resources:
    - name: item-notes
      path: /items/{{itemId}}/notes
      operations:
      - name: list-notes
        method: GET
        inputParameters:
        - {name: itemId, in: path}
        - {name: limit, in: query}
        - {name: X-Trace, in: header}
        - {name: source, in: query, value: 'capability-{{secrets.NOTES_KEY}}-never'}
  - type: http
    namespace: archive
    baseUri: https://archive.invalid
    authentication:
      type: basic
      username: reader
      password: '{{secrets.NOTES_PASSWORD}}'
    resources:
    - name: archive-search
      path: /search
      operations:
      - name: search
        method: POST
        inputParameters:
        - {name: query, in: body}
  exposes:
  - type: rest
    namespace: notes-rest
    port: 8181
    resources:
    - path: /things/{item}/notes
      name: thing-notes
      inputParameters:
      - {name: item, in: path, type: integer, description: Item number.}
      - {name: limit, in: query, type: integer, description: Page size.}
      - {name: trace, in: header, type: string, description: Trace id.}
      operations:
      - method: GET
        name: get-notes
        call: notes.list-notes
        with:
          itemId: notes-rest.item
          limit: rest.limit
          X-Trace: '{{rest.trace}}-via-template'
        outputParameters:
        - {name: seen_path, type: string, mapping: $.path}
        - {name: seen_query, type: object, mapping: $.query}
    - path: /search
      name: search
      operations:
      - method: POST
        name: search
        call: archive.search
        with:
          query: rest.body
        inputParameters:
        - {name: body, in: body, type: object, description: Search request.}
  - type: mcp
    namespace: notes-mcp
    port: 9191
    description: Notes for agents.
    tools:
    - name: list-notes
      description: List an item's notes.
      call: notes.list-notes
      with:
        itemId: tools.item
        limit: tools.limit
      inputParameters:
      - {name: item, type: integer, description: Item number.}
      - {name: limit, type: integer, description: Page size., required: false}
      hints: {readOnly: true, idempotent: true, openWorld: false}
      outputParameters:
      - {name: seen_path, type: string, mapping: $.path}
"""


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        parts = urlsplit(self.path)
        body = {
            "method": self.command,
            "path": parts.path,
            "query": dict(parse_qsl(parts.query)),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": json.loads(self.rfile.read(length)) if length else None,
        }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_second_spec_is_served_by_the_same_runtime(echo: str, tmp_path: Path) -> None:
    spec = tmp_path / "notes.yaml"
    spec.write_text(SECOND_SPEC)
    env = clean_env(
        NOTES_API_KEY="notes-key-123",
        NOTES_PASSWORD="pw-456",
        NOTES_URL=echo + "/api",  # the generic <NAMESPACE>_URL override
        ARCHIVE_URL=echo,
    )
    with running([*SERVE, "--spec", str(spec)], env) as service:
        notes = httpx.get(f"{service.rest}/things/42/notes?limit=5", headers={"trace": "t-1"}, timeout=30)
        search = httpx.post(f"{service.rest}/search", json={"q": "goats"}, timeout=30)
        bad = httpx.get(f"{service.rest}/things/x/notes", timeout=30)
        openapi = httpx.get(f"{service.rest}/openapi.json", timeout=30).json()

    assert notes.status_code == 200, notes.text
    assert notes.json() == {
        "seen_path": "/api/items/42/notes",
        "seen_query": {"limit": "5", "source": "capability-notes-key-123-never"},
    }
    assert search.status_code == 200
    seen = search.json()
    assert seen["method"] == "POST" and seen["path"] == "/search"
    assert seen["body"] == {"q": "goats"}
    assert seen["headers"]["authorization"] == "Basic " + base64.b64encode(b"reader:pw-456").decode()
    assert seen["headers"]["content-type"] == "application/json"
    assert bad.status_code == 400 and bad.json()["field"] == "item"
    assert set(openapi["paths"]) == {"/things/{item}/notes", "/search"}
    params = {p["name"]: p for p in openapi["paths"]["/things/{item}/notes"]["get"]["parameters"]}
    assert params["limit"]["in"] == "query" and params["trace"]["in"] == "header"


def test_second_spec_header_and_apikey_reach_the_upstream(echo: str, tmp_path: Path) -> None:
    spec = tmp_path / "notes.yaml"
    spec.write_text(SECOND_SPEC.replace("mapping: $.path}", "mapping: $.headers}"))
    env = clean_env(NOTES_API_KEY="notes-key-123", NOTES_PASSWORD="pw", NOTES_URL=echo + "/api", ARCHIVE_URL=echo)
    with running([*SERVE, "--spec", str(spec)], env) as service:
        response = httpx.get(f"{service.rest}/things/7/notes", headers={"trace": "abc"}, timeout=30)
    headers = response.json()["seen_path"]
    assert headers["x-api-key"] == "notes-key-123"
    assert headers["x-trace"] == "abc-via-template"


def test_second_spec_tools_are_served_over_mcp_by_the_generic_runtime(echo: str, tmp_path: Path) -> None:
    import asyncio

    from mcp import Client

    spec = tmp_path / "notes.yaml"
    spec.write_text(SECOND_SPEC)
    env = clean_env(NOTES_API_KEY="notes-key-123", NOTES_PASSWORD="pw", NOTES_URL=echo + "/api", ARCHIVE_URL=echo)

    async def scenario(url: str) -> tuple[object, object, object]:
        async with Client(url) as client:
            tools = (await client.list_tools()).tools
            result = await client.call_tool("list-notes", {"item": 9, "limit": 3})
            bad = await client.call_tool("list-notes", {"item": "nine"})
            return tools, result, bad

    with running([*SERVE, "--spec", str(spec)], env) as service:
        tools, result, bad = asyncio.run(scenario(service.mcp))
    (tool,) = tools  # type: ignore[misc]  # no GoatCounter tools for a capability that is not GoatCounter's
    assert tool.name == "list-notes"
    assert tool.input_schema["required"] == ["item"]
    assert tool.annotations.read_only_hint is True and tool.annotations.open_world_hint is False
    assert result.structured_content == {"seen_path": "/api/items/9/notes"}  # type: ignore[attr-defined]
    assert bad.is_error  # type: ignore[attr-defined]
