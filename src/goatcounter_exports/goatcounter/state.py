"""What this installation remembers between calls and processes: exports it created, and the budget.

One small SQLite file (WAL, so REST, MCP and CLI processes can share it). GoatCounter
allows one export an hour per client IP by default, and a refused POST still spends
the hour, so every create is recorded with the `X-Rate-Limit-*` headers it came back
with. The budget is keyed by upstream host: every site on goatcounter.com shares one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

SCHEMA = """
create table if not exists exports (
    api_uri text not null,
    export_id integer not null,
    created_at real not null,
    start_from_hit_id integer not null,
    idempotency_key text,
    primary key (api_uri, export_id)
);
create unique index if not exists exports_idempotency on exports (api_uri, idempotency_key)
    where idempotency_key is not null;
create table if not exists budgets (
    host text primary key,
    limit_per_window integer,
    remaining integer not null,
    reset_at real not null
);
"""


RECENT_EXPORT_SECONDS = 24 * 3600  # GoatCounter keeps export files a day: older ones are of no use


def budget_host(api_uri: str) -> str:
    """The rate-limit domain: `*.goatcounter.com` is one server, anything else its own host:port."""
    netloc = urlsplit(api_uri).netloc.rpartition("@")[2].lower()
    return "goatcounter.com" if netloc == "goatcounter.com" or netloc.endswith(".goatcounter.com") else netloc


@dataclass(frozen=True)
class RecordedExport:
    export_id: int
    created_at: float
    start_from_hit_id: int


@dataclass(frozen=True)
class Budget:
    limit: int | None
    remaining: int
    reset_at: float

    def exhausted(self, now: float) -> bool:
        return self.remaining <= 0 and now < self.reset_at

    def retry_after(self, now: float) -> int:
        return max(1, int(self.reset_at - now + 0.999))


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            connection.execute("pragma journal_mode=wal")
            connection.executescript(SCHEMA)
            yield connection
        finally:
            connection.close()

    def record_export(
        self, api_uri: str, export_id: int, start: int, key: str | None, now: float | None = None
    ) -> None:
        with self._connect() as db:
            db.execute(
                "insert or replace into exports values (?, ?, ?, ?, ?)",
                (api_uri, export_id, now or time.time(), start, key),
            )

    def export_for_key(self, api_uri: str, key: str) -> int | None:
        with self._connect() as db:
            row = db.execute(
                "select export_id from exports where api_uri = ? and idempotency_key = ?", (api_uri, key)
            ).fetchone()
        return int(row[0]) if row else None

    def latest_export(self, api_uri: str, since: float, start: int | None = None) -> RecordedExport | None:
        """The newest export created here since `since`, for that start when given."""
        query = "select export_id, created_at, start_from_hit_id from exports where api_uri = ? and created_at >= ?"
        args: list[object] = [api_uri, since]
        if start is not None:
            query += " and start_from_hit_id = ?"
            args.append(start)
        with self._connect() as db:
            row = db.execute(query + " order by created_at desc limit 1", args).fetchone()
        return RecordedExport(int(row[0]), float(row[1]), int(row[2])) if row else None

    def save_budget(
        self, api_uri: str, limit: int | None, remaining: int, reset_in: float, now: float | None = None
    ) -> None:
        with self._connect() as db:
            db.execute(
                "insert or replace into budgets values (?, ?, ?, ?)",
                (budget_host(api_uri), limit, remaining, (now or time.time()) + reset_in),
            )

    def budget(self, api_uri: str) -> Budget | None:
        with self._connect() as db:
            row = db.execute(
                "select limit_per_window, remaining, reset_at from budgets where host = ?", (budget_host(api_uri),)
            ).fetchone()
        return Budget(row[0], int(row[1]), float(row[2])) if row else None
