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

from ..errors import ConfigError, ExportFailed, OutputError, RateLimited, WaitTimeout
from ..progress import Progress, no_progress
from .exportfile import ExportFile, ExportReader
from .exports import Export, ExportRequest, Format
from .site import SiteProbe, empty_csv_note, pageviews_off
from .store import RECENT_EXPORT_SECONDS, Store
from .versions import CreateBodyStyle

FIRST_POLL = 0.25
MAX_POLL = 5.0
# After this long, poll at most every SLOW_POLL seconds: main allows 500 API calls an hour (api2), so an
# export that runs for an hour is polled about 120 times, not 720.
SLOW_AFTER = 120.0
SLOW_POLL = 30.0


def current_umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: put it back at once
    os.umask(mask)
    return mask


def next_poll(delay: float, waited: float) -> float:
    """The pause before the next look at a running export: growing to MAX_POLL, then to SLOW_POLL."""
    return min(delay * 1.6, MAX_POLL if waited < SLOW_AFTER else SLOW_POLL)


@dataclass
class ExportJob:
    reader: ExportReader
    store: Store | None
    create_body: CreateBodyStyle
    site: SiteProbe
    progress: Progress = no_progress

    @property
    def api_uri(self) -> str:
        return self.reader.api_uri

    @property
    def namespace(self) -> str:
        return self.reader.ops.create.consumes.namespace

    async def json_available(self) -> bool:
        """Whether the server makes JSON exports (main, goatcounter.com) or only CSV (v2.7.0), asked at no cost
        to the export budget."""
        _, takes_format = await self.create_body.learn(self.reader.runtime.client.fetch_json, self.api_uri)
        return takes_format

    async def choose_format(self, wanted: Format | None) -> Format:
        """`wanted`, or for None (auto) JSON where the server has it and CSV on v2.7.0. A CSV export of a site
        known to keep no individual pageviews is refused here, before it spends the hourly budget."""
        chosen: Format = wanted or ("json" if await self.json_available() else "csv")
        if chosen == "csv" and await self.site.collects_pageviews(self.reader.runtime, self.namespace) is False:
            raise ConfigError(pageviews_off(await self.json_available()))
        return chosen

    async def empty_note(self, export: Export) -> str | None:
        """Why a finished CSV export has no rows (None when it has some)."""
        return empty_csv_note(await self.json_available()) if export.is_empty_csv else None

    async def create_or_reuse(self, request: ExportRequest) -> tuple[Export, bool]:
        """A new export, or, when the budget is spent, a recent one of ours of the same request.
        Returns (export, reused)."""
        if self.store is not None:
            budget = await self.store.budget(self.api_uri)
            if budget is not None and budget.exhausted(time.time()):
                since = time.time() - RECENT_EXPORT_SECONDS
                recent = await self.store.latest_export(self.api_uri, since=since, request=request.key)
                if recent is not None:
                    export = await self.reader.get(recent)
                    if export.status != "failed":
                        return export, True
        create = self.reader.ops.create
        async with self.reader.runtime.call_target(create, {"body": request.body()}) as response:
            return Export.parse(await response.document()), False

    async def wait(self, export: Export, wait_seconds: float) -> Export:
        started = time.monotonic()
        deadline = started + wait_seconds
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
            delay = next_poll(delay, time.monotonic() - started)
            try:
                export = await self.reader.get(export.id)
            except RateLimited as exc:
                delay = max(delay, exc.retry_after or MAX_POLL)


# GoatCounter writes an export of no pageviews as an empty file; an empty CSV still has its header.
CSV_V2_HEADER = (
    b"2Path,Title,Event,UserAgent,Browser,System,Session,Bot,Referrer,Referrer scheme,Screen size,Location,"
    b"FirstVisit,Date\n"
)


async def write_atomically(file: ExportFile, destination: Path, *, decompress: bool) -> int:
    """Write to a temporary file beside `destination`, then rename: a failure leaves nothing behind.

    With `decompress`, the CSV is inflated on the way (its version checked), and an export of no rows
    is written as its header alone. The file gets the mode any new file would (0666 less the umask).
    Returns the bytes written.
    """
    destination = destination.resolve()
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {destination}: {exc.strerror}; nothing was written") from None
    written = 0
    data: AsyncIterator[bytes] = file.csv_bytes() if decompress else file.chunks()
    try:
        with os.fdopen(handle, "wb") as out:
            async for piece in data:
                out.write(piece)
                written += len(piece)
            if decompress and written == 0:
                written = out.write(CSV_V2_HEADER)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, destination)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"cannot write {destination}: {exc.strerror}; nothing was written") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written
