"""The REST adapter's OpenAPI hooks for GoatCounter: the answers its export operations really give."""

from __future__ import annotations

from typing import Any

from ..spec.resolve import Binding
from .exports import export_shape


class GoatCounterOpenApi:
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
