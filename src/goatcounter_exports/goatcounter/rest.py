"""The REST adapter's hooks for GoatCounter: the download route, served through the export reader.

`GET .../download` reads the export first (cached once finished), so it answers a running
export with 202 itself, and streams the file with its SHA-256 checked: a mismatch ends the
stream before its last bytes, so a client never takes a forged or damaged file for whole.
With `Accept: text/csv` the CSV is inflated on the fly. A JSON export is a ZIP, whatever
GoatCounter's header says (`application/gzip`): it is sent as `application/zip`, and a client
that will only take `text/csv` gets a 406. An empty CSV export (a site without Individual
pageviews) carries an `X-Export-Note` saying why, here and on the export object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..adapters.rest import Handler, streaming
from ..errors import ExportError, ExportFailed
from ..spec.resolve import Binding
from .exportfile import ExportReader, kind_of
from .exports import Export, export_shape

GZIP_TYPE = "application/gzip"
ZIP_TYPE = "application/zip"


def wants_csv(accept: str, offered: str = GZIP_TYPE) -> bool:
    """True when the client prefers text/csv over the file as it is (`offered`; RFC 9110 q-values)."""
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
    as_is = max(quality.get(offered, 0.0), quality.get("*/*", 0.0), quality.get("application/*", 0.0))
    return csv > 0 and csv >= as_is


NOTE_HEADER = "X-Export-Note"  # why a finished CSV export has no rows, and what to do


class GoatCounterRest:
    def __init__(self, reader: ExportReader, note: Callable[[Export], Awaitable[str | None]]) -> None:
        self.reader = reader
        self.note = note

    async def shape(self, binding: Binding, document: Any) -> tuple[Any, dict[str, str]]:
        """An export object without GoatCounter's server-side file `path`, with a note when it is an empty CSV."""
        if export_shape(binding.target) not in ("create", "get") or not isinstance(document, dict):
            return document, {}
        shown = {k: v for k, v in document.items() if k != "path"}
        try:
            note = await self.note(Export.parse(document))
        except ExportError:
            return shown, {}
        return shown, ({NOTE_HEADER: note} if note else {})

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
        zipped = kind_of(export.format) == "zip"
        if zipped and wants_csv(request.headers.get("accept", ""), offered=ZIP_TYPE):
            message = f"export {export.id} is a JSON export (a ZIP of tables): it has no CSV form; ask for {ZIP_TYPE}"
            return JSONResponse({"error": message}, 406)
        if request.method == "HEAD":  # what a GET would answer, without downloading the file
            if export.status == "failed":
                raise ExportFailed(f"export {export.id} failed in GoatCounter: {export.error}")
            note = await self.note(export)
            media = (
                ZIP_TYPE
                if zipped
                else "text/csv; charset=utf-8"
                if wants_csv(request.headers.get("accept", ""))
                else GZIP_TYPE
            )
            return Response(None, 200, {NOTE_HEADER: note} if note else {}, media_type=media)
        stack = AsyncExitStack()
        try:
            file = await stack.enter_async_context(self.reader.open(export))
            headers = {"Content-Disposition": file.content_disposition} if file.content_disposition else {}
            if zipped:  # GoatCounter labels its ZIP application/gzip: say what it is
                if file.content_length is not None:
                    headers["Content-Length"] = str(file.content_length)
                return streaming(file.chunks(), 200, headers, ZIP_TYPE, stack)
            note = await self.note(export)
            if note:
                headers[NOTE_HEADER] = note
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
