"""Bounded, parameterised questions over the synced pageviews database.

A model never writes SQL here: it picks a question (`top_paths`, `daily`, ...)
and filters, each a bound parameter; columns come from a fixed table below.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from ..errors import InputError

MAX_LIMIT = 100
# question -> (column grouped by, label) ; `daily` groups by day, `total` counts all.
GROUPINGS = {
    "top_paths": "path",
    "top_titles": "title",
    "top_referrers": "referrer",
    "top_locations": "location",
    "top_browsers": "browser",
    "top_systems": "system",
    "top_screen_sizes": "screen_size",
    "daily": "substr(date, 1, 10)",
}
QUESTIONS = (*GROUPINGS, "total")


@dataclass(frozen=True)
class Answer:
    question: str
    rows: list[dict[str, Any]]
    total_pageviews: int
    since: str | None
    until: str | None


def _day(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise InputError(f"{name} must be a date like 2026-11-01, got {value!r}", field=name) from None


def ask(
    database: Path,
    question: str,
    *,
    since: str | None = None,
    until: str | None = None,
    path_prefix: str | None = None,
    include_bots: bool = False,
    limit: int = 10,
) -> Answer:
    if question not in QUESTIONS:
        raise InputError(f"question must be one of {', '.join(QUESTIONS)}", field="question")
    if not 1 <= limit <= MAX_LIMIT:
        raise InputError(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
    first, last = _day(since, "since"), _day(until, "until")
    if not database.exists():
        raise InputError("there is no synced database yet; run `goatcounter-exports sync` first", field=None)
    where = ["1 = 1"]
    args: list[Any] = []
    if first:
        where.append("date >= ?")
        args.append(first)
    if last:
        where.append("date < date(?, '+1 day')")
        args.append(last)
    if path_prefix:
        where.append("substr(path, 1, ?) = ?")
        args.extend([len(path_prefix), path_prefix])
    if not include_bots:
        where.append("coalesce(bot, 0) = 0")
    condition = " and ".join(where)
    uri = f"file:{database}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=10) as db:
        if db.execute("select 1 from sqlite_master where name = 'pageviews'").fetchone() is None:
            return Answer(question, [], 0, first, last)
        total = int(db.execute(f"select count(*) from pageviews where {condition}", args).fetchone()[0])  # noqa: S608
        rows: list[dict[str, Any]] = []
        if question in GROUPINGS:
            key = GROUPINGS[question]
            order = "value" if question == "daily" else "pageviews desc, value"
            query = (
                f"select {key} as value, count(*) as pageviews from pageviews where {condition} "  # noqa: S608
                f"group by value order by {order} limit ?"
            )
            rows = [{"value": v, "pageviews": n} for v, n in db.execute(query, [*args, limit])]
    return Answer(question, rows, total, first, last)
