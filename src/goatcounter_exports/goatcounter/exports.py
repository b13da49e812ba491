"""The GoatCounter export operations as the workflows need them: find, describe, page through.

The three consumed operations are recognised by their shape (POST /export,
GET /export/{id}, GET /export/{id}/download) in the spec, so a renamed
operation still works, and calls go through the runtime like any other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..errors import ApiError, ExportError, SpecError
from ..outcome import read_answer
from ..runtime import Runtime
from ..spec.expressions import path_placeholders
from ..spec.resolve import Target
from ..upstream import UpstreamResponse
from .csvfile import hash_matches, iter_records, split_header

DEFAULT_PAGE_ROWS = 100
MAX_PAGE_ROWS = 1000


@dataclass(frozen=True)
class ExportOps:
    create: Target
    get: Target
    download: Target


def export_shape(target: Target) -> str | None:
    """ "create", "get" or "download" for the export operations; None for anything else."""
    path = target.path.rstrip("/")
    if target.method == "POST" and path.endswith("/export"):
        return "create"
    if target.method == "GET" and path.endswith("/download") and path_placeholders(path):
        return "download"
    if target.method == "GET" and path_placeholders(path) and path.rsplit("/", 2)[-2] == "export":
        return "get"
    return None


def find_ops(runtime: Runtime, namespace: str) -> ExportOps:
    found: dict[str, Target] = {}
    for ref, target in runtime.resolution.targets.items():
        if target.consumes.namespace == namespace and ref.count(".") == 1:
            shape = export_shape(target)
            if shape:
                found.setdefault(shape, target)
    missing = {"create", "get", "download"} - set(found)
    if missing:
        raise SpecError(f"the capability lacks the GoatCounter export operation(s): {', '.join(sorted(missing))}")
    return ExportOps(found["create"], found["get"], found["download"])


def id_values(target: Target, export_id: int) -> dict[str, Any]:
    return {name: export_id for name in path_placeholders(target.path)}


def state(export: dict[str, Any]) -> str:
    if export.get("error"):
        return "failed"
    return "finished" if export.get("finished_at") else "running"


def summarize(export: dict[str, Any]) -> str:
    """A few lines a model can act on: state, size, and the cursor for the next incremental export."""
    export_id = export.get("id")
    current = state(export)
    if current == "failed":
        return f"Export {export_id} failed: {export['error']}. Create a new export to try again."
    if current == "running":
        since = export.get("start_from_hit_id") or 0
        return (
            f"Export {export_id} is running (pageviews after hit {since}). "
            "Call get-export-info again in a few seconds until it is finished."
        )
    return (
        f"Export {export_id} is finished: {export.get('num_rows')} rows, {export.get('size')} MB "
        f"(hits {export.get('start_from_hit_id')} < id <= {export.get('last_hit_id')}). "
        f"Read it with download-export. Next incremental export: start_from_hit_id={export.get('last_hit_id')}."
    )


async def get_export(runtime: Runtime, ops: ExportOps, export_id: int) -> dict[str, Any]:
    async with runtime.call_target(ops.get, id_values(ops.get, export_id)) as response:
        document = await read_answer(response)
    if not isinstance(document, dict):
        raise ExportError(f"GoatCounter answered something other than an export for id {export_id}")
    return document


async def refusal(response: UpstreamResponse, default: str = "the export file is not ready") -> ApiError:
    """Why a download answered something other than the file: GoatCounter's message (raises for 4xx)."""
    document = await read_answer(response)
    message = document.get("error") if isinstance(document, dict) else None
    return ApiError(response.status, str(message or default))


@dataclass(frozen=True)
class CsvPage:
    export_id: int
    version: str
    columns: list[str]
    rows: list[list[str]]
    offset: int
    total_rows: int
    hash_ok: bool | None

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.rows) < self.total_rows

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.rows) if self.has_more else None


@dataclass(frozen=True)
class NotReady:
    export_id: int
    message: str


async def read_page(
    runtime: Runtime, ops: ExportOps, export: dict[str, Any], offset: int, limit: int
) -> CsvPage | NotReady:
    """Stream the export file once: hash all of it, count every row, keep rows [offset, offset+limit)."""
    export_id = int(export["id"])
    if state(export) == "failed":
        raise ExportError(f"export {export_id} failed in GoatCounter: {export['error']}")
    if state(export) == "running":
        return NotReady(export_id, "still being generated")
    digest = hashlib.sha256()
    columns: list[str] = []
    version = ""
    rows: list[list[str]] = []
    total = 0
    async with runtime.call_target(ops.download, id_values(ops.download, export_id)) as response:
        if response.status != 200:
            ready_later = response.status == 202
            refused = await refusal(
                response, "still being generated" if ready_later else "unexpected answer to download"
            )
            if ready_later:
                return NotReady(export_id, refused.message)
            raise refused
        async for record in iter_records(response.chunks(), digest):
            if not columns:
                version, columns = split_header(record)
                continue
            if offset <= total < offset + limit:
                rows.append(record)
            total += 1
    if not columns:
        version, columns = "2", []  # an export of nothing: GoatCounter writes an empty file
    return CsvPage(
        export_id, version, columns, rows, offset, total, hash_matches(export.get("hash"), digest.hexdigest())
    )
