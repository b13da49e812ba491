"""The REST adapter's OpenAPI hooks for GoatCounter: what its export operations do and the answers they really
give."""

from __future__ import annotations

from typing import Any

from ..spec.resolve import Binding
from .exports import export_shape


class GoatCounterOpenApi:
    def description(self, binding: Binding) -> str | None:
        shape = export_shape(binding.target)
        return DESCRIPTIONS[shape] if shape is not None else None

    def responses(self, binding: Binding) -> dict[str, Any] | None:
        return responses(binding)

    def schemas(self) -> dict[str, Any]:
        return {"Export": EXPORT_SCHEMA}


def _json(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


EXPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A GoatCounter export.",
    "properties": {
        "id": {"type": "integer"},
        "site_id": {"type": "integer"},
        "format": {"type": "string", "description": "Only on GoatCounter newer than v2.7.0."},
        "start_from_hit_id": {"type": "integer"},
        "last_hit_id": {"type": ["integer", "null"], "description": "Cursor: start the next export from this."},
        "path": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time", "description": "null while running."},
        "num_rows": {"type": ["integer", "null"]},
        "size": {"type": ["string", "null"], "description": "Size in MB, as text."},
        "hash": {"type": ["string", "null"], "description": "SHA-256 of the gzip file."},
        "error": {"type": ["string", "null"], "description": "Set when the export failed."},
    },
}
DESCRIPTIONS = {
    "create": (
        "Starts an export of the site's data; then get the export until its `finished_at` is set. The body is "
        "GoatCounter's: "
        '`{"start_from_hit_id": N}` for the CSV pageviews after hit N (the previous export\'s `last_hit_id`), or '
        '`{"format": "json", "start_from_day": "2026-11-20T00:00:00Z"}` for the statistics, on GoatCounter newer '
        "than v2.7.0; `format` is added or left out to suit the server. Bad input is refused here, never sent. "
        "GoatCounter allows one export an hour: while that budget is spent, the answer is a local 429 with "
        "`Retry-After` and `recent_export_id`. Send `Idempotency-Key` to make a retry return the same export."
    ),
    "get": (
        "The export's status: `finished_at` is null while it runs, `error` is set when it failed, and a finished "
        "export has `num_rows`, `hash` (its file's SHA-256) and `last_hit_id` (where the next CSV export starts)."
    ),
    "download": (
        "The export's file, streamed as GoatCounter wrote it, its SHA-256 checked against the export's `hash` as it "
        "goes (a mismatch cuts the stream short). `202` while the export runs; with `Accept: text/csv`, the CSV "
        "decompressed. A JSON export is a ZIP (`application/zip`, and `406` for `text/csv`). GoatCounter keeps "
        "files 24 hours: `410` after that."
    ),
}
ERROR_REF = "#/components/schemas/Error"
EXPORT_REF = "#/components/schemas/Export"
AUTH_RESPONSES = {
    "401": _json("Unknown or missing GoatCounter key.", ERROR_REF),
    "403": _json("The key lacks the export permission.", ERROR_REF),
    "429": _json("Rate limited; see Retry-After and X-Rate-Limit-* headers.", ERROR_REF),
}


def responses(binding: Binding) -> dict[str, Any] | None:
    shape = export_shape(binding.target)
    if shape is None:
        return None
    if shape == "create":
        return {"202": _json("Export started.", EXPORT_REF), **AUTH_RESPONSES}
    if shape == "download":
        return {
            "200": {
                "description": "The export file: gzip-compressed CSV, or plain CSV when Accept prefers text/csv.",
                "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                "content": {
                    "application/gzip": {"schema": {"type": "string", "contentMediaType": "application/gzip"}},
                    "text/csv": {"schema": {"type": "string"}},
                },
            },
            "202": _json("Still being generated: try again shortly.", ERROR_REF),
            "400": _json("Invalid id.", ERROR_REF),
            "410": _json("The file was deleted: exports are kept 24 hours.", ERROR_REF),
            "404": _json("No such export for this site.", ERROR_REF),
            **AUTH_RESPONSES,
        }
    return {"200": _json("The export.", EXPORT_REF), "404": _json("No such export.", ERROR_REF), **AUTH_RESPONSES}
