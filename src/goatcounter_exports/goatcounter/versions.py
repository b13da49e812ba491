"""Which create body a GoatCounter server wants, learnt without spending the hourly export budget.

v2.7.0 refuses a `format` field; main (goatcounter.com) requires it since commit
2026-04-25T18:35:22Z. A failed POST still spends the hour, so we ask first:
1. `GET /status` (no auth, no rate limit) gives the version: a release tag
   (`v2.7.0`), or `<12 hex>_<commit time>` for a build from a git checkout;
2. for `dev` (what `go install ...@v2.7.0` reports) and anything else,
   `GET /api.json` (no auth, no rate limit) lists `format` in the export
   request on main builds since 2026-06-21, and never on v2.7.0.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from ..errors import UpstreamProtocolError
from ..upstream import NOT_JSON, UpstreamRequest

API_PATH = "/api/v0"
FIRST_RELEASE_WITH_FORMAT = (2, 8, 0)
FORMAT_REQUIRED_SINCE = datetime(2026, 4, 25, 18, 35, 22, tzinfo=UTC)
TAG = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")
COMMIT_BUILD = re.compile(r"^[0-9a-f]{12}_(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})Z")

Fetch = Callable[[UpstreamRequest], Awaitable[tuple[int, Any]]]


def site_root(api_uri: str) -> str:
    return api_uri[: -len(API_PATH)] if api_uri.endswith(API_PATH) else api_uri


def format_from_version(version: str) -> bool | None:
    """True/False when the version string decides whether `format` is sent; None when it cannot."""
    tag = TAG.match(version)
    if tag:
        return tuple(int(part) for part in tag.groups()) >= FIRST_RELEASE_WITH_FORMAT
    commit = COMMIT_BUILD.match(version)
    if commit:
        return datetime.fromisoformat(commit.group(1)).replace(tzinfo=UTC) >= FORMAT_REQUIRED_SINCE
    return None


def format_from_api_doc(document: Any) -> bool:
    """Whether the server's own API document lists `format` in the export request."""
    if not isinstance(document, dict):
        return False
    definitions = document.get("definitions") or document.get("components", {}).get("schemas") or {}
    request = definitions.get("handlers.apiExportRequest") or {}
    return "format" in (request.get("properties") or {})


class CreateBodyStyle:
    """Per-server cache of 'does the create body take `format`', with the version that decided it."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[str, bool]] = {}
        self._lock = asyncio.Lock()

    async def learn(self, fetch: Fetch, api_uri: str) -> tuple[str, bool]:
        async with self._lock:
            if api_uri not in self._known:
                root = site_root(api_uri)
                status, body = await fetch(UpstreamRequest("GET", root + "/status"))
                if status != 200 or body is NOT_JSON or not isinstance(body.get("version"), str):
                    host = UpstreamRequest("GET", root).host
                    raise UpstreamProtocolError(f"{host} did not tell its version (GET /status: {status})", host=host)
                version = body["version"]
                decided = format_from_version(version)
                if decided is None:
                    status, document = await fetch(UpstreamRequest("GET", root + "/api.json"))
                    decided = status == 200 and format_from_api_doc(document)
                self._known[api_uri] = (version, decided)
            return self._known[api_uri]
