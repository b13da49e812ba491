"""Bounded, parameterised questions over the synced copy of one site, in GoatCounter's own numbers.

A model never writes SQL here: it picks a question (`top_paths`, `daily`, ...) and filters,
each a bound parameter; tables and columns come from fixed tables below, and every query
names the site. Two sources, by what the site keeps:
- `pageviews`: one row per pageview (CSV exports; needs *Individual pageviews* on). Counts
  are pageviews; bots can be counted in.
- `aggregates`: the JSON export's statistics (what GoatCounter's dashboard shows). Counts are
  visitors: one per visitor, path and hour; bots are never counted.
By default the site's pageviews are used when it has any, else its aggregates.

The copy is SQLite or PostgreSQL (`--db postgresql://...`): the same tables, the same statements (standard
SQL; the day after `until` is computed here), each read in a read-only transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from ..errors import InputError, OutputError

MAX_LIMIT = 100
Source = Literal["pageviews", "aggregates"]

# question -> the grouping over individual pageviews; `total` counts all.
PAGEVIEW_GROUPS = {
    "top_paths": "path",
    "top_titles": "title",
    "top_referrers": "referrer",
    "top_locations": "location",
    "top_browsers": "browser",
    "top_systems": "system",
    "top_screen_sizes": "screen_size",
    "daily": "substr(date, 1, 10)",
    "hourly": "substr(date, 1, 13) || ':00:00Z'",
}
# question -> (statistics table, label expression, joins) over the JSON export's tables.
LOCATION = "coalesce(nullif(l.country_name, ''), s.location) || coalesce(nullif(' / ' || l.region_name, ' / '), '')"
AGGREGATE_GROUPS: dict[str, tuple[str, str, str]] = {
    "top_paths": ("hit_stats", "p.path", ""),
    "top_titles": ("hit_stats", "p.title", ""),
    "top_referrers": ("hit_stats", "r.ref", "join refs r on r.site = s.site and r.id = s.ref_id"),
    "top_locations": (
        "location_stats",
        LOCATION,
        "left join locations l on l.site = s.site and l.country || case when l.region = '' then '' "
        "else '-' || l.region end = s.location",
    ),
    "top_browsers": ("browser_stats", "b.name", "join browsers b on b.site = s.site and b.id = s.browser_id"),
    "top_systems": ("system_stats", "y.name", "join systems y on y.site = s.site and y.id = s.system_id"),
    "top_screen_sizes": ("size_stats", "cast(s.width as text)", ""),
    "top_languages": (
        "language_stats",
        "coalesce(g.name, s.language)",
        "left join languages g on g.site = s.site and g.iso_639_3 = s.language",
    ),
    "top_campaigns": ("campaign_stats", "c.name", "join campaigns c on c.site = s.site and c.id = s.campaign_id"),
    "daily": ("hit_stats", "substr(s.hour, 1, 10)", ""),
    "hourly": ("hit_stats", "s.hour", ""),
}
QUESTIONS = tuple(dict.fromkeys([*PAGEVIEW_GROUPS, *AGGREGATE_GROUPS, "total"]))
ORDERED_BY_TIME = ("daily", "hourly")


@dataclass(frozen=True)
class Answer:
    question: str
    source: Source
    unit: Literal["pageviews", "visitors"]
    rows: list[dict[str, Any]]
    total: int
    since: str | None
    until: str | None


def _day(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise InputError(f"{name} must be a date like 2026-11-01, got {value!r}", field=name) from None


class Reader(Protocol):
    def rows(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def has_table(self, name: str) -> bool: ...


class _Sqlite:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def rows(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.db.execute(query, args))

    def has_table(self, name: str) -> bool:
        return self.db.execute("select 1 from sqlite_master where name = ?", (name,)).fetchone() is not None


class _Postgres:
    def __init__(self, db: Any) -> None:
        self.db = db

    def rows(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.db.execute(query.replace("?", "%s"), args).fetchall())

    def has_table(self, name: str) -> bool:
        return self.db.execute("select to_regclass(%s) is not null", (name,)).fetchone()[0] is True


@contextmanager
def reading(database: Path | str) -> Iterator[Reader]:
    """The synced copy, read-only: a SQLite file, or a PostgreSQL database's URL."""
    if isinstance(database, str):
        from .store_postgres import safe_name

        try:  # the `postgres` extra, imported only when a PostgreSQL copy is read
            import psycopg
        except ImportError:
            raise OutputError("reading a PostgreSQL copy needs the postgres extra") from None
        try:
            with psycopg.connect(database, connect_timeout=10, options="-c default_transaction_read_only=on") as db:
                yield _Postgres(db)
        except psycopg.Error as exc:
            raise OutputError(f"the synced database {safe_name(database)} cannot be read: {exc}") from None
        return
    if not database.exists():
        raise InputError("there is no synced database yet; run `goatcounter-exports sync` first", field=None)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
        yield _Sqlite(db)


def ask(
    database: Path | str,
    site: str,
    question: str,
    *,
    since: str | None = None,
    until: str | None = None,
    path_prefix: str | None = None,
    include_bots: bool = False,
    limit: int = 10,
    source: Source | None = None,
) -> Answer:
    """Blocking: call it from a thread in the event loop."""
    if question not in QUESTIONS:
        raise InputError(f"question must be one of {', '.join(QUESTIONS)}", field="question")
    if not 1 <= limit <= MAX_LIMIT:
        raise InputError(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    first, last = _day(since, "since"), _day(until, "until")
    with reading(database) as db:
        chosen = source or _source_of(db, site)
        if chosen is None:
            raise InputError("nothing of this site is synced yet; run `goatcounter-exports sync` first", field=None)
        if chosen == "pageviews":
            if question not in PAGEVIEW_GROUPS and question != "total":
                raise InputError(f"{question} needs the aggregate statistics (a JSON sync)", field="question")
            return _ask_pageviews(db, site, question, first, last, path_prefix, include_bots, limit)
        if include_bots:
            raise InputError("GoatCounter's statistics never count bots: include_bots needs individual pageviews")
        return _ask_aggregates(db, site, question, first, last, path_prefix, limit)


def _has(db: Reader, table: str, site: str) -> bool:
    return db.has_table(table) and bool(db.rows(f"select 1 from {table} where site = ? limit 1", (site,)))  # noqa: S608


def _after(day: str) -> str:
    """The day after `day` (2026-11-20 -> 2026-11-21): `until` is inclusive, and dates compare as text."""
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def _source_of(db: Reader, site: str) -> Source | None:
    if _has(db, "pageviews", site):
        return "pageviews"
    if _has(db, "stats_sync", site):
        return "aggregates"
    return None


def _ask_pageviews(
    db: Reader,
    site: str,
    question: str,
    first: str | None,
    last: str | None,
    path_prefix: str | None,
    include_bots: bool,
    limit: int,
) -> Answer:
    where = ["site = ?"]
    args: list[Any] = [site]
    if first:
        where.append("date >= ?")
        args.append(first)
    if last:
        where.append("date < ?")
        args.append(_after(last))
    if path_prefix:
        where.append("substr(path, 1, ?) = ?")
        args.extend([len(path_prefix), path_prefix])
    if not include_bots:
        where.append("coalesce(bot, 0) = 0")
    condition = " and ".join(where)
    total = int(db.rows(f"select count(*) from pageviews where {condition}", args)[0][0])  # noqa: S608
    rows: list[dict[str, Any]] = []
    if question in PAGEVIEW_GROUPS:
        order = "value" if question in ORDERED_BY_TIME else "pageviews desc, value"
        query = (
            f"select {PAGEVIEW_GROUPS[question]} as value, count(*) as pageviews from pageviews "  # noqa: S608
            f"where {condition} group by value order by {order} limit ?"
        )
        rows = [{"value": v, "pageviews": int(n)} for v, n in db.rows(query, [*args, limit])]
    return Answer(question, "pageviews", "pageviews", rows, total, first, last)


def _ask_aggregates(
    db: Reader,
    site: str,
    question: str,
    first: str | None,
    last: str | None,
    path_prefix: str | None,
    limit: int,
) -> Answer:
    table, label, joins = AGGREGATE_GROUPS.get(question, AGGREGATE_GROUPS["daily"])
    time = "s.hour" if table == "hit_stats" else "s.day"

    def condition() -> tuple[str, list[Any]]:
        where = ["s.site = ?"]
        args: list[Any] = [site]
        if first:
            where.append(f"{time} >= ?")
            args.append(first)
        if last:
            where.append(f"{time} < ?")
            args.append(_after(last))
        if path_prefix:
            where.append("substr(p.path, 1, ?) = ?")
            args.extend([len(path_prefix), path_prefix])
        return " and ".join(where), args

    paths = "join paths p on p.site = s.site and p.id = s.path_id"
    where, args = condition()
    if not db.has_table(table):  # campaign statistics: only in exports that carry them
        return Answer(question, "aggregates", "visitors", [], 0, first, last)
    # The total over the table the question reads, with the same filters (hit_stats for `total`).
    total_query = f"select coalesce(sum(s.count), 0) from {table} s {paths} where {where}"  # noqa: S608
    total = int(db.rows(total_query, args)[0][0])
    rows: list[dict[str, Any]] = []
    if question != "total":
        order = "value" if question in ORDERED_BY_TIME else "visitors desc, value"
        query = (
            f"select {label} as value, sum(s.count) as visitors from {table} s {paths} {joins} "  # noqa: S608
            f"where {where} group by value order by {order} limit ?"
        )
        rows = [{"value": v, "visitors": int(n)} for v, n in db.rows(query, [*args, limit])]
    return Answer(question, "aggregates", "visitors", rows, total, first, last)
