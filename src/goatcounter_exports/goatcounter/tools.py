"""Every GoatCounter tool an MCP client sees: the home of a new one.

- The spec's three export tools, shaped: export objects come back structured with a summary
  (and why a CSV export is empty), and `download-export` returns one page of rows (an
  embedded text/csv resource) with the totals needed to ask for the next: of the CSV, or of
  one table of a JSON export. A model never receives a whole export, nor a ZIP's bytes.
- `export-pageviews`: the whole job in one call (create or reuse, wait with progress,
  download and verify), answered with totals, top paths and the first rows.
- `pageview-stats`: bounded questions over the local copy `sync` keeps, of this site only;
  no SQL from the model.

Arguments arrive checked against the schemas published here (adapters/mcp.py).
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..adapters.tools import (
    Annotations,
    EmbeddedText,
    Tool,
    ToolResult,
    annotations_of,
    binding_arguments,
    binding_inputs,
)
from ..errors import ApiError, ExportDeleted, GoatcounterExportsError, InputError
from ..progress import Progress, no_progress
from ..runtime import Runtime
from ..spec.resolve import Binding
from . import stats
from .exportfile import DEFAULT_PAGE_ROWS, DEFAULT_TABLE, JSON_TABLES, MAX_PAGE_ROWS, ExportReader, Page, split_header
from .exports import Export, ExportRequest, export_shape
from .profile import INT64_MAX
from .workflow import ExportJob

PREVIEW_ROWS = 20


def nullable(json_type: str) -> dict[str, Any]:
    """A nullable field spelt with `anyOf`, which single-type schema dialects map better than a type array."""
    return {"anyOf": [{"type": json_type}, {"type": "null"}]}


EXPORT_OBJECT_OUTPUT: dict[str, Any] = {
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
        "format": {"type": "string", "description": "csv (pageviews) or json (aggregate statistics, a ZIP)"},
        "note": {"type": "string", "description": "why a finished CSV export has no rows, and what to do"},
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
        "hash_ok": {
            **nullable("boolean"),
            "description": "true: the file's SHA-256 matched the export's hash (a mismatch is an error); "
            "null: GoatCounter gave no hash to check",
        },
        "format_version": {"type": "string", "description": "CSV format version, or the JSON export_version"},
        "table": {**nullable("string"), "description": "the JSON export's table these rows are of"},
        "tables": {
            "anyOf": [{"type": "object", "additionalProperties": {"type": "integer"}}, {"type": "null"}],
            "description": "a JSON export's tables and their row counts",
        },
        "note": {"type": "string", "description": "why there are no rows, and what to do"},
    },
    "required": ["export_id", "ready"],
}
PAGE_ARGUMENTS: dict[str, Any] = {
    "table": {
        "type": "string",
        "enum": list(JSON_TABLES),
        "description": f"JSON exports only: the table to page through (default {DEFAULT_TABLE}: visitors per hour, "
        "path and referrer). CSV exports have one table, their pageviews.",
    },
    "offset": {"type": "integer", "minimum": 0, "default": 0, "description": "First row to return (0-based)."},
    "limit": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_PAGE_ROWS,
        "default": DEFAULT_PAGE_ROWS,
        "description": f"Rows to return (default {DEFAULT_PAGE_ROWS}, at most {MAX_PAGE_ROWS}).",
    },
}
EXPORT_JOB_INPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "format": {
            "type": "string",
            "enum": ["auto", "csv", "json"],
            "default": "auto",
            "description": "csv: individual pageviews (needs the site's Individual pageviews setting); json: the "
            "dashboard's aggregate statistics (GoatCounter newer than v2.7.0); auto: json where the server has it.",
        },
        "start_from_hit_id": {
            "type": "integer",
            "minimum": 0,
            "maximum": INT64_MAX,
            "description": "Only pageviews after this hit id (the last_hit_id of a previous export). Default 0: all.",
        },
        "timeout_seconds": {"type": "integer", "minimum": 5, "maximum": 3600, "default": 300},
        "preview_rows": {"type": "integer", "minimum": 0, "maximum": 100, "default": PREVIEW_ROWS},
    },
    "additionalProperties": False,
}
EXPORT_JOB_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "export_id": {"type": "integer"},
        "format": {"type": "string"},
        "reused": {"type": "boolean"},
        "total_rows": {"type": "integer", "description": "CSV: pageviews; JSON: rows of hit_stats"},
        "total_visitors": {"type": "integer", "description": "JSON: visitors in all, as the dashboard counts"},
        "tables": {"type": "object", "additionalProperties": {"type": "integer"}},
        "note": {"type": "string"},
        "columns": {"type": "array", "items": {"type": "string"}},
        "start_from_hit_id": {"type": "integer"},
        "last_hit_id": {"type": "integer"},
        "hash_ok": {"type": "boolean"},
        "top_paths": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["export_id", "format", "total_rows", "hash_ok"],
}
STATS_INPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "enum": list(stats.QUESTIONS), "description": "What to count."},
        "since": {"type": "string", "format": "date", "description": "First day (YYYY-MM-DD), inclusive."},
        "until": {"type": "string", "format": "date", "description": "Last day (YYYY-MM-DD), inclusive."},
        "path_prefix": {"type": "string", "maxLength": 500, "description": "Only paths starting with this."},
        "include_bots": {
            "type": "boolean",
            "default": False,
            "description": "Count bots too (individual pageviews only: GoatCounter's statistics never count them).",
        },
        "limit": {"type": "integer", "minimum": 1, "maximum": stats.MAX_LIMIT, "default": 10},
        "source": {
            "type": "string",
            "enum": ["pageviews", "aggregates"],
            "description": "pageviews: the individual pageviews a CSV sync keeps; aggregates: the dashboard's "
            "statistics a JSON sync keeps. Default: pageviews when the site has any, else aggregates.",
        },
    },
    "required": ["question"],
    "additionalProperties": False,
}
STATS_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "source": {"type": "string", "enum": ["pageviews", "aggregates"]},
        "unit": {"type": "string", "enum": ["pageviews", "visitors"]},
        "total": {"type": "integer"},
        "total_pageviews": {"type": "integer", "description": "the total, when the unit is pageviews"},
        "rows": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["question", "source", "unit", "total", "rows"],
}


DESCRIPTIONS = {
    "create": "Start an export of this GoatCounter site's data; GoatCounter writes it in the background. "
    "CSV (the default): the individual pageviews with a hit id after start_from_hit_id, which is exclusive: pass "
    "the last_hit_id of the previous export to get only what is new, or 0 for everything. A site keeps individual "
    "pageviews only when its Individual pageviews setting is on; otherwise the CSV is empty (the result says so). "
    "format json (GoatCounter newer than v2.7.0, as goatcounter.com): the statistics the dashboard shows, from "
    "start_from_day (RFC 3339, UTC midnight) when given. Budget: GoatCounter allows one export an hour, and even a "
    "refused request spends it; while it is spent this answers 429 with recent_export_id, an export to reuse. "
    "Then call get-export-info until it is finished, and read it with download-export.",
    "get": "The state of an export: running, finished or failed, with num_rows, size, hash, and last_hit_id (the "
    "start_from_hit_id of the next incremental CSV export). While it runs, ask again every few seconds: reading "
    "exports never spends the hourly export budget.",
    "download": "Read a finished export one page at a time: rows offset to offset+limit (at most 1000) as an "
    "embedded text/csv resource, with total_rows, has_more and next_offset for the next page. The file is "
    "downloaded once, its SHA-256 checked against the export's hash (a mismatch is an error), and kept for the "
    "pages that follow. A JSON export is a ZIP of tables: choose one with table (default hit_stats: visitors per "
    "hour, path and referrer); the result lists every table with its row count.",
}


def csv_resource(export_id: int, offset: int, columns: list[str], rows: list[list[str]]) -> EmbeddedText:
    """Rows of an export as an embedded text/csv resource, header first."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([columns, *rows] if columns else [])
    uri = f"goatcounter-export://{export_id}/rows?offset={offset}&limit={len(rows)}"
    return EmbeddedText(uri, "text/csv", buffer.getvalue())


def page_result(page: Page, note: str | None = None) -> ToolResult:
    end = page.offset + len(page.rows)
    checked = "SHA-256 verified" if page.hash_checked else "no hash to check"
    what = f"table {page.table}, rows" if page.table else "rows"
    text = (
        f"Export {page.export_id}: {what} {page.offset}..{max(end - 1, page.offset)} of {page.total_rows} "
        f"({len(page.rows)} returned; {checked}). "
        + (f"Call again with offset={page.next_offset} for more." if page.has_more else "No more rows.")
    )
    if page.tables:
        text += " Tables: " + ", ".join(f"{name} ({count})" for name, count in page.tables.items()) + "."
    if note:
        text += " " + note
    structured = {
        "export_id": page.export_id,
        "ready": True,
        "columns": page.columns,
        "offset": page.offset,
        "rows_returned": len(page.rows),
        "total_rows": page.total_rows,
        "has_more": page.has_more,
        "next_offset": page.next_offset,
        "hash_ok": True if page.hash_checked else None,
        "format_version": page.version,
        "table": page.table,
        "tables": page.tables,
        **({"note": note} if note else {}),
    }
    return ToolResult(text, structured, csv_resource(page.export_id, page.offset, page.columns, page.rows))


def export_structure(export: Export, note: str | None) -> dict[str, Any]:
    keep = EXPORT_OBJECT_OUTPUT["properties"]
    found = {k: v for k, v in export.document.items() if k in keep}
    return {**found, "state": export.status, "format": export.format, **({"note": note} if note else {})}


class GoatCounterTools:
    """The tool provider of one GoatCounter namespace (see adapters/tools.py for the protocol)."""

    def __init__(
        self,
        runtime: Runtime,
        bindings: Sequence[Binding],
        reader: ExportReader,
        job: Callable[[Progress], ExportJob],
        database: Path | str,
    ) -> None:
        self.runtime = runtime
        self.reader = reader
        self.job = job
        self.database = database
        self.bindings = {b.name: b for b in bindings if export_shape(b.target) is not None}

    def tools(self) -> list[Tool]:
        shaped = [self._shaped(b) for b in self.bindings.values()]
        return [
            *shaped,
            Tool(
                "export-pageviews",
                "Export a site's data in one call: create (or reuse a recent) export, wait for it, download and "
                "verify it. Returns totals, top paths and the first rows, never the whole file. CSV exports hold "
                "individual pageviews (only when the site's Individual pageviews setting is on); JSON exports hold "
                "the dashboard's statistics (visitors per hour and path, browsers, systems, locations, sizes).",
                EXPORT_JOB_INPUT,
                EXPORT_JOB_OUTPUT,
                annotations=Annotations(read_only=False, destructive=False, idempotent=False, open_world=True),
            ),
            Tool(
                "pageview-stats",
                "Answer questions about this site's traffic from the local copy that `goatcounter-exports sync` "
                "keeps, in GoatCounter's own numbers: top paths, titles, referrers, locations, browsers, systems, "
                "screen sizes, languages, campaigns, daily or hourly counts, or the total, over a date range and a "
                "path prefix. From individual pageviews (a CSV sync) counts are pageviews; from the aggregate "
                "statistics (a JSON sync, what sites without Individual pageviews have) counts are visitors, as "
                "the dashboard shows them. Languages and campaigns need the statistics; include_bots needs "
                "individual pageviews. Example: top pages last week: "
                '{"question": "top_paths", "since": "2026-11-16", "until": "2026-11-22"}.',
                STATS_INPUT,
                STATS_OUTPUT,
                annotations=Annotations(read_only=True, destructive=False, idempotent=True, open_world=False),
            ),
        ]

    def _shaped(self, binding: Binding) -> Tool:
        schema = binding_arguments(self.runtime, binding)
        shape = export_shape(binding.target)
        download = shape == "download"
        if download:
            schema["properties"] = {**schema["properties"], **PAGE_ARGUMENTS}
        # The body's fields are arguments of their own: offering `body` too would show every input twice.
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k != "body"}
        return Tool(
            name=binding.name,
            description=DESCRIPTIONS[shape] if shape else binding.description,
            input_schema=schema,
            output_schema=PAGE_OUTPUT if download else EXPORT_OBJECT_OUTPUT,
            title=binding.description or None,
            annotations=annotations_of(binding),
        )

    async def call(self, name: str, arguments: dict[str, Any], progress: Progress) -> ToolResult:
        if name == "export-pageviews":
            return await self.export_pageviews(arguments, progress)
        if name == "pageview-stats":
            return await self.pageview_stats(arguments)
        binding = self.bindings[name]
        inputs = binding_inputs(self.runtime, binding, arguments)
        if export_shape(binding.target) == "download":
            export_id = int(self.runtime.resolve_with(binding, inputs)["id"])
            return await self.download_page(export_id, arguments)
        if export_shape(binding.target) == "get":  # a finished export is answered from the reader's cache
            export = await self.reader.get(int(self.runtime.resolve_with(binding, inputs)["id"]))
        else:
            async with self.runtime.send(binding, inputs) as response:
                export = Export.parse(await response.document())
        note = await self.job(no_progress).empty_note(export)
        return ToolResult(export.summary() + (f" {note}" if note else ""), export_structure(export, note))

    async def download_page(self, export_id: int, arguments: dict[str, Any]) -> ToolResult:
        export = await self.reader.get(export_id)
        if export.status == "running":
            message = "still being generated"
            text = f"Export {export_id} is {message}. Wait a few seconds, then call download-export again."
            return ToolResult(text, {"export_id": export_id, "ready": False, "message": message})
        if arguments.get("table") is not None and export.format == "csv":  # refused before the download
            raise InputError(f"export {export_id} is a CSV export: it has no tables", field="table")
        offset = int(arguments.get("offset", 0))
        limit = int(arguments.get("limit", DEFAULT_PAGE_ROWS))
        page = await self.reader.page(export, offset, limit, arguments.get("table"))
        return page_result(page, await self.job(no_progress).empty_note(export))

    async def export_pageviews(self, arguments: dict[str, Any], progress: Progress) -> ToolResult:
        job = self.job(progress)
        wanted = arguments.get("format", "auto")
        chosen = await job.choose_format(None if wanted == "auto" else wanted)
        start = int(arguments.get("start_from_hit_id", 0))
        if chosen == "json" and start:
            raise InputError("start_from_hit_id only applies to CSV exports", field="start_from_hit_id")
        request = ExportRequest(chosen, start_from_hit_id=start)
        export, reused = await job.create_or_reuse(request)
        await progress(f"export {export.id} {'reused' if reused else 'created'}", 0, None)
        export = await job.wait(export, float(arguments.get("timeout_seconds", 300)))
        preview_rows = int(arguments.get("preview_rows", PREVIEW_ROWS))
        if chosen == "json":
            return await self._summarise_statistics(export, reused, preview_rows, progress)
        columns: list[str] = []
        preview: list[list[str]] = []
        paths: dict[str, int] = {}
        total = 0
        async with self.reader.open(export, progress) as file:
            async for record in file.records():  # raises on a hash mismatch
                if not columns:
                    columns.extend(split_header(record)[1])
                    continue
                total += 1
                paths[record[0]] = paths.get(record[0], 0) + 1
                if len(preview) < preview_rows:
                    preview.append(record)
        top = sorted(paths.items(), key=lambda item: (-item[1], item[0]))[:10]
        note = await job.empty_note(export)
        text = (
            f"Export {export.id} ({'reused' if reused else 'new'}): {total} pageviews after hit {start}, "
            f"SHA-256 verified. Top paths: "
            + (", ".join(f"{p} ({n})" for p, n in top) or "none")
            + f". First {len(preview)} rows attached. Next incremental export: start_from_hit_id="
            f"{export.last_hit_id}." + (f" {note}" if note else "")
        )
        structured = {
            "export_id": export.id,
            "format": "csv",
            "reused": reused,
            "total_rows": total,
            "columns": columns,
            "start_from_hit_id": start,
            "last_hit_id": export.last_hit_id if export.last_hit_id is not None else start,
            "hash_ok": True,
            "top_paths": [{"path": p, "pageviews": n} for p, n in top],
            **({"note": note} if note else {}),
        }
        return ToolResult(text, structured, csv_resource(export.id, 0, columns, preview))

    async def _summarise_statistics(
        self, export: Export, reused: bool, preview_rows: int, progress: Progress
    ) -> ToolResult:
        local = await self.reader.local(export, progress)

        def read() -> tuple[dict[str, int], dict[str, int], int, list[list[str]]]:
            tables = local.tables()
            names = {int(row["id"]): str(row.get("path", "")) for row in local.rows("paths")}
            visitors: dict[str, int] = {}
            preview: list[list[str]] = []
            columns = JSON_TABLES[DEFAULT_TABLE]
            for row in local.rows(DEFAULT_TABLE):
                path = names.get(int(row.get("path_id") or 0), "")
                visitors[path] = visitors.get(path, 0) + int(row.get("count") or 0)
                if len(preview) < preview_rows:
                    preview.append([str(row.get(c, "")) for c in columns])
            return tables, visitors, sum(visitors.values()), preview

        tables, visitors, total, preview = await asyncio.to_thread(read)
        top = sorted(visitors.items(), key=lambda item: (-item[1], item[0]))[:10]
        text = (
            f"Export {export.id} ({'reused' if reused else 'new'}, JSON statistics"
            + (f" from {export.start_from_day}" if export.start_from_day else "")
            + f"): {total} visitors, SHA-256 verified. Top paths: "
            + (", ".join(f"{p} ({n})" for p, n in top) or "none")
            + f". First {len(preview)} rows of {DEFAULT_TABLE} attached; page through any table with "
            "download-export."
        )
        structured = {
            "export_id": export.id,
            "format": "json",
            "reused": reused,
            "total_rows": tables.get(DEFAULT_TABLE, 0),
            "total_visitors": total,
            "tables": tables,
            "columns": list(JSON_TABLES[DEFAULT_TABLE]),
            "hash_ok": True,
            "top_paths": [{"path": p, "visitors": n} for p, n in top],
        }
        return ToolResult(text, structured, csv_resource(export.id, 0, list(JSON_TABLES[DEFAULT_TABLE]), preview))

    async def pageview_stats(self, arguments: dict[str, Any]) -> ToolResult:
        answer = await asyncio.to_thread(
            stats.ask,
            self.database,
            self.reader.site,
            arguments["question"],
            since=arguments.get("since"),
            until=arguments.get("until"),
            path_prefix=arguments.get("path_prefix"),
            include_bots=bool(arguments.get("include_bots", False)),
            limit=int(arguments.get("limit", 10)),
            source=arguments.get("source"),
        )
        span = f" from {answer.since or 'the start'} to {answer.until or 'now'}"
        lines = [f"{answer.total} {answer.unit}{span} in the synced copy ({answer.source})."]
        lines += [f"{row['value'] or '(none)'}: {row[answer.unit]}" for row in answer.rows]
        structured: dict[str, Any] = {
            "question": answer.question,
            "source": answer.source,
            "unit": answer.unit,
            "total": answer.total,
            "rows": answer.rows,
        }
        if answer.unit == "pageviews":
            structured["total_pageviews"] = answer.total
        return ToolResult("\n".join(lines), structured)

    def explain(self, error: GoatcounterExportsError) -> str | None:
        if isinstance(error, ExportDeleted):
            return f"{error}. Export files are kept 24 hours; create a new export."
        if not isinstance(error, ApiError):
            return None
        advice = {
            401: "The GoatCounter API key was refused. Check GOATCOUNTER_API_KEY (Settings > API in GoatCounter).",
            403: "The API key lacks the 'export' permission. Create a key with export permission in GoatCounter.",
            404: "There is no such export on this site. Create one with create-csv-export.",
            429: "Rate limited: "
            + (
                f"wait {error.retry_after:.0f} seconds before trying again."
                if error.retry_after
                else "wait, then retry."
            )
            + " Creating exports is allowed once an hour.",
        }.get(error.status)
        who = "This gateway refused the call locally" if error.local else "GoatCounter answered"
        text = f"{who} ({error.status}): {error.message}."
        return f"{text} {advice}" if advice else text
