"""The synced copy in SQLite: its tables, keyed by site, and the writes `sync` makes to them.

Two kinds of data, one per export format:
- `pageviews`: one row per pageview, from CSV exports (sites with "Individual pageviews" on),
  in hit order (`seq`), with the cursor `sync_state.last_hit_id`;
- the JSON export's tables: dimensions (`paths`, `refs`, `browsers`, `systems`, `locations`,
  `languages`, `campaigns`) upserted by id, and statistics (`hit_stats` per hour, the others
  per day) replaced from the export's start day on, with the cursor `stats_sync.next_day`.

Every table has a `site` column (the site's URL, `https://mysite.goatcounter.com`) and every
query names it: one database holds many sites, never mixed. Rows and cursor are written in one transaction (`BEGIN
IMMEDIATE`), and `lock()` serialises whole sync runs of one database across processes.
"""

from __future__ import annotations

import fcntl
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

from ..errors import ExportError, IntegrityError, OutputError
from .exportfile import DIMENSION_TABLES, JSON_TABLES, OPTIONAL_TABLES, STATS_TABLES

# CSV header name -> SQLite type, where GoatCounter's values are numbers.
PAGEVIEW_TYPES = {"Event": "integer", "Bot": "integer", "FirstVisit": "integer"}
# The JSON export's columns that are numbers (everything else is text).
INTEGER_COLUMNS = {"id", "path_id", "ref_id", "browser_id", "system_id", "campaign_id", "width", "count", "event"}
# Dimension tables' keys (locations and languages have no id: their code is the key).
DIMENSION_KEYS = {"locations": ("country", "region"), "languages": ("iso_639_3",)}

SCHEMA = """
create table if not exists sync_state (
    site text primary key,
    last_hit_id integer not null,
    last_export_id integer,
    rows integer not null default 0,
    synced_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
create table if not exists stats_sync (
    site text primary key,
    next_day text not null,
    last_export_id integer not null,
    synced_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
"""


def column_name(header: str) -> str:
    """`Referrer scheme` -> `referrer_scheme`, `FirstVisit` -> `first_visit`, `UserAgent` -> `user_agent`."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", header.strip())
    return re.sub(r"[^a-z0-9]+", "_", spaced.lower()).strip("_")


def _json_tables_schema() -> list[str]:
    statements = []
    for table, columns in JSON_TABLES.items():
        typed = ", ".join(f"{c} {'integer' if c in INTEGER_COLUMNS else 'text'}" for c in columns)
        if table in DIMENSION_TABLES or table == "campaigns":
            key = ", ".join(DIMENSION_KEYS.get(table, ("id",)))
            statements.append(
                f"create table if not exists {table} (site text not null, {typed}, primary key (site, {key}))"
            )
        else:
            time = "hour" if table == "hit_stats" else "day"
            statements.append(f"create table if not exists {table} (site text not null, {typed})")
            statements.append(f"create index if not exists {table}_site_{time} on {table} (site, {time})")
    return statements


class SqliteWarehouse:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: TextIO | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.execute("pragma journal_mode=wal")
            self.db.executescript(SCHEMA)
            for statement in _json_tables_schema():
                self.db.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(f"the synced database {path} cannot be opened: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def lock_acquire(self) -> None:
        """Serialise sync runs on this database across processes: a second run waits here for the first,
        then starts from the cursor the first one left. The lock dies with its process (kill -9 included)."""
        self._lock = (self.path.parent / f".{self.path.name}.sync-lock").open("a")
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def lock_release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction; an SQLite failure (a full disk, a read-only file) becomes an OutputError that says
        what failed, and a rollback that fails in turn does not hide it."""
        try:
            self.db.execute("begin immediate")
            try:
                yield
            except BaseException:
                with suppress(sqlite3.Error):  # SQLite may have rolled back already (a full disk does)
                    self.db.execute("rollback")
                raise
            self.db.execute("commit")
        except sqlite3.Error as exc:
            raise OutputError(f"the synced database {self.path} cannot be written: {exc}; nothing was added") from None

    # -- individual pageviews (CSV) --------------------------------------------------------

    def pageview_cursor(self, site: str) -> int:
        row = self.db.execute("select last_hit_id from sync_state where site = ?", (site,)).fetchone()
        return int(row[0]) if row else 0

    def prepare_pageviews(self, columns: Sequence[str]) -> None:
        """Create the pageviews table for these CSV columns, or check that the existing one fits them."""
        typed = ", ".join(f"{column_name(c)} {PAGEVIEW_TYPES.get(c, 'text')}" for c in columns)
        # seq is the hit order: GoatCounter writes rows in hit-id order, and the CSV has no hit id.
        self.db.execute(
            f"create table if not exists pageviews (seq integer primary key, site text not null, "
            f"export_id integer not null, {typed})"
        )
        self.db.execute("create index if not exists pageviews_site_date on pageviews (site, date)")
        self.db.execute("create index if not exists pageviews_site_path on pageviews (site, path)")
        known = {row[1] for row in self.db.execute("pragma table_info(pageviews)")}
        missing = [c for c in columns if column_name(c) not in known]
        if missing:
            raise ExportError(f"the pageviews table lacks columns for {missing}; use a new --db")

    def insert_pageviews(self, site: str, export_id: int, columns: Sequence[str], records: Iterable[list[str]]) -> int:
        names = ", ".join(column_name(c) for c in columns)
        marks = ", ".join("?" for _ in columns)
        width = len(columns)

        def rows() -> Iterator[tuple[Any, ...]]:
            for record in records:
                if len(record) != width:
                    raise IntegrityError(f"a CSV row has {len(record)} fields, the header {width}")
                yield (site, export_id, *(_pageview_value(c, v) for c, v in zip(columns, record, strict=True)))

        before = self.db.total_changes
        self.db.executemany(
            f"insert into pageviews (site, export_id, {names}) values (?, ?, {marks})",  # noqa: S608 - names from the schema
            rows(),
        )
        return self.db.total_changes - before

    def set_pageview_cursor(self, site: str, last_hit_id: int, export_id: int, added: int) -> None:
        self.db.execute(
            "insert into sync_state (site, last_hit_id, last_export_id, rows) values (?, ?, ?, ?) "
            "on conflict (site) do update set last_hit_id = excluded.last_hit_id, "
            "last_export_id = excluded.last_export_id, rows = sync_state.rows + excluded.rows, "
            "synced_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')",
            (site, last_hit_id, export_id, added),
        )

    def pageview_count(self, site: str) -> int:
        if self.db.execute("select 1 from sqlite_master where name = 'pageviews'").fetchone() is None:
            return 0
        return int(self.db.execute("select count(*) from pageviews where site = ?", (site,)).fetchone()[0])

    # -- aggregate statistics (JSON) -------------------------------------------------------

    def stats_cursor(self, site: str) -> str | None:
        """The day the next JSON export starts from (its statistics are replaced from then on)."""
        row = self.db.execute("select next_day from stats_sync where site = ?", (site,)).fetchone()
        return str(row[0]) if row else None

    def upsert_dimension(self, site: str, table: str, rows: Iterable[dict[str, Any]]) -> None:
        columns = JSON_TABLES[table]
        keys = DIMENSION_KEYS.get(table, ("id",))
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
        self.db.executemany(
            f"insert into {table} (site, {', '.join(columns)}) values (?, {', '.join('?' for _ in columns)}) "  # noqa: S608
            f"on conflict (site, {', '.join(keys)}) do update set {updates}",
            ((site, *(_json_value(c, row.get(c)) for c in columns)) for row in rows),
        )

    def replace_stats(self, site: str, table: str, from_day: str | None, rows: Iterable[dict[str, Any]]) -> int:
        """Delete the site's rows from `from_day` on (all of them for a full export), then insert `rows`."""
        columns = STATS_TABLES.get(table) or OPTIONAL_TABLES[table]
        time = "hour" if table == "hit_stats" else "day"
        if from_day is None:
            self.db.execute(f"delete from {table} where site = ?", (site,))  # noqa: S608
        else:
            # hour is RFC 3339 (2026-11-20T09:00:00Z), day is 2026-11-20: both sort as text.
            self.db.execute(f"delete from {table} where site = ? and {time} >= ?", (site, from_day))  # noqa: S608
        before = self.db.total_changes
        self.db.executemany(
            f"insert into {table} (site, {', '.join(columns)}) values (?, {', '.join('?' for _ in columns)})",  # noqa: S608
            ((site, *(_json_value(c, row.get(c)) for c in columns)) for row in rows),
        )
        return self.db.total_changes - before

    def set_stats_cursor(self, site: str, next_day: str, export_id: int) -> None:
        self.db.execute(
            "insert into stats_sync (site, next_day, last_export_id) values (?, ?, ?) "
            "on conflict (site) do update set next_day = excluded.next_day, last_export_id = excluded.last_export_id, "
            "synced_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')",
            (site, next_day, export_id),
        )

    def visitor_total(self, site: str) -> int:
        return int(
            self.db.execute("select coalesce(sum(count), 0) from hit_stats where site = ?", (site,)).fetchone()[0]
        )


def _pageview_value(column: str, text: str) -> Any:
    if PAGEVIEW_TYPES.get(column) == "integer":
        try:
            return int(text)
        except ValueError:
            return 1 if text.lower() == "true" else 0 if text.lower() in ("false", "") else text
    return text


def _json_value(column: str, value: Any) -> Any:
    if column == "event":
        return 1 if value else 0
    if value is None:
        return None if column in INTEGER_COLUMNS else ""
    return value


def remove_empty(path: Path) -> None:
    """Delete a database a failed first sync created and left empty (nothing looks synced that is not)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return
    try:
        empty = db.execute("select count(*) from sync_state").fetchone()[0] == 0
        empty = empty and db.execute("select count(*) from stats_sync").fetchone()[0] == 0
    except sqlite3.Error:
        return
    finally:
        db.close()
    if empty:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        Path(path.parent / f".{path.name}.sync-lock").unlink(missing_ok=True)
