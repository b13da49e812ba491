"""How the GoatCounter export operations answer as tools: summaries, CSV pages, and advice on errors.

A model should never receive a whole export: `download-export` returns one page
of rows (an embedded text/csv resource) with the totals needed to ask for the next.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from ..errors import ApiError, ExportError
from ..outcome import EmbeddedText, Outcome, ToolSchema, read_answer
from ..spec.resolve import Binding
from . import exports

if TYPE_CHECKING:
    from ..runtime import Runtime


def nullable(json_type: str) -> dict[str, Any]:
    """A nullable field spelt with `anyOf`, which single-type schema dialects map better than a type array."""
    return {"anyOf": [{"type": json_type}, {"type": "null"}]}


EXPORT_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "state": {"type": "string", "enum": ["running", "finished", "failed"]},
        "start_from_hit_id": nullable("integer"),
        "last_hit_id": {**nullable("integer"), "description": "Pass as start_from_hit_id next time."},
        "created_at": nullable("string"),
        "finished_at": nullable("string"),
        "num_rows": nullable("integer"),
        "size": {**nullable("string"), "description": "MB, as text"},
        "hash": nullable("string"),
        "error": nullable("string"),
    },
    "required": ["id", "state"],
}
PAGE_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "export_id": {"type": "integer"},
        "ready": {"type": "boolean", "description": "false while GoatCounter is still writing the file"},
        "message": {"type": "string"},
        "columns": {"type": "array", "items": {"type": "string"}},
        "offset": {"type": "integer"},
        "rows_returned": {"type": "integer"},
        "total_rows": {"type": "integer"},
        "has_more": {"type": "boolean"},
        "next_offset": nullable("integer"),
        "hash_ok": {**nullable("boolean"), "description": "SHA-256 of the file matched the export's hash"},
        "format_version": {"type": "string"},
    },
    "required": ["export_id", "ready"],
}
PAGE_ARGUMENTS: dict[str, Any] = {
    "offset": {"type": "integer", "minimum": 0, "default": 0, "description": "First row to return (0-based)."},
    "limit": {
        "type": "integer",
        "minimum": 1,
        "maximum": exports.MAX_PAGE_ROWS,
        "default": exports.DEFAULT_PAGE_ROWS,
        "description": f"Rows to return (default {exports.DEFAULT_PAGE_ROWS}, at most {exports.MAX_PAGE_ROWS}).",
    },
}


def tool_schema(binding: Binding) -> ToolSchema | None:
    shape = exports.export_shape(binding.target)
    if shape == "download":
        return ToolSchema(PAGE_ARGUMENTS, PAGE_OUTPUT)
    if shape in ("create", "get"):
        return ToolSchema({}, EXPORT_OUTPUT)
    return None


def export_structure(export: dict[str, Any]) -> dict[str, Any]:
    keep = EXPORT_OUTPUT["properties"]
    return {**{k: v for k, v in export.items() if k in keep}, "state": exports.state(export)}


async def run_tool(
    runtime: Runtime, binding: Binding, inputs: dict[str, Any], extras: dict[str, Any]
) -> Outcome | None:
    shape = exports.export_shape(binding.target)
    if shape in ("create", "get"):
        async with runtime.call(binding, inputs) as response:
            export = await read_answer(response)
        if not isinstance(export, dict) or "id" not in export:
            raise ExportError("GoatCounter did not answer with an export")
        return Outcome(exports.summarize(export), export_structure(export))
    if shape == "download":
        inputs = runtime.validate(binding, inputs)
        export_id = int(runtime.resolve_with(binding, inputs)["id"])
        ops = exports.find_ops(runtime, binding.target.consumes.namespace)
        export = await exports.get_export(runtime, ops, export_id)
        offset = int(extras.get("offset", 0))
        limit = int(extras.get("limit", exports.DEFAULT_PAGE_ROWS))
        page = await exports.read_page(runtime, ops, export, offset, limit)
        if isinstance(page, exports.NotReady):
            text = f"Export {export_id} is {page.message}. Wait a few seconds, then call download-export again."
            return Outcome(text, {"export_id": export_id, "ready": False, "message": page.message})
        return page_outcome(page)
    return None


def page_outcome(page: exports.CsvPage) -> Outcome:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(page.columns)
    writer.writerows(page.rows)
    end = page.offset + len(page.rows)
    integrity = {True: "SHA-256 verified", False: "SHA-256 MISMATCH: do not trust this file", None: "no hash to check"}
    text = (
        f"Export {page.export_id}: rows {page.offset}..{max(end - 1, page.offset)} of {page.total_rows} "
        f"({len(page.rows)} returned; {integrity[page.hash_ok]}). "
        + (f"Call again with offset={page.next_offset} for more." if page.has_more else "No more rows.")
    )
    structured = {
        "export_id": page.export_id,
        "ready": True,
        "columns": page.columns,
        "offset": page.offset,
        "rows_returned": len(page.rows),
        "total_rows": page.total_rows,
        "has_more": page.has_more,
        "next_offset": page.next_offset,
        "hash_ok": page.hash_ok,
        "format_version": page.version,
    }
    uri = f"goatcounter-export://{page.export_id}/rows?offset={page.offset}&limit={len(page.rows)}"
    return Outcome(text, structured, EmbeddedText(uri, "text/csv", buffer.getvalue()), is_error=page.hash_ok is False)


def explain_error(error: ApiError) -> str:
    advice = {
        401: "The GoatCounter API key was refused. Check GOATCOUNTER_API_KEY (Settings > API in GoatCounter).",
        403: "The API key lacks the 'export' permission. Create a key with export permission in GoatCounter.",
        404: "There is no such export on this site. Create one with create-csv-export.",
        429: "GoatCounter is rate limiting: "
        + (f"wait {error.retry_after:.0f} seconds before trying again." if error.retry_after else "wait, then retry.")
        + " Creating exports is allowed once an hour.",
    }.get(error.status)
    if error.status == 400 and "deleted" in error.message:
        advice = "Export files are kept 24 hours; create a new export."
    text = f"GoatCounter answered {error.status}: {error.message}."
    return f"{text} {advice}" if advice else text
