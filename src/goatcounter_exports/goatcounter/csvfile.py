"""GoatCounter's export file: gzip-compressed CSV, format version 2.

Read as a stream, in constant memory: the SHA-256 of the compressed bytes (to
compare with the export's `hash`), the header (whose first field carries the
format version as a prefix), and the records, which may span lines.
"""

from __future__ import annotations

import codecs
import csv
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from ..errors import ExportError
from ..gzipstream import TruncatedGzip, gunzip

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

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


async def iter_records(chunks: AsyncIterator[bytes], digest: Hash | None = None) -> AsyncIterator[list[str]]:
    """Every record of a streamed gzip CSV file, header first, in constant memory.

    `digest`, when given, is updated with the compressed bytes (to compare with the export's hash).
    """

    async def hashed() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if digest is not None:
                digest.update(chunk)
            yield chunk

    decode = codecs.getincrementaldecoder("utf-8")()
    records = RecordStream()
    pending = ""
    try:
        async for piece in gunzip(hashed()):
            lines = (pending + decode.decode(piece)).split("\n")
            pending = lines.pop()
            for record in records.push([line + "\n" for line in lines]):
                yield record
        pending += decode.decode(b"", final=True)
    except (zlib.error, UnicodeDecodeError, TruncatedGzip) as exc:
        raise ExportError(f"the export file is not valid, complete gzip-compressed UTF-8: {exc}") from None
    for record in records.push([pending] if pending else [], final=True):
        yield record
