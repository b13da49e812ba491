"""The one reader of GoatCounter export files, used by REST, MCP, `export`, `sync` and the agent tools.

It owns:
- the export's status (running, failed, finished) and, on download, whether its file is gone;
- the file's bytes, streamed, with the SHA-256 always checked against the export's `hash`:
  the last piece is held back until the check passes, so a mismatch is an `IntegrityError`
  before the end of the file reaches anyone (one policy, everywhere);
- the records, from either format: the CSV (gzip-compressed, format version 2, one row per
  pageview), inflated in bounded pieces; or the JSON export (a ZIP of JSON-lines tables of
  aggregate statistics, GoatCounter newer than v2.7.0), read table by table;
- a verified local copy of a finished export (`local`), for random access: a ZIP cannot be
  read as a stream, and paging an export should not download it again for every page.

A finished export never changes, so its object and its verified file are cached.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import gzip
import hashlib
import json
import os
import re
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from ..errors import ApiError, ExportDeleted, ExportError, ExportFailed, InputError, IntegrityError
from ..progress import Progress, no_progress
from ..runtime import Runtime
from ..upstream import UpstreamResponse
from .exports import Export, ExportOps
from .versions import site_root

SUPPORTED_VERSIONS = ("2",)
HASH_PREFIX = "sha256-"
PIECE = 256 * 1024  # most bytes one inflate step may produce: a CSV of repeated rows compresses 100x
FINISHED_CACHE_SIZE = 256
KEPT_FOR = timedelta(hours=24)  # GoatCounter deletes export files a day after they finished
DEFAULT_PAGE_ROWS = 100
MAX_PAGE_ROWS = 1000
DEFAULT_CACHE_BYTES = 2 * 1024**3  # verified local copies kept, least recently used first out

# The JSON export (exportjson.go, export_version 1.x): its tables, dimension tables first, and their columns.
JSON_EXPORT_MAJOR = "1"
DIMENSION_TABLES: dict[str, tuple[str, ...]] = {
    "paths": ("id", "path", "title", "event"),
    "refs": ("id", "ref", "ref_scheme"),
    "browsers": ("id", "name", "version"),
    "systems": ("id", "name", "version"),
    "locations": ("country", "region", "country_name", "region_name"),
    "languages": ("iso_639_3", "name"),
}
STATS_TABLES: dict[str, tuple[str, ...]] = {
    "hit_stats": ("hour", "path_id", "ref_id", "count"),
    "browser_stats": ("day", "path_id", "browser_id", "count"),
    "system_stats": ("day", "path_id", "system_id", "count"),
    "location_stats": ("day", "path_id", "location", "count"),
    "size_stats": ("day", "path_id", "width", "count"),
    "language_stats": ("day", "path_id", "language", "count"),
}
OPTIONAL_TABLES: dict[str, tuple[str, ...]] = {  # commented out at main f3c7b792f78b, read when present
    "campaigns": ("id", "name"),
    "campaign_stats": ("day", "path_id", "campaign_id", "ref", "count"),
}
JSON_TABLES = {**DIMENSION_TABLES, **STATS_TABLES, **OPTIONAL_TABLES}
DEFAULT_TABLE = "hit_stats"
Kind = Literal["csv", "zip"]


def kind_of(export_format: str) -> Kind:
    return "zip" if export_format == "json" else "csv"


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


class LocalExport:
    """A finished export's file on disk, its SHA-256 already checked: read it as often as needed.

    Blocking file I/O: call its methods from a thread (`asyncio.to_thread`) inside the event loop.
    """

    def __init__(self, export: Export, path: Path) -> None:
        self.export = export
        self.path = path
        self.kind: Kind = kind_of(export.format)

    # -- CSV -------------------------------------------------------------------------------

    def csv_records(self) -> Iterator[list[str]]:
        """Every record of the CSV, header first."""
        try:
            with gzip.open(self.path, "rt", encoding="utf-8", newline="") as text:
                yield from csv.reader(text)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            raise IntegrityError(
                f"export {self.export.id}: the file is not valid gzip-compressed UTF-8: {exc}"
            ) from None

    # -- JSON (ZIP) ------------------------------------------------------------------------

    def _zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise IntegrityError(f"export {self.export.id}: the file is not a valid ZIP: {exc}") from None

    def _members(self, archive: zipfile.ZipFile) -> dict[str, str]:
        """Table name (or "info") -> member name; the folder inside the ZIP is named after the file."""
        found = {}
        for name in archive.namelist():
            base = name.rsplit("/", 1)[-1]
            if base == "info.json":
                found["info"] = name
            elif base.endswith(".jsonl"):
                found[base.removesuffix(".jsonl")] = name
        return found

    def info(self) -> dict[str, Any]:
        """`info.json`, checked: an export_version of another major version is refused; every table is there."""
        with self._zip() as archive:
            members = self._members(archive)
            if "info" not in members:
                raise IntegrityError(f"export {self.export.id}: the ZIP has no info.json")
            try:
                info = json.loads(archive.read(members["info"]))
            except (ValueError, zipfile.BadZipFile, zlib.error) as exc:
                raise IntegrityError(f"export {self.export.id}: info.json cannot be read: {exc}") from None
        version = str(info.get("export_version", "")) if isinstance(info, dict) else ""
        if version.split(".")[0] != JSON_EXPORT_MAJOR:
            raise IntegrityError(
                f"export {self.export.id}: unsupported JSON export_version {version or '(none)'!r}; "
                f"this tool reads version {JSON_EXPORT_MAJOR}.x"
            )
        missing = sorted((set(DIMENSION_TABLES) | set(STATS_TABLES)) - set(members))
        if missing:
            raise IntegrityError(f"export {self.export.id}: the ZIP lacks the table(s) {', '.join(missing)}")
        return dict(info)

    def tables(self) -> dict[str, int]:
        """Each table of the ZIP with its row count."""
        self.info()
        with self._zip() as archive:
            members = self._members(archive)
            return {
                table: sum(1 for _ in self._lines(archive, members[table])) for table in JSON_TABLES if table in members
            }

    def rows(self, table: str) -> Iterator[dict[str, Any]]:
        """The rows of one table, as GoatCounter wrote them (objects of the JSON lines)."""
        if table not in JSON_TABLES:
            raise IntegrityError(f"the JSON export has no table {table!r}")
        with self._zip() as archive:
            members = self._members(archive)
            if table not in members:
                if table in OPTIONAL_TABLES:
                    return
                raise IntegrityError(f"export {self.export.id}: the ZIP lacks the table {table}")
            for line in self._lines(archive, members[table]):
                try:
                    row = json.loads(line)
                except ValueError:
                    raise IntegrityError(f"export {self.export.id}: a line of {table} is not JSON") from None
                if not isinstance(row, dict):
                    raise IntegrityError(f"export {self.export.id}: a line of {table} is not a JSON object")
                yield row

    def _lines(self, archive: zipfile.ZipFile, member: str) -> Iterator[bytes]:
        try:
            with archive.open(member) as stream:
                for line in stream:
                    if line.strip():
                        yield line
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise IntegrityError(f"export {self.export.id}: {member} cannot be read: {exc}") from None


@dataclass(frozen=True)
class Page:
    """One page of an export's rows: the CSV's pageviews, or one table of the JSON export."""

    export_id: int
    version: str  # the CSV format version, or the JSON export_version
    columns: list[str]
    rows: list[list[str]]
    offset: int
    total_rows: int
    hash_checked: bool  # False only when GoatCounter gave no hash to check against
    table: str | None = None  # the JSON export's table; None for CSV
    tables: dict[str, int] | None = None  # the JSON export's tables and their row counts

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.rows) < self.total_rows

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.rows) if self.has_more else None


class ExportReader:
    """Reads exports of one GoatCounter namespace through the runtime.

    `cache_dir` holds verified local copies (at most `cache_bytes`, least recently used out first).
    """

    def __init__(
        self, runtime: Runtime, ops: ExportOps, cache_dir: Path, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.runtime = runtime
        self.ops = ops
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self._finished: OrderedDict[int, Export] = OrderedDict()
        self._copying: dict[int, asyncio.Lock] = {}

    @property
    def api_uri(self) -> str:
        return self.runtime.base_uri(self.ops.get.consumes.namespace)

    @property
    def site(self) -> str:
        """The site, as the synced copy keys it: its URL (`https://mysite.goatcounter.com`)."""
        return site_root(self.api_uri)

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
                raise await refusal(export, response)
            yield ExportFile(export, response, progress)

    async def local(self, export: Export, progress: Progress = no_progress) -> LocalExport:
        """A verified local copy of the finished export's file, downloaded once and then reused."""
        folder = self.cache_dir / _safe(self.api_uri)
        suffix = ".zip" if kind_of(export.format) == "zip" else ".csv.gz"
        path = folder / f"{export.id}-{(export.hash or 'nohash').removeprefix(HASH_PREFIX)[:16]}{suffix}"
        lock = self._copying.setdefault(export.id, asyncio.Lock())
        async with lock:  # concurrent pages of one export share one download
            if path.exists():
                os.utime(path)  # recently used: evicted last
                return LocalExport(export, path)
            folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
            try:
                with os.fdopen(handle, "wb") as out:
                    async with self.open(export, progress) as file:
                        async for chunk in file.chunks():  # verified before its last chunk
                            out.write(chunk)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        await asyncio.to_thread(_evict, self.cache_dir, self.cache_bytes, keep=path)
        return LocalExport(export, path)

    async def page(self, export: Export, offset: int, limit: int, table: str | None = None) -> Page:
        """Rows [offset, offset+limit) of a finished export, with the total: of the CSV, or of one table of
        the JSON export (`table`, default hit_stats). Read from the verified local copy."""
        local = await self.local(export)
        return await asyncio.to_thread(_page, local, offset, limit, table)


async def refusal(export: Export, response: UpstreamResponse) -> ExportError | ApiError:
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


def _page(local: LocalExport, offset: int, limit: int, table: str | None) -> Page:
    export = local.export
    rows: list[list[str]] = []
    total = 0
    if local.kind == "zip":
        name = table or DEFAULT_TABLE
        tables = local.tables()
        if name not in tables:
            raise InputError(f"export {export.id} has no table {name!r}; it has {', '.join(tables)}", field="table")
        fields = list(JSON_TABLES[name])
        for row in local.rows(name):
            if offset <= total < offset + limit:
                rows.append([_cell(row.get(field)) for field in fields])
            total += 1
        version = str(local.info().get("export_version", ""))
        return Page(export.id, version, fields, rows, offset, total, export.hash is not None, name, tables)
    if table is not None:
        raise InputError(f"export {export.id} is a CSV export: it has no tables", field="table")
    columns: list[str] = []
    version = "2"  # an export of nothing is an empty file: no header to read it from
    for record in local.csv_records():
        if not columns:
            version, columns = split_header(record)
            continue
        if offset <= total < offset + limit:
            rows.append(record)
        total += 1
    return Page(export.id, version, columns, rows, offset, total, export.hash is not None)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _safe(api_uri: str) -> str:
    """A folder name for a site: its host, port and path, with anything else turned into `_`."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", api_uri.split("://", 1)[-1]).strip("_")


def _evict(cache_dir: Path, limit: int, keep: Path) -> None:
    """Delete the least recently used copies until the cache holds at most `limit` bytes (never `keep`)."""
    files = [p for p in cache_dir.rglob("*") if p.is_file() and not p.name.endswith(".partial")]
    total = sum(p.stat().st_size for p in files)
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        if total <= limit:
            return
        if path != keep:
            total -= path.stat().st_size
            path.unlink(missing_ok=True)


def _past_keeping(export: Export) -> bool:
    finished = export.document.get("finished_at")
    try:
        when = datetime.fromisoformat(str(finished).replace("Z", "+00:00"))
    except ValueError:
        return False
    return datetime.now(UTC) - when > KEPT_FOR
