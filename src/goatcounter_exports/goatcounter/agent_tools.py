"""Tools beside the spec's three: the whole export job in one call, and questions over synced data.

`export-pageviews` does create-or-reuse, wait (with MCP progress), download and
verify, then answers with totals and the first rows only. `pageview-stats`
answers bounded questions from the local database `sync` fills; no SQL from
the model is ever run.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from ..outcome import EmbeddedText, ExtraTool, Outcome, Report
from . import stats
from .csvfile import iter_records, split_header
from .state import StateStore
from .workflow import ExportJob

if TYPE_CHECKING:
    from ..runtime import Runtime

PREVIEW_ROWS = 20
EXPORT_INPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "start_from_hit_id": {
            "type": "integer",
            "minimum": 0,
            "description": "Only pageviews after this hit id (the last_hit_id of a previous export). Default 0: all.",
        },
        "timeout_seconds": {"type": "integer", "minimum": 5, "maximum": 3600, "default": 300},
        "preview_rows": {"type": "integer", "minimum": 0, "maximum": 100, "default": PREVIEW_ROWS},
    },
    "additionalProperties": False,
}
EXPORT_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "export_id": {"type": "integer"},
        "reused": {"type": "boolean"},
        "total_rows": {"type": "integer"},
        "columns": {"type": "array", "items": {"type": "string"}},
        "start_from_hit_id": {"type": "integer"},
        "last_hit_id": {"type": "integer"},
        "hash_ok": {"type": "boolean"},
        "top_paths": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["export_id", "total_rows", "hash_ok"],
}
STATS_INPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "enum": list(stats.QUESTIONS), "description": "What to count."},
        "since": {"type": "string", "format": "date", "description": "First day (YYYY-MM-DD), inclusive."},
        "until": {"type": "string", "format": "date", "description": "Last day (YYYY-MM-DD), inclusive."},
        "path_prefix": {"type": "string", "maxLength": 500, "description": "Only paths starting with this."},
        "include_bots": {"type": "boolean", "default": False},
        "limit": {"type": "integer", "minimum": 1, "maximum": stats.MAX_LIMIT, "default": 10},
    },
    "required": ["question"],
    "additionalProperties": False,
}
STATS_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "total_pageviews": {"type": "integer"},
        "rows": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["question", "total_pageviews", "rows"],
}


def extra_tools(runtime: Runtime, state: StateStore | None) -> list[ExtraTool]:
    async def export_pageviews(arguments: dict[str, Any], report: Report) -> Outcome:
        async def progress(stage: str, done: float, total: float | None) -> None:
            await report(done, total, f"{stage}")

        job = ExportJob.for_runtime(runtime, state, progress)
        start = int(arguments.get("start_from_hit_id", 0))
        export, reused = await job.create_or_reuse(start)
        await report(0, None, f"export {export['id']} {'reused' if reused else 'created'}")
        export = await job.wait(export, float(arguments.get("timeout_seconds", 300)))
        preview_rows = int(arguments.get("preview_rows", PREVIEW_ROWS))
        columns: list[str] = []
        preview: list[list[str]] = []
        paths: dict[str, int] = {}
        total = 0
        async for record in iter_records(job.file_chunks(export)):  # raises on a hash mismatch
            if not columns:
                columns.extend(split_header(record)[1])
                continue
            total += 1
            paths[record[0]] = paths.get(record[0], 0) + 1
            if len(preview) < preview_rows:
                preview.append(record)
        top = sorted(paths.items(), key=lambda item: (-item[1], item[0]))[:10]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([columns, *preview] if columns else [])
        text = (
            f"Export {export['id']} ({'reused' if reused else 'new'}): {total} pageviews after hit {start}, "
            f"SHA-256 verified. Top paths: "
            + (", ".join(f"{p} ({n})" for p, n in top) or "none")
            + f". First {len(preview)} rows attached. Next incremental export: start_from_hit_id="
            f"{export.get('last_hit_id')}."
        )
        structured = {
            "export_id": int(export["id"]),
            "reused": reused,
            "total_rows": total,
            "columns": columns,
            "start_from_hit_id": start,
            "last_hit_id": int(export.get("last_hit_id") or start),
            "hash_ok": True,
            "top_paths": [{"path": p, "pageviews": n} for p, n in top],
        }
        uri = f"goatcounter-export://{export['id']}/rows?offset=0&limit={len(preview)}"
        return Outcome(text, structured, EmbeddedText(uri, "text/csv", buffer.getvalue()))

    async def pageview_stats(arguments: dict[str, Any], report: Report) -> Outcome:
        answer = stats.ask(
            runtime.settings.database,
            arguments["question"],
            since=arguments.get("since"),
            until=arguments.get("until"),
            path_prefix=arguments.get("path_prefix"),
            include_bots=bool(arguments.get("include_bots", False)),
            limit=int(arguments.get("limit", 10)),
        )
        span = f" from {answer.since or 'the start'} to {answer.until or 'now'}"
        lines = [f"{answer.total_pageviews} pageviews{span} in the synced database."]
        lines += [f"{row['value'] or '(none)'}: {row['pageviews']}" for row in answer.rows]
        structured = {"question": answer.question, "total_pageviews": answer.total_pageviews, "rows": answer.rows}
        return Outcome("\n".join(lines), structured)

    return [
        ExtraTool(
            "export-pageviews",
            "Export a site's pageviews in one call: create (or reuse a recent) export, wait for it, download and "
            "verify it. Returns totals, top paths and the first rows, never the whole file.",
            EXPORT_INPUT,
            EXPORT_OUTPUT,
            read_only=False,
            idempotent=False,
            open_world=True,
            run=export_pageviews,
        ),
        ExtraTool(
            "pageview-stats",
            "Answer questions about traffic from the local copy that `goatcounter-exports sync` keeps: top paths, "
            "referrers, locations, browsers, systems, screen sizes, daily counts or the total, over a date range.",
            STATS_INPUT,
            STATS_OUTPUT,
            read_only=True,
            idempotent=True,
            open_world=False,
            run=pageview_stats,
        ),
    ]
