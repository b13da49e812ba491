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
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..adapters.rest import Handler, forward, streaming
from ..errors import ExportError, ExportFailed
from ..spec.resolve import Binding
from .exportfile import ExportReader, kind_of
from .exports import Export, export_shape

GZIP_TYPE = "application/gzip"
JSON_TYPE = "application/json"
RENDERED_SIZE = 256  # finished exports' GET answers kept made
CACHE_HEADER = "X-Cache"  # "hit": answered here (a finished export cannot change), so no upstream rate-limit headers
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
            export = Export.parse(document)
            note = await self.note(export)
        except ExportError:
            return shown, {}
        if export_shape(binding.target) == "get" and self._unmapped(binding):
            self.reader.remember(export)  # the object as GoatCounter gave it; kept only when finished
        return shown, ({NOTE_HEADER: note} if note else {})

    def handler(self, binding: Binding) -> Handler | None:
        if export_shape(binding.target) == "get":
            return self._get_handler(binding)
        if export_shape(binding.target) != "download":
            return None

        async def download(request: Request, inputs: dict[str, Any]) -> Response:
            export_id = int(self.reader.runtime.resolve_with(binding, inputs)["id"])
            return await self.download(request, export_id)

        return download

    def _get_handler(self, binding: Binding) -> Handler:
        """`GET .../export/{id}`: a finished export never changes, so once seen finished (here or by the reader) it
        is answered from the reader's cache, nothing sent upstream, its answer made once; until then, the
        upstream's answer passes through as always (and `shape` remembers it once it is finished)."""
        runtime = self.reader.runtime
        rendered: dict[int, tuple[Export, Response]] = {}  # the answer for each cached export, made once

        async def get(request: Request, inputs: dict[str, Any]) -> Response:
            export_id = int(runtime.resolve_with(binding, inputs)["id"])
            export = self.reader.cached(export_id)
            if export is None:  # as the adapter's own pass-through would, with this hook
                stack = AsyncExitStack()
                try:
                    response = await forward(request, runtime, binding, inputs, stack, self)
                except BaseException:
                    await stack.aclose()
                    raise
                if not isinstance(response, StreamingResponse):  # a streamed body closes the stack itself
                    await stack.aclose()
                return response
            made = rendered.get(export_id)
            if made is None or made[0] is not export:
                content, headers = await self.shape(binding, runtime.map_output(binding.outputs, export.document))
                made = rendered[export_id] = (export, JSONResponse(content, 200, {**headers, CACHE_HEADER: "hit"}))
                if len(rendered) > RENDERED_SIZE:
                    rendered.pop(next(iter(rendered)))
            return Response(made[1].body, 200, dict(made[1].headers), media_type=JSON_TYPE)

        return get

    def _unmapped(self, binding: Binding) -> bool:
        """Whether the binding passes the upstream's document through whole (its outputs map nothing away)."""
        probe: dict[str, Any] = {}
        return self.reader.runtime.map_output(binding.outputs, probe) is probe

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
