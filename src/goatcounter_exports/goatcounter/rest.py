"""The REST adapter's hooks for GoatCounter: the download route, served through the export reader.

`GET .../download` reads the export first (cached once finished), so it answers a running
export with 202 itself, and streams the file with its SHA-256 checked: a mismatch ends the
stream before its last bytes, so a client never takes a forged or damaged file for whole.
With `Accept: text/csv` the CSV is inflated on the fly.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..adapters.rest import Handler, streaming
from ..spec.resolve import Binding
from .exportfile import ExportReader
from .exports import export_shape

GZIP_TYPE = "application/gzip"


def wants_csv(accept: str) -> bool:
    """True when the client prefers text/csv over the gzip file (RFC 9110 q-values)."""
    quality: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    csv = quality.get("text/csv", 0.0)
    gzip = max(quality.get(GZIP_TYPE, 0.0), quality.get("*/*", 0.0), quality.get("application/*", 0.0))
    return csv > 0 and csv >= gzip


class GoatCounterRest:
    def __init__(self, reader: ExportReader) -> None:
        self.reader = reader

    def handler(self, binding: Binding) -> Handler | None:
        if export_shape(binding.target) != "download":
            return None

        async def download(request: Request, inputs: dict[str, Any]) -> Response:
            export_id = int(self.reader.runtime.resolve_with(binding, inputs)["id"])
            return await self.download(request, export_id)

        return download

    async def download(self, request: Request, export_id: int) -> Response:
        export = await self.reader.get(export_id)
        if export.status == "running":
            return JSONResponse({"error": "still being generated"}, 202)
        stack = AsyncExitStack()
        try:
            file = await stack.enter_async_context(self.reader.open(export))
            headers = {"Content-Disposition": file.content_disposition} if file.content_disposition else {}
            if wants_csv(request.headers.get("accept", "")):
                if "Content-Disposition" in headers:
                    headers["Content-Disposition"] = headers["Content-Disposition"].replace(".csv.gz", ".csv")
                return streaming(file.csv_bytes(), 200, headers, "text/csv; charset=utf-8", stack)
            if file.content_length is not None:
                headers["Content-Length"] = str(file.content_length)
            return streaming(file.chunks(), 200, headers, GZIP_TYPE, stack)
        except BaseException:
            await stack.aclose()
            raise
