"""The one reader of GoatCounter export files, used by REST, MCP, `export`, `sync` and the agent tools.

It owns:
- the export's status (running, failed, finished) and, on download, whether its file is gone;
- the file's bytes, streamed, with the SHA-256 always checked against the export's `hash`:
  its last bytes are held back until the check passes, so a mismatch is an `IntegrityError`
  before the end of the file reaches anyone (one policy, everywhere);
- the records, from either format: the CSV (gzip-compressed, format version 2, one row per
  pageview), inflated in bounded pieces; or the JSON export (a ZIP of JSON-lines tables of
  aggregate statistics, GoatCounter newer than v2.7.0), read table by table;
- a verified local copy of a finished export (`local`), for random access: a ZIP cannot be
  read as a stream, and paging an export should not download it again for every page; for
  a CSV, a page index beside the copy (`PageIndex`: the records in blocks of 512, each
  compressed on its own, and where each block and each record starts), built once from the
  copy, so that a page inflates a few blocks and parses its own records, not the whole file.

A finished export never changes, so its object and its verified file are cached.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import types
import zipfile
import zlib
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from ..errors import ApiError, ExportDeleted, ExportError, ExportFailed, InputError, IntegrityError
from ..progress import Progress, no_progress
from ..runtime import Runtime
from ..upstream import UpstreamResponse
from .exports import Export, ExportOps
from .versions import site_root

_zlib: types.ModuleType = zlib
_ZLIB_ERRORS: tuple[type[Exception], ...] = (zlib.error,)
try:  # ISA-L's inflate: the same interface as zlib's, about twice as fast
    from isal import isal_zlib

    _zlib = isal_zlib
    _ZLIB_ERRORS = (zlib.error, cast("type[Exception]", isal_zlib.error))
except ImportError:  # pragma: no cover - without it, zlib
    pass

# What zipfile raises for a ZIP it cannot follow: damaged, cut short, or naming a compression method, a version or
# an encryption it lacks (NotImplementedError, RuntimeError), or a name that is not the UTF-8 it claims.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError)
SUPPORTED_VERSIONS = ("2",)
HASH_PREFIX = "sha256-"
HELD_BYTES = 4096  # the end of a download, held back until its SHA-256 matched (a gzip trailer is 8)
PIECE = 512 * 1024  # most bytes one inflate call may produce: a CSV of repeated rows compresses 100x
INFLATE_BUDGET = 2 * PIECE  # most bytes one inflate step (on gunzip's thread) may produce: two steps are in memory
BATCH_ROWS = 10_000  # records handed over at once by `record_batches`
FINISHED_CACHE_SIZE = 256
KEPT_FOR = timedelta(hours=24)  # GoatCounter deletes export files a day after they finished
DEFAULT_PAGE_ROWS = 100
MAX_PAGE_ROWS = 1000
DEFAULT_CACHE_BYTES = 2 * 1024**3  # verified local copies kept, least recently used first out
PAGE_BLOCK_ROWS = 512  # records per block of a page index: a page of 1000 reads three or four
PAGE_INDEX_VERSION = 1
INDEX_SUFFIXES = (".pages", ".pages.json")  # a copy's page index, beside it: its blocks, and where they are

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


class Inflater:
    """A gzip stream inflated step by step, each step giving at most `budget` bytes (in pieces of at most `piece`):
    input that would inflate to more stays for the next step, so memory stays bounded whatever the ratio. Several
    gzip members one after another are read as one stream, as gunzip does. Uses ISA-L's inflate (`isal`, about
    twice zlib's speed) when it is installed, else zlib's."""

    def __init__(self, piece: int = PIECE, budget: int = INFLATE_BUDGET) -> None:
        self.piece = piece
        self.budget = budget
        self._inflate: Any = _zlib.decompressobj(wbits=31)
        self._input = b""  # what the last step left unread

    @property
    def backlog(self) -> bool:
        """Whether input is left for another step (an empty `step(b"")` continues)."""
        return bool(self._input)

    def step(self, data: bytes) -> list[bytes]:
        pieces: list[bytes] = []
        produced = 0
        data = self._input + data if self._input else data
        try:
            while data and produced < self.budget:
                out = self._inflate.decompress(data, self.piece)
                if out:
                    pieces.append(out)
                    produced += len(out)
                if self._inflate.eof:  # a member ended: another may follow
                    data = self._inflate.unused_data
                    if data:
                        self._inflate = _zlib.decompressobj(wbits=31)
                else:
                    data = self._inflate.unconsumed_tail
        except _ZLIB_ERRORS as exc:
            raise IntegrityError(f"the export file is not valid gzip: {exc}") from None
        self._input = data
        return pieces

    def finish(self) -> list[bytes]:
        """After the last input: raises IntegrityError when the stream stopped before a gzip end marker."""
        try:
            tail = self._inflate.flush()
        except _ZLIB_ERRORS as exc:
            raise IntegrityError(f"the export file is not valid gzip: {exc}") from None
        if not self._inflate.eof:
            raise IntegrityError("the export file is truncated: the gzip stream did not end")
        return [tail] if tail else []


async def gunzip(chunks: AsyncIterator[bytes], piece: int = PIECE) -> AsyncIterator[bytes]:
    """Inflate a gzip stream as it arrives, in pieces of at most `piece` bytes (bounded memory). Raises
    IntegrityError for data that is not gzip, or that stops before the gzip end marker. (Inflating on a thread of
    its own, one chunk ahead, was measured: slower, 0.86-1.2 s against 0.70 s for 183 MB, as nothing waits on it.)"""
    inflater = Inflater(piece)
    async for chunk in chunks:
        for data in inflater.step(chunk):
            yield data
        while inflater.backlog:  # a chunk that inflates to more than a step's budget
            for data in inflater.step(b""):
                yield data
    for data in inflater.finish():
        yield data


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


class RecordSplitter:
    """CSV text that arrives in pieces, cut into whole records: a piece is parsed up to its last line break
    outside quotes (counting quotes: GoatCounter, like any CSV writer, doubles a quote inside a quoted field),
    so a quoted field may span lines and pieces. Each piece is parsed by the csv module in one call."""

    def __init__(self) -> None:
        self._carry = ""  # text after the last complete record
        self._odd = False  # whether the carry holds an odd number of quotes (an open quoted field)

    def push(self, text: str) -> list[list[str]]:
        """The records that `text` completes."""
        start = len(self._carry)
        text = self._carry + text
        odd = self._odd != (text.count('"', start) % 2 == 1)  # the quotes of all of text, as parity
        cut = text.rfind("\n") + 1
        while cut > start:  # the carry has no record end outside quotes, or it would not be a carry
            if odd == (text.count('"', cut) % 2 == 1):  # an even number of quotes before `cut`
                break
            cut = text.rfind("\n", 0, cut - 1) + 1
        else:
            cut = 0
        self._carry, self._odd = text[cut:], odd  # the quotes before `cut` are even: the carry has them all
        return parse_csv(text[:cut]) if cut else []

    def finish(self) -> list[list[str]]:
        """The last record, when the text did not end with a line break."""
        text, self._carry = self._carry, ""
        return parse_csv(text) if text else []


def parse_csv(text: str) -> list[list[str]]:
    """Records of CSV text; lines end at `\n`, `\r` or `\r\n` (as in a file opened with newline='')."""
    return list(csv.reader(io.StringIO(text, newline="")))


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
        """The file as GoatCounter wrote it (compressed). Its last HELD_BYTES come only once the SHA-256
        matched the export's hash; otherwise IntegrityError is raised in their place. Only a small tail is
        held, not a whole chunk: what has arrived flows on at once, however slowly the rest comes."""
        if self._taken:
            raise ExportError("an export file's stream can be read only once")
        self._taken = True
        digest = hashlib.sha256()
        held = b""
        size = 0
        async for chunk in self._response.chunks():
            digest.update(chunk)
            size += len(chunk)
            await self._progress("downloading", size, self.export.size_bytes)
            if len(chunk) > HELD_BYTES:
                yield held + memoryview(chunk)[:-HELD_BYTES]  # one copy: the tail before it, and all but its own
                held = chunk[-HELD_BYTES:]
            else:
                both = held + chunk
                if len(both) > HELD_BYTES:
                    yield both[:-HELD_BYTES]
                held = both[-HELD_BYTES:]
        if hash_matches(self.export.hash, digest.hexdigest()) is False:
            raise IntegrityError(
                f"export {self.export.id}: the file's SHA-256 {digest.hexdigest()} does not match {self.export.hash}"
            )
        if held:
            yield held

    async def csv_bytes(self) -> AsyncIterator[bytes]:
        """The CSV, inflated in bounded pieces; its format version is checked on the first line."""
        checked = False
        async for data in gunzip(self.chunks()):
            if not checked:
                split_header(data.split(b"\n", 1)[0].decode("utf-8", "replace").split(","))
                checked = True
            yield data

    async def record_batches(self, rows: int = BATCH_ROWS) -> AsyncIterator[list[list[str]]]:
        """Every CSV record, the header first (checked with `split_header` by the caller), in lists of about
        `rows` (the last may be shorter; none is empty), in constant memory. The last records come only after
        the SHA-256 matched."""
        decode = codecs.getincrementaldecoder("utf-8")()
        splitter = RecordSplitter()
        batch: list[list[str]] = []
        try:
            async for piece in gunzip(self.chunks()):
                batch.extend(splitter.push(decode.decode(piece)))
                if len(batch) >= rows:
                    yield batch
                    batch = []
            batch.extend(splitter.push(decode.decode(b"", final=True)))
            batch.extend(splitter.finish())
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"the export file is not valid UTF-8: {exc}") from None
        except csv.Error as exc:  # a field past csv's limit (131,072 characters): not a file GoatCounter writes
            raise IntegrityError(f"export {self.export.id}: the CSV cannot be read: {exc}") from None
        if batch:
            yield batch

    async def records(self) -> AsyncIterator[list[str]]:
        """Every CSV record, the header first (checked with `split_header` by the caller), in constant memory."""
        async for batch in self.record_batches():
            for record in batch:
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
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as exc:
            raise IntegrityError(
                f"export {self.export.id}: the file is not valid gzip-compressed UTF-8 CSV: {exc}"
            ) from None

    # -- JSON (ZIP) ------------------------------------------------------------------------

    def _zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except ZIP_ERRORS as exc:
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
            except (*ZIP_ERRORS, RecursionError) as exc:  # RecursionError: JSON nested past Python's limit
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
                except (ValueError, RecursionError):
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
        except ZIP_ERRORS as exc:
            raise IntegrityError(f"export {self.export.id}: {member} cannot be read: {exc}") from None


class PageIndex:
    """Random access to the records of a verified local CSV copy, built once from it and kept beside it.

    `<copy>.pages` holds the records (the header apart) in blocks of PAGE_BLOCK_ROWS, each compressed on its own
    (zlib, fast level) with where each of its records ends; `<copy>.pages.json` says where each block starts, the
    header, and the total. A page inflates the block(s) it needs and parses just its own records. The JSON is
    written last (and atomically): a page index without it does not exist. The cache's eviction takes a copy and
    its index together (`_evict`), so the index counts in the cache's bounded size (about 1.3x the gzip file).

    Blocking file I/O: call it from a thread.
    """

    def __init__(self, local: LocalExport) -> None:
        self.local = local
        self.blocks_path = local.path.with_name(local.path.name + INDEX_SUFFIXES[0])
        self.index_path = local.path.with_name(local.path.name + INDEX_SUFFIXES[1])
        self.version = "2"  # an export of nothing is an empty file: no header to read it from
        self.columns: list[str] = []
        self.total = 0
        self.offsets: list[int] = []  # where each block starts in the blocks file; one more: where the last ends

    def load(self) -> bool:
        """Whether a complete index of this copy is there (read into this object)."""
        try:
            document = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(document, dict) or document.get("index_version") != PAGE_INDEX_VERSION:
            return False
        if document.get("hash") != self.local.export.hash or document.get("block_rows") != PAGE_BLOCK_ROWS:
            return False
        self.version, self.columns = str(document["version"]), list(document["columns"])
        self.total, self.offsets = int(document["total"]), [int(n) for n in document["offsets"]]
        return True

    def build(self) -> None:
        """Read the copy once and write the blocks, then the index. Records are cut without being parsed (a record
        ends at a line break outside quotes); a second thread compresses and writes while the next block is cut."""
        folder = self.local.path.parent
        handle, temporary = tempfile.mkstemp(prefix=f".{self.blocks_path.name}.", suffix=".partial", dir=folder)
        try:
            with os.fdopen(handle, "wb") as out, ThreadPoolExecutor(1, "page-index") as writer:
                self.offsets = [0]
                written: list[Future[int]] = []
                block: list[bytes] = []
                total = 0
                records = self._records()
                header = next(records, None)
                if header is not None:
                    self.version, self.columns = split_header(parse_csv(_text(header, self.local.export.id))[0])
                for record in records:
                    block.append(record)
                    if len(block) == PAGE_BLOCK_ROWS:
                        written.append(writer.submit(_write_block, out, block))
                        total += len(block)
                        block = []
                        if len(written) > 4:  # bounded: at most a few blocks wait for the writer
                            self.offsets.append(self.offsets[-1] + written.pop(0).result())
                if block:
                    written.append(writer.submit(_write_block, out, block))
                    total += len(block)
                for future in written:
                    self.offsets.append(self.offsets[-1] + future.result())
                self.total = total
            os.replace(temporary, self.blocks_path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        document = {
            "index_version": PAGE_INDEX_VERSION,
            "hash": self.local.export.hash,
            "block_rows": PAGE_BLOCK_ROWS,
            "version": self.version,
            "columns": self.columns,
            "total": self.total,
            "offsets": self.offsets,
        }
        handle, temporary = tempfile.mkstemp(prefix=f".{self.index_path.name}.", suffix=".partial", dir=folder)
        with os.fdopen(handle, "w") as out:
            json.dump(document, out, separators=(",", ":"))
        os.replace(temporary, self.index_path)

    def _records(self) -> Iterator[bytes]:
        """The copy's records as CSV (UTF-8, as GoatCounter wrote it), each with its line break(s). A record ends at
        a `\n` outside quotes (a lone `\r` stays inside its line: GoatCounter quotes any field with one)."""
        pending: list[bytes] = []  # the lines of a record with a quoted line break, so far
        carry = b""
        try:
            with gzip.open(self.local.path, "rb") as source:
                while True:
                    data = source.read(PIECE)
                    lines = (carry + data).split(b"\n")
                    carry = lines.pop() if data else b""
                    if not data and not lines[-1]:
                        lines.pop()  # the file ended with a line break
                    for line in lines:
                        if pending or line.count(b'"') % 2:
                            pending.append(line)
                            if sum(part.count(b'"') for part in pending) % 2 == 0:
                                yield b"\n".join(pending) + b"\n"
                                pending = []
                        else:
                            yield line + b"\n"
                    if not data:
                        break
        except (OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"export {self.local.export.id}: the file is not valid gzip: {exc}") from None
        if pending:
            yield b"\n".join(pending)

    def rows(self, offset: int, limit: int) -> list[list[str]]:
        """Records [offset, offset + limit) of the export (the header apart)."""
        if limit <= 0 or offset >= self.total:
            return []
        end = min(offset + limit, self.total)
        first, last = offset // PAGE_BLOCK_ROWS, (end - 1) // PAGE_BLOCK_ROWS
        with self.blocks_path.open("rb") as blocks:
            blocks.seek(self.offsets[first])
            data = blocks.read(self.offsets[last + 1] - self.offsets[first])
        texts: list[bytes] = []
        for number in range(first, last + 1):
            start, stop = self.offsets[number] - self.offsets[first], self.offsets[number + 1] - self.offsets[first]
            try:
                raw = zlib.decompress(data[start:stop])
                count = int.from_bytes(raw[:4], "little")
                ends = array("I", raw[4 : 4 + 4 * count])
                if sys.byteorder != "little":
                    ends.byteswap()
            except (zlib.error, ValueError) as exc:
                raise IntegrityError(f"export {self.local.export.id}: its page index is damaged: {exc}") from None
            base, head = number * PAGE_BLOCK_ROWS, 4 + 4 * count
            low, high = max(offset, base) - base, min(end, base + count) - base
            texts.append(raw[head + (ends[low - 1] if low else 0) : head + ends[high - 1]])
        try:
            return parse_csv(_text(b"".join(texts), self.local.export.id))
        except csv.Error as exc:
            raise IntegrityError(f"export {self.local.export.id}: the CSV cannot be read: {exc}") from None


def _write_block(out: BinaryIO, records: list[bytes]) -> int:
    """One block: how many records, where each ends (in bytes of its text), and the text; compressed."""
    ends = array("I", accumulate(map(len, records)))  # 4 bytes each on every platform Python runs on
    if sys.byteorder != "little":
        ends.byteswap()
    return out.write(zlib.compress(len(records).to_bytes(4, "little") + ends.tobytes() + b"".join(records), 1))


def _text(data: bytes, export_id: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"export {export_id}: the file is not valid UTF-8: {exc}") from None


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
        self._indexing: dict[int, asyncio.Lock] = {}

    @property
    def api_uri(self) -> str:
        return self.runtime.base_uri(self.ops.get.consumes.namespace)

    @property
    def site(self) -> str:
        """The site, as the synced copy keys it: its URL (`https://mysite.goatcounter.com`)."""
        return site_root(self.api_uri)

    async def get(self, export_id: int) -> Export:
        """The export object; a finished one is immutable, so it is asked for only once."""
        cached = self.cached(export_id)
        if cached is not None:
            return cached
        async with self.runtime.call_target(self.ops.get, ExportOps.id_values(self.ops.get, export_id)) as response:
            export = Export.parse(await response.document())
        self.remember(export)
        return export

    def cached(self, export_id: int) -> Export | None:
        """The export object when it is known finished (it cannot change any more), without asking anyone."""
        export = self._finished.get(export_id)
        if export is not None:
            self._finished.move_to_end(export_id)
        return export

    def remember(self, export: Export) -> None:
        """Keep an export object seen elsewhere (a passed-through answer), when it is finished."""
        if export.status == "finished":
            self._finished[export.id] = export
            self._finished.move_to_end(export.id)
            if len(self._finished) > FINISHED_CACHE_SIZE:
                self._finished.popitem(last=False)

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
        the JSON export (`table`, default hit_stats). Read from the verified local copy; a CSV's through its
        page index, built on the first page asked for (concurrent first pages wait for one build)."""
        local = await self.local(export)
        if local.kind == "csv" and table is None:
            index = PageIndex(local)
            if not await asyncio.to_thread(index.load):
                async with self._indexing.setdefault(export.id, asyncio.Lock()):
                    if not await asyncio.to_thread(index.load):
                        await asyncio.to_thread(index.build)
                await asyncio.to_thread(_evict, self.cache_dir, self.cache_bytes, keep=local.path)
            return await asyncio.to_thread(_indexed_page, index, offset, limit)
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


def _indexed_page(index: PageIndex, offset: int, limit: int) -> Page:
    export = index.local.export
    rows = index.rows(offset, limit)
    return Page(export.id, index.version, index.columns, rows, offset, index.total, export.hash is not None)


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
    """Delete the least recently used copies, each with its page index, until the cache holds at most `limit`
    bytes (never `keep`'s)."""
    groups: dict[Path, list[Path]] = {}
    for path in cache_dir.rglob("*"):
        if not path.is_file() or path.name.endswith(".partial"):
            continue
        name = path.name
        for suffix in INDEX_SUFFIXES:
            name = name.removesuffix(suffix)
        groups.setdefault(path.with_name(name), []).append(path)
    sizes = {copy: sum(p.stat().st_size for p in files) for copy, files in groups.items()}
    used = {copy: max(p.stat().st_mtime for p in files) for copy, files in groups.items()}
    total = sum(sizes.values())
    for copy in sorted(groups, key=lambda c: used[c]):
        if total <= limit:
            return
        if copy != keep:
            total -= sizes[copy]
            for path in groups[copy]:
                path.unlink(missing_ok=True)


def _past_keeping(export: Export) -> bool:
    finished = export.document.get("finished_at")
    try:
        when = datetime.fromisoformat(str(finished).replace("Z", "+00:00"))
    except ValueError:
        return False
    return datetime.now(UTC) - when > KEPT_FOR
