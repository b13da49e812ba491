"""The export job users actually do: create (or reuse), wait, then read the file (exportfile).

Shared by the `export` and `sync` commands and the `export-pageviews` tool. Waiting
backs off from a quarter second to five (well under GoatCounter's 4 requests a
second), stops at the export's `error` field, and gives up at a deadline: a
background export that dies after writing its rows never sets `error` nor
`finished_at`, so a waiter without a deadline waits forever.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportFailed, RateLimited, WaitTimeout
from ..progress import Progress, no_progress
from .exportfile import ExportFile, ExportReader
from .exports import Export
from .store import RECENT_EXPORT_SECONDS, StateStore

FIRST_POLL = 0.25
MAX_POLL = 5.0


@dataclass
class ExportJob:
    reader: ExportReader
    store: StateStore | None
    progress: Progress = no_progress

    @property
    def api_uri(self) -> str:
        return self.reader.api_uri

    async def create_or_reuse(self, start: int) -> tuple[Export, bool]:
        """A new export of hits after `start`, or, when the budget is spent, a recent one of ours
        covering the same range. Returns (export, reused)."""
        if self.store is not None:
            budget = await self.store.budget(self.api_uri)
            if budget is not None and budget.exhausted(time.time()):
                since = time.time() - RECENT_EXPORT_SECONDS
                recent = await self.store.latest_export(self.api_uri, since=since, start=start)
                if recent is not None:
                    export = await self.reader.get(recent)
                    if export.status != "failed":
                        return export, True
        create = self.reader.ops.create
        async with self.reader.runtime.call_target(create, {"body": {"start_from_hit_id": start}}) as response:
            return Export.parse(await response.document()), False

    async def wait(self, export: Export, wait_seconds: float) -> Export:
        deadline = time.monotonic() + wait_seconds
        delay = FIRST_POLL
        while True:
            if export.status == "failed":
                raise ExportFailed(f"export {export.id} failed in GoatCounter: {export.error}")
            if export.status == "finished":
                return export
            if time.monotonic() + delay > deadline:
                raise WaitTimeout(f"export {export.id} did not finish within {wait_seconds:.0f} seconds")
            await self.progress("waiting", time.monotonic() - (deadline - wait_seconds), wait_seconds)
            await asyncio.sleep(delay)
            delay = min(delay * 1.6, MAX_POLL)
            try:
                export = await self.reader.get(export.id)
            except RateLimited as exc:
                delay = max(delay, exc.retry_after or MAX_POLL)


async def write_atomically(file: ExportFile, destination: Path, *, decompress: bool) -> int:
    """Write to a temporary file beside `destination`, then rename: a failure leaves nothing behind.

    With `decompress`, the CSV is inflated on the way (its version checked). Returns the bytes written.
    """
    destination = destination.resolve()
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    written = 0
    data: AsyncIterator[bytes] = file.csv_bytes() if decompress else file.chunks()
    try:
        with os.fdopen(handle, "wb") as out:
            async for piece in data:
                out.write(piece)
                written += len(piece)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written
