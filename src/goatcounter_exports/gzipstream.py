"""Inflate a gzip stream as it arrives, in bounded pieces.

A CSV of repeated rows compresses a hundredfold or more, so one 64 KiB network chunk can inflate
to megabytes: output is produced at most `piece` bytes at a time, which keeps every consumer (the
REST adapter's `Accept: text/csv`, the CSV readers, the file writer) in constant memory.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

PIECE = 256 * 1024


class TruncatedGzip(EOFError):
    """The gzip stream ended before its end marker."""


async def gunzip(chunks: AsyncIterator[bytes], piece: int = PIECE) -> AsyncIterator[bytes]:
    """Raises zlib.error for data that is not gzip, TruncatedGzip when the stream stops early."""
    inflate = zlib.decompressobj(wbits=31)
    async for chunk in chunks:
        data = inflate.decompress(chunk, piece)
        if data:
            yield data
        while inflate.unconsumed_tail:
            data = inflate.decompress(inflate.unconsumed_tail, piece)
            if data:
                yield data
    tail = inflate.flush()
    if tail:
        yield tail
    if not inflate.eof:
        raise TruncatedGzip("the gzip stream did not end")
