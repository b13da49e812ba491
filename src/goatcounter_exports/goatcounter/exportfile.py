"""The one reader of GoatCounter export files, used by REST, MCP, `export`, `sync` and the agent tools.

It owns:
- the export's status (running, failed, finished) and, on download, whether its file is gone;
- the file's bytes, streamed, with the SHA-256 always checked against the export's `hash`:
  the last piece is held back until the check passes, so a mismatch is an `IntegrityError`
  before the end of the file reaches anyone (one policy, everywhere);
- the records: the CSV (gzip-compressed, format version 2), inflated in bounded pieces.

A finished export never changes, so its object is cached: paging or downloading it again
costs one upstream call (the file), not two.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..errors import ApiError, ExportDeleted, ExportError, ExportFailed, IntegrityError
from ..progress import Progress, no_progress
from ..runtime import Runtime
from ..upstream import UpstreamResponse
from .exports import Export, ExportOps

SUPPORTED_VERSIONS = ("2",)
HASH_PREFIX = "sha256-"
PIECE = 256 * 1024  # most bytes one inflate step may produce: a CSV of repeated rows compresses 100x
FINISHED_CACHE_SIZE = 256
KEPT_FOR = timedelta(hours=24)  # GoatCounter deletes export files a day after they finished
DEFAULT_PAGE_ROWS = 100
MAX_PAGE_ROWS = 1000


def split_header(header: list[str]) -> tuple[str, list[str]]:
    """`["2Path", "Title", ...]` -> ("2", ["Path", "Title", ...]). Refuses an unknown version."""
    if not header or not header[0]:
        raise IntegrityError("the export file has no CSV header")
    first = header[0]
    digits = len(first) - len(first.lstrip("0123456789"))
    version = first[:digits]
    if version not in SUPPORTED_VERSIONS:
        raise IntegrityError(
            f"unsupported export format version {version or '(none)'!r}; this tool reads version "
            + ", ".join(SUPPORTED_VERSIONS)
        )
    return version, [first[digits:], *header[1:]]


def hash_matches(expected: str | None, sha256_hex: str) -> bool | None:
    """Compare with GoatCounter's `hash` ("sha256-<hex>"); None when there is nothing to compare."""
    if not expected:
        return None
    return expected.strip().lower() == HASH_PREFIX + sha256_hex


async def gunzip(chunks: AsyncIterator[bytes], piece: int = PIECE) -> AsyncIterator[bytes]:
    """Inflate a gzip stream as it arrives, at most `piece` bytes at a time (constant memory).
    Raises IntegrityError for data that is not gzip, or that stops before the gzip end marker."""
    inflate = zlib.decompressobj(wbits=31)
    try:
        async for chunk in chunks:
            data = inflate.decompress(chunk, piece)
            if data:
                yield data
            while inflate.unconsumed_tail:
                data = inflate.decompress(inflate.unconsumed_tail, piece)
                if data:
                    yield data
        tail = inflate.flush()
    except zlib.error as exc:
        raise IntegrityError(f"the export file is not valid gzip: {exc}") from None
    if tail:
        yield tail
    if not inflate.eof:
        raise IntegrityError("the export file is truncated: the gzip stream did not end")


class RecordStream:
    """CSV records from lines that arrive in batches; a quoted field may span batches."""

    def __init__(self) -> None:
        self._buffer: list[str] = []

    def push(self, lines: list[str], final: bool = False) -> Iterator[list[str]]:
        self._buffer.extend(lines)
        # Only parse up to the last line that ends a record: an odd count of quotes means one is open.
        complete = len(self._buffer)
        if not final:
            quotes = 0
            complete = 0
            for index, line in enumerate(self._buffer):
                quotes += line.count('"')
                if quotes % 2 == 0:
                    complete = index + 1
        ready, self._buffer = self._buffer[:complete], self._buffer[complete:]
        yield from csv.reader(ready)


class ExportFile:
    """One download of an export's file. Its stream can be read once, as bytes or as records."""

    def __init__(self, export: Export, response: UpstreamResponse, progress: Progress) -> None:
        self.export = export
        self.content_disposition = response.headers.get("Content-Disposition")
        length = response.headers.get("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        self._response = response
        self._progress = progress
        self._taken = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file as GoatCounter wrote it (compressed). The last chunk comes only once the SHA-256
        matched the export's hash; otherwise IntegrityError is raised in its place."""
        if self._taken:
            raise ExportError("an export file's stream can be read only once")
        self._taken = True
        digest = hashlib.sha256()
        held: bytes | None = None
        size = 0
        async for chunk in self._response.chunks():
            digest.update(chunk)
            size += len(chunk)
            await self._progress("downloading", size, self.export.size_bytes)
            if held is not None:
                yield held
            held = chunk
        if hash_matches(self.export.hash, digest.hexdigest()) is False:
            raise IntegrityError(
                f"export {self.export.id}: the file's SHA-256 {digest.hexdigest()} does not match {self.export.hash}"
            )
        if held is not None:
            yield held

    async def csv_bytes(self) -> AsyncIterator[bytes]:
        """The CSV, inflated in bounded pieces; its format version is checked on the first line."""
        checked = False
        async for data in gunzip(self.chunks()):
            if not checked:
                split_header(data.split(b"\n", 1)[0].decode("utf-8", "replace").split(","))
                checked = True
            yield data

    async def records(self) -> AsyncIterator[list[str]]:
        """Every CSV record, the header first (checked with `split_header` by the caller), in constant memory."""
        decode = codecs.getincrementaldecoder("utf-8")()
        records = RecordStream()
        pending = ""
        try:
            async for piece in gunzip(self.chunks()):
                lines = (pending + decode.decode(piece)).split("\n")
                pending = lines.pop()
                for record in records.push([line + "\n" for line in lines]):
                    yield record
            pending += decode.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"the export file is not valid UTF-8: {exc}") from None
        for record in records.push([pending] if pending else [], final=True):
            yield record


@dataclass(frozen=True)
class CsvPage:
    export_id: int
    version: str
    columns: list[str]
    rows: list[list[str]]
    offset: int
    total_rows: int
    hash_checked: bool  # False only when GoatCounter gave no hash to check against

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.rows) < self.total_rows

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.rows) if self.has_more else None


class ExportReader:
    """Reads exports of one GoatCounter namespace through the runtime."""

    def __init__(self, runtime: Runtime, ops: ExportOps) -> None:
        self.runtime = runtime
        self.ops = ops
        self._finished: OrderedDict[int, Export] = OrderedDict()

    @property
    def api_uri(self) -> str:
        return self.runtime.base_uri(self.ops.get.consumes.namespace)

    async def get(self, export_id: int) -> Export:
        """The export object; a finished one is immutable, so it is asked for only once."""
        if export_id in self._finished:
            self._finished.move_to_end(export_id)
            return self._finished[export_id]
        async with self.runtime.call_target(self.ops.get, ExportOps.id_values(self.ops.get, export_id)) as response:
            export = Export.parse(await response.document())
        if export.status == "finished":
            self._finished[export_id] = export
            if len(self._finished) > FINISHED_CACHE_SIZE:
                self._finished.popitem(last=False)
        return export

    @asynccontextmanager
    async def open(self, export: Export, progress: Progress = no_progress) -> AsyncIterator[ExportFile]:
        """The finished export's file. Raises ExportFailed, ExportDeleted, or ApiError for other refusals."""
        if export.status == "failed":
            raise ExportFailed(f"export {export.id} failed in GoatCounter: {export.error}")
        if export.status == "running":
            raise ExportError(f"export {export.id} is still being generated")
        values = ExportOps.id_values(self.ops.download, export.id)
        async with self.runtime.call_target(self.ops.download, values) as response:
            if response.status != 200:
                raise await self._refusal(export, response)
            yield ExportFile(export, response, progress)

    async def _refusal(self, export: Export, response: UpstreamResponse) -> ExportError | ApiError:
        """Why a download of a finished export answered something other than the file."""
        try:
            document = await response.document()
        except ApiError as exc:
            # GoatCounter answers 400 when the file went missing within a day, 500 after its clean-up.
            if (exc.status == 400 and "deleted" in exc.message) or (exc.status == 500 and _past_keeping(export)):
                return ExportDeleted(
                    f"export {export.id}: {exc.message}"
                    if exc.status == 400
                    else f"export {export.id}: the file was deleted (exports are kept for 24 hours)"
                )
            return exc
        message = document.get("error") if isinstance(document, dict) else None
        return ExportError(f"export {export.id}: GoatCounter answered {response.status} {message or ''}".rstrip())

    async def page(self, export: Export, offset: int, limit: int) -> CsvPage:
        """Rows [offset, offset+limit) of a finished export, with the total; the whole file is hashed."""
        columns: list[str] = []
        version = "2"  # an export of nothing is an empty file: no header to read it from
        rows: list[list[str]] = []
        total = 0
        async with self.open(export) as file:
            async for record in file.records():
                if not columns:
                    version, columns = split_header(record)
                    continue
                if offset <= total < offset + limit:
                    rows.append(record)
                total += 1
        return CsvPage(export.id, version, columns, rows, offset, total, export.hash is not None)


def _past_keeping(export: Export) -> bool:
    finished = export.document.get("finished_at")
    try:
        when = datetime.fromisoformat(str(finished).replace("Z", "+00:00"))
    except ValueError:
        return False
    return datetime.now(UTC) - when > KEPT_FOR
