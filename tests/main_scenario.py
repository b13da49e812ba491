"""The GoatCounter main scenario: the visitors tests/record_main.py records, and the opt-in live test replays.

A default goatcounter.com-like site (LocalGoatCounter(main binary, collect_hits=False): "Individual
pageviews" off, so GoatCounter keeps only statistics, which count *visitors*: a path's first view in a
session). Every visitor has a session of its own; some view several paths, some view one path twice
(a second pageview, no second visitor), so pageviews and visitors differ on purpose.

    seed(gc)        phase 1: visitors on today-3, today-2 and today-1 (UTC), and two early today
    seed_more(gc)   phase 2: more visitors on today only, on old and new paths (a new page, a new event)
    visitors_by_day_path(gc)   GoatCounter's own truth: hit_counts per (UTC day, path)

Today is in both phases on purpose: the day the first export is made is the last synced day, which a
sync must export again (`start_from_day`) and replace, not add to.

Times of day are fixed for past days; today's are fractions of the time elapsed since midnight UTC, so
they are never in the future (GoatCounter refuses created_at more than 5 s ahead) and phase 2's come
after phase 1's.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections import Counter
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from goatcounter_exports.testbed import LocalGoatCounter, LocalSite

USER_AGENTS = {
    "firefox": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "chrome": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36"
    ),
    "safari": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.5 Mobile/15E148 Safari/604.1"
    ),
}

TITLES = {
    "/": "Home",
    "/docs": "Documentation",
    "/docs/install": "Install",
    "/pricing": "Pricing",
    "/blog/hello": "Hello, world",
    "/changelog": "Changelog",
    "signup-click": "Sign up button",
    "download-click": "Download button",
}
EVENTS = frozenset({"signup-click", "download-click"})


@dataclass(frozen=True)
class Visitor:
    """One visitor (one session): its device and the pages it viewed, in order."""

    name: str
    day: int  # days before today (0 = today)
    at: str | float  # "HH:MM" for a past day; for today, the fraction of the time since midnight
    browser: str
    size: str  # screen width, a string as POST /api/v0/count wants it
    location: str
    ref: str
    paths: tuple[str, ...]  # a path twice = one visitor, two pageviews


# Phase 1: three past days (23:40 on today-2 checks the day boundary) and two visitors early today.
PHASE1 = (
    Visitor("v1", 3, "08:15", "firefox", "1920", "NL", "https://example.com/blog", ("/", "/docs", "/docs")),
    Visitor("v2", 3, "09:40", "chrome", "1280", "US-CA", "https://www.google.com/", ("/",)),
    Visitor("v3", 3, "14:05", "safari", "390", "US-CA", "", ("/pricing", "signup-click")),
    Visitor("v4", 2, "07:00", "firefox", "2560", "NL", "", ("/docs", "/docs/install")),
    Visitor("v5", 2, "12:30", "chrome", "1920", "US-CA", "https://news.ycombinator.com/item?id=1", ("/",)),
    Visitor("v6", 2, "23:40", "safari", "390", "NL", "", ("/", "/")),
    Visitor("v7", 1, "10:10", "chrome", "1280", "NL", "https://www.google.com/", ("/", "/pricing", "signup-click")),
    Visitor("v8", 1, "16:20", "firefox", "1920", "US-CA", "", ("/docs/install",)),
    Visitor("v9", 1, "21:55", "safari", "390", "US-CA", "https://example.com/blog", ("/blog/hello",)),
    Visitor("v10", 0, 0.10, "chrome", "1920", "NL", "", ("/",)),
    Visitor("v11", 0, 0.20, "firefox", "1280", "US-CA", "https://www.google.com/", ("/docs",)),
)

# Phase 2: today only, after the first export; /changelog and download-click are new paths.
PHASE2 = (
    Visitor("v12", 0, 0.50, "safari", "390", "US-CA", "https://example.com/blog", ("/changelog", "/")),
    Visitor("v13", 0, 0.60, "chrome", "1920", "NL", "", ("/docs", "download-click")),
    Visitor("v14", 0, 0.70, "firefox", "2560", "NL", "https://www.google.com/", ("/changelog", "/changelog")),
    Visitor("v15", 0, 0.80, "chrome", "1280", "US-CA", "", ("/pricing",)),
)


@dataclass(frozen=True)
class Seeded:
    """What one phase sent: the hits (POST /api/v0/count objects) and the visitors they make."""

    hits: tuple[Mapping[str, Any], ...]
    visitors: dict[str, dict[str, int]]  # {UTC day: {path: visitors}}, as visitors_by_day_path answers

    @property
    def pageviews(self) -> int:
        return len(self.hits)

    @property
    def total_visitors(self) -> int:
        return sum(sum(paths.values()) for paths in self.visitors.values())


def utc_today() -> date:
    return datetime.now(UTC).date()


def seed(gc: LocalGoatCounter, *, today: date | None = None, site: LocalSite | None = None) -> Seeded:
    """Phase 1: count PHASE1's visitors on `gc` and wait until GoatCounter has stored them."""
    return _seed(gc, PHASE1, today or utc_today(), site)


def seed_more(gc: LocalGoatCounter, *, today: date | None = None, site: LocalSite | None = None) -> Seeded:
    """Phase 2: count PHASE2's visitors (today only) and wait until stored. `today` must still be today."""
    return _seed(gc, PHASE2, today or utc_today(), site)


def hits_for(visitors: tuple[Visitor, ...], today: date, now: datetime) -> tuple[dict[str, Any], ...]:
    """The hit objects of POST /api/v0/count for `visitors`, with explicit sessions and created_at."""
    run = secrets.token_hex(4)  # sessions outlive a restart of GoatCounter: never reuse one
    midnight = datetime.combine(today, time(0), UTC)
    hits: list[dict[str, Any]] = []
    for visitor in visitors:
        if isinstance(visitor.at, str):
            if visitor.day == 0:
                raise ValueError(f"{visitor.name}: today's visitors take a fraction of the day so far")
            hour, minute = (int(part) for part in visitor.at.split(":"))
            start = midnight - timedelta(days=visitor.day) + timedelta(hours=hour, minutes=minute)
        else:
            if visitor.day != 0:
                raise ValueError(f"{visitor.name}: a past day's visitor takes a time of day")
            start = midnight + (now - midnight) * visitor.at
        for i, path in enumerate(visitor.paths):
            created = start + timedelta(minutes=2 * i)
            if visitor.day == 0:
                created = min(created, now)
            hit: dict[str, Any] = {
                "path": path,
                "title": TITLES[path],
                "session": f"scenario-{run}-{visitor.name}",
                "user_agent": USER_AGENTS[visitor.browser],
                "size": visitor.size,
                "location": visitor.location,
                "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            if path in EVENTS:
                hit["event"] = True
            elif visitor.ref and i == 0:  # the referrer of the landing page
                hit["ref"] = visitor.ref
            hits.append(hit)
    return tuple(hits)


def expected_visitors(hits: tuple[Mapping[str, Any], ...]) -> dict[str, dict[str, int]]:
    """Visitors per (UTC day, path) GoatCounter should count: one per (session, path), on the day of its first view.

    "First" in the order the hits are sent, as GoatCounter's memstore sees them.
    """
    first: dict[tuple[str, str], str] = {}
    for hit in hits:
        first.setdefault((str(hit["session"]), str(hit["path"])), str(hit["created_at"])[:10])
    counts = Counter((day, path) for (_, path), day in first.items())
    return _nest(counts)


def visitors_by_day_path(gc: LocalGoatCounter, site: LocalSite | None = None) -> dict[str, dict[str, int]]:
    """GoatCounter's truth from its database: sum(hit_counts.total) per (UTC day, path) of the site.

    Days are UTC (LocalGoatCounter runs GoatCounter with TZ=UTC; `hour` is stored in UTC).
    """
    site_id = (site or gc.site).site_id
    with closing(sqlite3.connect(f"file:{gc.db_path}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute(
            """select substr(c.hour, 1, 10) as day, p.path, sum(c.total)
                 from hit_counts c join paths p on p.path_id = c.path_id and p.site_id = c.site_id
                where c.site_id = ?
                group by day, p.path""",
            (site_id,),
        ).fetchall()
    return _nest(Counter({(str(day), str(path)): int(total) for day, path, total in rows if total}))


def total(visitors: Mapping[str, Mapping[str, int]]) -> int:
    return sum(sum(paths.values()) for paths in visitors.values())


def _seed(gc: LocalGoatCounter, visitors: tuple[Visitor, ...], today: date, site: LocalSite | None) -> Seeded:
    now = datetime.now(UTC).replace(microsecond=0)
    if now.date() != today:
        raise RuntimeError(f"the UTC day changed ({today} is over): run the scenario again")
    hits = hits_for(visitors, today, now)
    gc.seed(hits, site=site)
    return Seeded(hits, expected_visitors(hits))


def _nest(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for (day, path), count in sorted(counts.items()):
        nested.setdefault(day, {})[path] = count
    return nested
