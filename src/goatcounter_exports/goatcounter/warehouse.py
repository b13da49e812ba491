"""The synced copy in SQLite: its tables, keyed by site, and the writes `sync` makes to them.

Two kinds of data, one per export format:
- `pageviews`: one row per pageview, from CSV exports (sites with "Individual pageviews" on),
  in hit order (`seq`), with the cursor `sync_state.last_hit_id`. It is a view, with the columns
  it always had (`seq, site, export_id, path, title, ..., date`), over `pageview_rows`, which keys
  each row by a small integer (`site_id`, named in `pageview_sites`) rather than repeating the
  site's URL, and has one index, (site_id, date): what every question of stats.py filters on. A
  large load drops that index and builds it again after the rows are in, in the same transaction;
  a database made by an earlier version (a `pageviews` table) is converted on its next sync;
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol, TextIO

from ..errors import ConfigError, ExportError, IntegrityError, OutputError
from .exportfile import DIMENSION_TABLES, JSON_TABLES, OPTIONAL_TABLES, STATS_TABLES, ExportFile, split_header

# CSV header name -> SQLite type, where GoatCounter's values are numbers.
PAGEVIEW_TYPES = {"Event": "integer", "Bot": "integer", "FirstVisit": "integer"}
PAGEVIEW_INDEX = "pageview_rows_site_date"
# The layout (`pragma user_version`): 1 has `pageviews` as a view over pageview_rows; 0 (no version) had a table,
# converted on the next sync. A database of a higher layout was made by a newer version and is refused.
LAYOUT = 1
# A load of at least this many rows, and at least half the rows already there, drops the index first and builds it
# again after the insert: sorting once is several times faster than keeping the index up to date row by row.
REBUILD_INDEX_ROWS = 50_000
PAGE_SIZE = 16384  # of a new database: fewer, fuller pages make a bulk insert and its commit cheaper than 4096
WAL_KEEP_BYTES = 64 * 1024 * 1024  # the WAL a big load grew is truncated to this after its checkpoint
# The JSON export's columns that are numbers (everything else is text).
INTEGER_COLUMNS = {"id", "path_id", "ref_id", "browser_id", "system_id", "campaign_id", "width", "count", "event"}
# Dimension tables' keys (locations and languages have no id: their code is the key).
DIMENSION_KEYS = {"locations": ("country", "region"), "languages": ("iso_639_3",)}
BATCH = 10_000  # CSV records a load inserts at once (two batches are in memory: one inserted, one parsed)


class Warehouse(Protocol):
    """The synced copy, as sync.py and sites.py write and read it. Writes go inside `transaction()`."""

    name: str  # what lines and errors show (never a password)

    def close(self) -> None: ...
    def lock_acquire(self) -> None: ...
    def lock_release(self) -> None: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def last_synced(self, site: str) -> str | None: ...
    def pageview_cursor(self, site: str) -> int: ...
    async def load_pageviews(
        self, site: str, export_id: int, file: ExportFile, expected_rows: int | None, step: Callable[[], None]
    ) -> int: ...
    def set_pageview_cursor(self, site: str, last_hit_id: int, export_id: int, added: int) -> None: ...
    def after_load(self, rows: int) -> None: ...
    def pageview_count(self, site: str) -> int: ...
    def stats_cursor(self, site: str) -> str | None: ...
    def upsert_dimension(self, site: str, table: str, rows: Iterable[dict[str, Any]]) -> None: ...
    def replace_stats(self, site: str, table: str, from_day: str | None, rows: Iterable[dict[str, Any]]) -> int: ...
    def set_stats_cursor(self, site: str, next_day: str, export_id: int) -> None: ...
    def visitor_total(self, site: str) -> int: ...


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


def json_tables_schema(integer: str = "integer") -> list[str]:
    """The JSON export's tables, in either store (`integer` is its name for a whole number)."""
    statements = []
    for table, columns in JSON_TABLES.items():
        typed = ", ".join(f"{c} {integer if c in INTEGER_COLUMNS else 'text'}" for c in columns)
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
        self.name = str(path)
        self._lock: TextIO | None = None
        self._rebuild_index = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.execute(f"pragma page_size = {PAGE_SIZE}")  # takes effect only on a database still empty
            self.db.execute("pragma journal_mode=wal")
            self.db.execute(f"pragma journal_size_limit = {WAL_KEEP_BYTES}")
            (layout,) = self.db.execute("pragma user_version").fetchone()
            if layout > LAYOUT:
                self.db.close()
                raise ConfigError(
                    f"the synced database {path} has layout {layout}, made by a newer goatcounter-exports (this one "
                    f"knows {LAYOUT}); upgrade it, or sync into another database"
                )
            self.db.execute(f"pragma user_version = {LAYOUT}")  # an earlier layout is converted as it is used
            self.db.executescript(SCHEMA)
            for statement in json_tables_schema():
                self.db.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(f"the synced database {path} cannot be opened: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def last_synced(self, site: str) -> str | None:
        """When the site was last synced (either kind), from the cursors."""
        row = self.db.execute(
            "select max(synced_at) from (select synced_at from sync_state where site = ? "
            "union all select synced_at from stats_sync where site = ?)",
            (site, site),
        ).fetchone()
        return str(row[0]) if row and row[0] else None

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

    async def load_pageviews(
        self, site: str, export_id: int, file: ExportFile, expected_rows: int | None, step: Callable[[], None]
    ) -> int:
        """Insert the export's records in batches, inside the caller's transaction; the rows added. The last
        records come only after the file's SHA-256 matched (ExportFile.record_batches). `step` runs after each
        batch (the kill tests' crash point). (Inserting on a worker thread while the loop parsed the next batch
        was measured, and bought nothing: SQLite lets go of the GIL for each row's few microseconds only.)"""
        columns: list[str] = []
        added = 0
        async for batch in file.record_batches(BATCH):
            if not columns:
                columns.extend(split_header(batch[0])[1])  # refuses an unknown format version
                self.prepare_pageviews(columns, expected_rows)
                batch = batch[1:]
            added += self.insert_pageviews(site, export_id, columns, batch)
            step()
        if columns:
            self.finish_pageviews()
        return added

    def after_load(self, rows: int) -> None:
        if rows >= REBUILD_INDEX_ROWS:
            self.checkpoint()

    def prepare_pageviews(self, columns: Sequence[str], expected_rows: int | None = None) -> None:
        """Create the pageviews tables and view for these CSV columns, or check that the existing ones fit them
        (converting a database of an earlier version first). Call it inside the load's transaction: with
        `expected_rows` large enough, the index is dropped here and built again by `finish_pageviews`."""
        if self._kind("pageviews") == "table":
            self._convert_pageviews_table()
        known = {row[1] for row in self.db.execute("pragma table_info(pageview_rows)")}
        if not known:
            typed = ", ".join(f"{column_name(c)} {PAGEVIEW_TYPES.get(c, 'text')}" for c in columns)
            # seq is the hit order: GoatCounter writes rows in hit-id order, and the CSV has no hit id.
            self.db.execute(
                "create table if not exists pageview_sites (id integer primary key, site text not null unique)"
            )
            self.db.execute(
                f"create table pageview_rows (seq integer primary key, site_id integer not null, "
                f"export_id integer not null, {typed})"
            )
            known = {row[1] for row in self.db.execute("pragma table_info(pageview_rows)")}
        missing = [c for c in columns if column_name(c) not in known]
        if missing:
            raise ExportError(f"the pageviews table lacks columns for {missing}; use a new --db")
        if self._kind("pageviews") is None:
            names = [row[1] for row in self.db.execute("pragma table_info(pageview_rows)")][3:]
            shown = ", ".join(f"r.{name} as {name}" for name in names)
            self.db.execute(
                f"create view pageviews as select r.seq as seq, s.site as site, r.export_id as export_id, {shown} "  # noqa: S608
                "from pageview_rows r join pageview_sites s on s.id = r.site_id"
            )
        self._rebuild_index = False
        if expected_rows is not None and expected_rows >= REBUILD_INDEX_ROWS:
            (present,) = self.db.execute("select count(*) from pageview_rows").fetchone()
            self._rebuild_index = expected_rows * 2 >= present
        if self._rebuild_index:
            self.db.execute(f"drop index if exists {PAGEVIEW_INDEX}")
        else:
            self._create_pageview_index()

    def finish_pageviews(self) -> None:
        """After the last insert of a load (in its transaction): the index, built again when it was dropped."""
        if self._rebuild_index:
            self._create_pageview_index()
            self._rebuild_index = False

    def _create_pageview_index(self) -> None:
        self.db.execute(f"create index if not exists {PAGEVIEW_INDEX} on pageview_rows (site_id, date)")

    def _kind(self, name: str) -> str | None:
        row = self.db.execute("select type from sqlite_master where name = ?", (name,)).fetchone()
        return str(row[0]) if row else None

    def _convert_pageviews_table(self) -> None:
        """A database of an earlier version has a `pageviews` table with the site's URL on every row: move its
        rows to pageview_rows (same seq, same columns) and replace it with the view."""
        info = list(self.db.execute("pragma table_info(pageviews)"))
        names = [row[1] for row in info if row[1] not in ("seq", "site", "export_id")]
        typed = ", ".join(f"{row[1]} {row[2] or 'text'}" for row in info if row[1] in names)
        self.db.execute("create table if not exists pageview_sites (id integer primary key, site text not null unique)")
        self.db.execute("insert or ignore into pageview_sites (site) select distinct site from pageviews")
        self.db.execute(
            f"create table pageview_rows (seq integer primary key, site_id integer not null, "
            f"export_id integer not null, {typed})"
        )
        listed = ", ".join(names)
        self.db.execute(
            f"insert into pageview_rows (seq, site_id, export_id, {listed}) "  # noqa: S608 - names from the schema
            f"select p.seq, s.id, p.export_id, {', '.join('p.' + n for n in names)} "
            "from pageviews p join pageview_sites s on s.site = p.site order by p.seq"
        )
        self.db.execute("drop table pageviews")

    def site_id(self, site: str) -> int:
        """The site's number in pageview_rows (made on first use, inside the caller's transaction)."""
        self.db.execute("insert or ignore into pageview_sites (site) values (?)", (site,))
        (found,) = self.db.execute("select id from pageview_sites where site = ?", (site,)).fetchone()
        return int(found)

    def insert_pageviews(self, site: str, export_id: int, columns: Sequence[str], records: Iterable[list[str]]) -> int:
        """Insert CSV records (lists of strings, in the header's order): each value is bound as it came, and
        SQLite turns the numbers' text into integers (`true`/`false`/empty too). Returns the rows added."""
        names = ", ".join(column_name(c) for c in columns)
        values = ", ".join(_pageview_expression(c, i) for i, c in enumerate(columns, 1))
        site_id = self.site_id(site)
        before = self.db.total_changes
        try:
            self.db.executemany(
                f"insert into pageview_rows (site_id, export_id, {names}) "  # noqa: S608 - names from the schema
                f"values ({int(site_id)}, {int(export_id)}, {values})",
                records,
            )
        except sqlite3.ProgrammingError as exc:  # a record with more or fewer fields than the header
            if "bindings" not in str(exc):
                raise
            raise IntegrityError(f"a CSV row does not have the header's {len(columns)} fields: {exc}") from None
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

    def checkpoint(self) -> None:
        """After a large load: copy the WAL into the database now and truncate it (not at close, by surprise)."""
        with suppress(sqlite3.Error):  # a reader holding an old snapshot only delays it: nothing is lost
            self.db.execute("pragma wal_checkpoint(truncate)")

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
            ((site, *(json_value(c, row.get(c)) for c in columns)) for row in rows),
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
            ((site, *(json_value(c, row.get(c)) for c in columns)) for row in rows),
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


def _pageview_expression(column: str, number: int) -> str:
    """The SQL that stores the `number`th value of a record: as it is, or for a number column, `true`, `false`
    and empty as 1, 0, 0 (other text is turned into an integer by the column's type, when it is one)."""
    if PAGEVIEW_TYPES.get(column) == "integer":
        n = f"?{number}"
        return (
            f"case {n} when '0' then 0 when '1' then 1 else case lower({n}) when 'true' then 1 when 'false' then 0 "
            f"when '' then 0 else {n} end end"
        )
    return f"?{number}"


def json_value(column: str, value: Any) -> Any:
    """A JSON export value as either store keeps it: `event` a number, a missing text empty."""
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
