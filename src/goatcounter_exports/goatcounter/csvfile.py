"""GoatCounter's export file: gzip-compressed CSV, format version 2.

Read as a stream, in constant memory: the SHA-256 of the compressed bytes (to
compare with the export's `hash`), the header (whose first field carries the
format version as a prefix), and the records, which may span lines.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from ..errors import ExportError

SUPPORTED_VERSIONS = ("2",)
HASH_PREFIX = "sha256-"


def split_header(header: list[str]) -> tuple[str, list[str]]:
    """`["2Path", "Title", ...]` -> ("2", ["Path", "Title", ...]). Refuses an unknown version."""
    if not header or not header[0]:
        raise ExportError("the export file has no CSV header")
    first = header[0]
    digits = len(first) - len(first.lstrip("0123456789"))
    version = first[:digits]
    if version not in SUPPORTED_VERSIONS:
        raise ExportError(
            f"unsupported export format version {version or '(none)'!r}; this tool reads version "
            + ", ".join(SUPPORTED_VERSIONS)
        )
    return version, [first[digits:], *header[1:]]


def hash_matches(expected: str | None, sha256_hex: str) -> bool | None:
    """Compare with GoatCounter's `hash` ("sha256-<hex>"); None when there is nothing to compare."""
    if not expected:
        return None
    return expected.strip().lower() == HASH_PREFIX + sha256_hex


@dataclass
class GzipCsvReader:
    """Feed compressed chunks; iterate complete CSV records as they become available."""

    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    compressed_bytes: int = 0
    _inflate: zlib._Decompress = field(default_factory=lambda: zlib.decompressobj(wbits=31))
    _decode: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")())
    _pending: str = ""
    _lines: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.compressed_bytes += len(chunk)
        try:
            text = self._decode.decode(self._inflate.decompress(chunk))
        except (zlib.error, UnicodeDecodeError) as exc:
            raise ExportError(f"the export file is not valid gzip-compressed UTF-8: {exc}") from None
        self._split(text)

    def close(self) -> None:
        try:
            text = self._decode.decode(self._inflate.flush(), final=True)
        except (zlib.error, UnicodeDecodeError) as exc:
            raise ExportError(f"the export file is truncated or corrupt: {exc}") from None
        if not self._inflate.eof:
            raise ExportError("the export file is truncated (gzip stream did not end)")
        self._split(text)
        if self._pending:
            self._lines.append(self._pending)
            self._pending = ""

    def _split(self, text: str) -> None:
        parts = (self._pending + text).split("\n")
        self._pending = parts.pop()
        self._lines.extend(part + "\n" for part in parts)

    def take_lines(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines


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


async def iter_records(chunks: AsyncIterator[bytes], reader: GzipCsvReader) -> AsyncIterator[list[str]]:
    """Every record of a streamed export file, header first. `reader` holds the hash once done."""
    records = RecordStream()
    async for chunk in chunks:
        reader.feed(chunk)
        for record in records.push(reader.take_lines()):
            yield record
    reader.close()
    for record in records.push(reader.take_lines(), final=True):
        yield record
