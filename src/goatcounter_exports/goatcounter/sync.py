"""Incremental, exact copy of a site's data into the warehouse (goatcounter/warehouse.py).

One export per run (the hourly budget allows one), of the format the site can fill:
- CSV (individual pageviews): the hits after the stored cursor. `start_from_hit_id` is
  exclusive, so the next run starts from the previous export's `last_hit_id` exactly
  (adding 1 would drop a pageview per run).
- JSON (aggregate statistics, GoatCounter newer than v2.7.0): the statistics from the day the
  previous export was made on. Statistics are kept per hour or day, so that day's numbers were
  partial: they are replaced, as GoatCounter's own documentation advises, never added to.

Rows and cursor are written in ONE transaction, and whole runs on one database are serialised.
A run killed at any point leaves either the old data and cursor or the new ones, so the next
run converges: after any sequence of runs, the copy's totals per day and path equal GoatCounter's.

How a CSV file gets in is the warehouse's: parsed batches bound as the CSV has them into SQLite, with
the index built once at the end of a large load (warehouse.py), or COPY into PostgreSQL
(warehouse_postgres.py). Either way the last rows go in only after the file's SHA-256 matched, and
the transaction commits after the rows were counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

from ..errors import IntegrityError
from .exportfile import DIMENSION_TABLES, STATS_TABLES, LocalExport
from .exports import Export, ExportRequest, Format
from .warehouse import Warehouse
from .workflow import ExportJob


@dataclass(frozen=True)
class SyncResult:
    format: Format
    export_id: int
    reused: bool
    rows_added: int  # pageviews added (CSV), or statistics rows written (JSON)
    total: int  # pageviews in all (CSV), or visitors in all (JSON)
    cursor_before: str
    cursor_after: str
    note: str | None = None  # why a CSV export was empty, and what to do

    def line(self, database: object) -> str:
        how = "reused" if self.reused else "new"
        if self.format == "json":
            return (
                f"Synced statistics ({how} JSON export {self.export_id}, days from {self.cursor_before}) into "
                f"{database}: {self.rows_added} rows written, {self.total} visitors in all. "
                f"Next run starts from {self.cursor_after}."
            )
        return (
            f"Synced {self.rows_added} pageviews ({how} export {self.export_id}, hits {self.cursor_before} < id <= "
            f"{self.cursor_after}) into {database}: {self.total} in all."
        )


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection during a load: its millions of short-lived lists (records) hold no cycles,
    and a collection every few hundred of them cost about a tenth of the load's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def crash_point(name: str, crash_at: str | None) -> None:
    """Fault injection for the kill tests (GOATCOUNTER_EXPORTS_CRASH_AT): die like `kill -9` here."""
    if crash_at == name:
        os.kill(os.getpid(), signal.SIGKILL)


async def sync(
    job: ExportJob,
    warehouse: Warehouse,
    *,
    export_format: Format | None = None,
    wait_seconds: float,
    crash_at: str | None = None,
) -> SyncResult:
    """One incremental run; `export_format` None chooses JSON where the server has it (auto)."""
    chosen = await job.choose_format(export_format)
    await asyncio.to_thread(warehouse.lock_acquire)
    try:
        if chosen == "json":
            return await _sync_statistics(job, warehouse, wait_seconds, crash_at)
        return await _sync_pageviews(job, warehouse, wait_seconds, crash_at)
    finally:
        warehouse.lock_release()


async def _sync_pageviews(
    job: ExportJob, warehouse: Warehouse, wait_seconds: float, crash_at: str | None
) -> SyncResult:
    site = job.reader.site
    before = warehouse.pageview_cursor(site)
    export, reused = await job.create_or_reuse(ExportRequest("csv", start_from_hit_id=before))
    export = await job.wait(export, wait_seconds)
    last_hit_id = export.last_hit_id if export.last_hit_id is not None else before
    async with job.reader.open(export, job.progress) as file:
        with warehouse.transaction(), collector_paused():
            added = await warehouse.load_pageviews(
                site, export.id, file, export.num_rows, lambda: crash_point("download", crash_at)
            )
            if export.num_rows is not None and added != export.num_rows:
                raise IntegrityError(f"export {export.id} has {export.num_rows} rows but the file had {added}")
            crash_point("before-commit", crash_at)
            warehouse.set_pageview_cursor(site, last_hit_id, export.id, added)
    warehouse.after_load(added)  # on this thread: SQLite's connection belongs to the thread that opened it
    crash_point("after-commit", crash_at)
    total = warehouse.pageview_count(site)
    note = await job.empty_note(export)
    return SyncResult("csv", export.id, reused, added, total, str(before), str(last_hit_id), note)


async def _sync_statistics(
    job: ExportJob, warehouse: Warehouse, wait_seconds: float, crash_at: str | None
) -> SyncResult:
    site = job.reader.site
    cursor = warehouse.stats_cursor(site)
    request = ExportRequest("json", start_from_day=date.fromisoformat(cursor) if cursor else None)
    export, reused = await job.create_or_reuse(request)
    export = await job.wait(export, wait_seconds)
    local = await job.reader.local(export, job.progress)
    await asyncio.to_thread(local.info)  # the export_version and the tables, checked before anything is written
    next_day = export.created_day or export.start_from_day
    if next_day is None:
        raise IntegrityError(f"export {export.id} says neither when it was made nor from which day it starts")
    written = _write_statistics(warehouse, site, export, local, next_day, crash_at)
    crash_point("after-commit", crash_at)
    start = export.start_from_day.isoformat() if export.start_from_day else "the start"
    return SyncResult("json", export.id, reused, written, warehouse.visitor_total(site), start, next_day.isoformat())


def _write_statistics(
    warehouse: Warehouse, site: str, export: Export, local: LocalExport, next_day: date, crash_at: str | None
) -> int:
    """Dimensions upserted, statistics replaced from the export's start day on, and the cursor: one transaction."""
    from_day = export.start_from_day.isoformat() if export.start_from_day else None
    written = 0
    with warehouse.transaction():
        for table in DIMENSION_TABLES:
            warehouse.upsert_dimension(site, table, local.rows(table))
        warehouse.upsert_dimension(site, "campaigns", local.rows("campaigns"))
        for table in (*STATS_TABLES, "campaign_stats"):
            written += warehouse.replace_stats(site, table, from_day, local.rows(table))
            crash_point("download", crash_at)
        crash_point("before-commit", crash_at)
        warehouse.set_stats_cursor(site, next_day.isoformat(), export.id)
    return written
