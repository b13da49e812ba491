"""Incremental, exact copy of a site's pageviews into SQLite.

Each run exports the hits after the stored cursor (`start_from_hit_id` is
exclusive, so the next run starts from the previous export's `last_hit_id`
exactly; adding 1 would drop a pageview per run), inserts the rows and moves
the cursor in ONE transaction. A run killed at any point leaves either the old
rows and old cursor or the new rows and new cursor, so the next run converges.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, IntegrityError
from .exportfile import split_header
from .workflow import ExportJob

# CSV header name -> (column, SQLite type). Typed where GoatCounter's values are numbers.
TYPES = {"Event": "integer", "Bot": "integer", "FirstVisit": "integer"}

SCHEMA = """
create table if not exists sync_state (
    site text primary key,
    last_hit_id integer not null,
    last_export_id integer,
    rows integer not null default 0,
    synced_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
"""


def column_name(header: str) -> str:
    """`Referrer scheme` -> `referrer_scheme`, `FirstVisit` -> `first_visit`, `UserAgent` -> `user_agent`."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", header.strip())
    return re.sub(r"[^a-z0-9]+", "_", spaced.lower()).strip("_")


def pageviews_schema(columns: list[str]) -> list[str]:
    typed = ", ".join(f"{column_name(c)} {TYPES.get(c, 'text')}" for c in columns)
    return [
        # seq is the hit order: GoatCounter writes rows in hit-id order, and the CSV has no hit id.
        f"create table if not exists pageviews (seq integer primary key, site text not null, "
        f"export_id integer not null, {typed})",
        "create index if not exists pageviews_site_date on pageviews (site, date)",
        "create index if not exists pageviews_site_path on pageviews (site, path)",
    ]


@dataclass(frozen=True)
class SyncResult:
    export_id: int | None
    reused: bool
    rows_added: int
    total_rows: int
    cursor_before: int
    cursor_after: int


def crash_point(name: str, crash_at: str | None) -> None:
    """Fault injection for the kill tests (GOATCOUNTER_EXPORTS_CRASH_AT): die like `kill -9` here."""
    if crash_at == name:
        os.kill(os.getpid(), signal.SIGKILL)


def open_database(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.executescript(SCHEMA)
    return db


def cursor_of(db: sqlite3.Connection, site: str) -> int:
    row = db.execute("select last_hit_id from sync_state where site = ?", (site,)).fetchone()
    return int(row[0]) if row else 0


def _value(column: str, text: str) -> Any:
    if TYPES.get(column) == "integer":
        try:
            return int(text)
        except ValueError:
            return 1 if text.lower() == "true" else 0 if text.lower() in ("false", "") else text
    return text


async def sync(job: ExportJob, database: Path, *, wait_seconds: float, crash_at: str | None = None) -> SyncResult:
    site = job.api_uri
    db = open_database(database)
    try:
        before = cursor_of(db, site)
        export, reused = await job.create_or_reuse(before)
        export = await job.wait(export, wait_seconds)
        last_hit_id = export.last_hit_id if export.last_hit_id is not None else before
        columns: list[str] = []
        added = 0
        db.execute("begin immediate")
        try:
            async with job.reader.open(export, job.progress) as file:
                async for record in file.records():  # the hash is checked before the last records
                    added += _insert(db, site, export.id, record, columns)
                    if added == 1:
                        crash_point("download", crash_at)
            if export.num_rows is not None and added != export.num_rows:
                raise IntegrityError(f"export {export.id} has {export.num_rows} rows but the file had {added}")
            crash_point("before-commit", crash_at)
            db.execute(
                "insert into sync_state (site, last_hit_id, last_export_id, rows) values (?, ?, ?, ?) "
                "on conflict (site) do update set last_hit_id = excluded.last_hit_id, "
                "last_export_id = excluded.last_export_id, rows = sync_state.rows + excluded.rows, "
                "synced_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')",
                (site, last_hit_id, export.id, added),
            )
            db.execute("commit")
        except BaseException:
            db.execute("rollback")
            raise
        crash_point("after-commit", crash_at)
        total = _count(db, site)
        return SyncResult(export.id, reused, added, total, before, last_hit_id)
    finally:
        db.close()


def _count(db: sqlite3.Connection, site: str) -> int:
    if db.execute("select 1 from sqlite_master where name = 'pageviews'").fetchone() is None:
        return 0
    return int(db.execute("select count(*) from pageviews where site = ?", (site,)).fetchone()[0])


def _insert(db: sqlite3.Connection, site: str, export_id: int, record: list[str], columns: list[str]) -> int:
    """Insert one record (returns 1), or take the header (returns 0) and make sure the table fits it."""
    if not columns:
        _, header = split_header(record)  # refuses an unknown format version
        columns.extend(header)
        for statement in pageviews_schema(columns):
            db.execute(statement)
        known = {row[1] for row in db.execute("pragma table_info(pageviews)")}
        missing = [c for c in columns if column_name(c) not in known]
        if missing:
            raise ExportError(f"the pageviews table lacks columns for {missing}; use a new --db")
        return 0
    if len(record) != len(columns):
        raise IntegrityError(f"a CSV row has {len(record)} fields, the header {len(columns)}")
    names = ", ".join(column_name(c) for c in columns)
    marks = ", ".join("?" for _ in columns)
    db.execute(
        f"insert into pageviews (site, export_id, {names}) values (?, ?, {marks})",  # noqa: S608 - names from the schema
        (site, export_id, *(_value(c, v) for c, v in zip(columns, record, strict=True))),
    )
    return 1
