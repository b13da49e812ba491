"""What this installation remembers between calls and processes: exports it created, and the budget.

One small SQLite file (WAL, so REST, MCP and CLI processes can share it), opened once per
process. Its one connection lives on a thread of its own, so the event loop never waits
on SQLite: every method is a coroutine that runs its statements there. GoatCounter allows
one export an hour per client IP by default, and a refused POST still spends the hour, so
every create is recorded with the `X-Rate-Limit-*` headers it came back with. The budget
is keyed by upstream host: every site on goatcounter.com shares one.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from ..errors import StateError

T = TypeVar("T")

SCHEMA = """
create table if not exists exports (
    api_uri text not null,
    export_id integer not null,
    created_at real not null,
    start_from_hit_id integer not null,
    idempotency_key text,
    request text,
    primary key (api_uri, export_id)
);
create unique index if not exists exports_idempotency on exports (api_uri, idempotency_key)
    where idempotency_key is not null;
create table if not exists idempotency (
    api_uri text not null,
    key text not null,
    request text not null,
    state text not null,
    export_id integer,
    started_at real not null,
    primary key (api_uri, key)
);
create table if not exists budgets (
    host text primary key,
    limit_per_window integer,
    remaining integer not null,
    reset_at real not null
);
"""
STATE_FILE = "state.sqlite3"
# How long a call waits for another process's lock on the state file before giving up (503, nothing sent).
BUSY_SECONDS = 2.0
RECENT_EXPORT_SECONDS = 24 * 3600  # GoatCounter keeps export files a day: older ones are of no use


Scope = Literal["export", "api"]  # the hourly export budget; main's hourly API budget (api2)


def budget_key(api_uri: str, scope: Scope) -> str:
    return budget_host(api_uri) + ("" if scope == "export" else f" {scope}")


def budget_host(api_uri: str) -> str:
    """The rate-limit domain: `*.goatcounter.com` is one server, anything else its own host:port."""
    netloc = urlsplit(api_uri).netloc.rpartition("@")[2].lower()
    return "goatcounter.com" if netloc == "goatcounter.com" or netloc.endswith(".goatcounter.com") else netloc


@dataclass(frozen=True)
class Reservation:
    """What an Idempotency-Key holds: `reserved` (go ahead), `mismatch` (another request used it),
    `in_flight` (a request with it is being sent), `done` (its export is `export_id`), or `unknown` (an
    earlier try got no answer, at `started_at`: look before creating again)."""

    state: Literal["reserved", "mismatch", "in_flight", "done", "unknown"]
    export_id: int | None = None
    started_at: float | None = None


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
    """The state file, opened lazily on first use and closed with `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-store")
        self._db: sqlite3.Connection | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def on_thread() -> T:
            try:
                if self._db is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
                    db.execute("pragma journal_mode=wal")
                    db.executescript(SCHEMA)
                    if "request" not in {row[1] for row in db.execute("pragma table_info(exports)")}:
                        db.execute("alter table exports add column request text")  # state files of 0.1.0
                    self._db = db
                return work(self._db)
            except (sqlite3.Error, OSError) as exc:
                raise StateError(f"the state store {self.path.name} cannot be used: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._thread, on_thread)

    def close(self) -> None:
        def close_on_thread() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._thread.submit(close_on_thread).result()
        self._thread.shutdown()

    async def check_writable(self) -> None:
        """Raise StateError now, before an export is created, if its record could not be written after."""

        def probe(db: sqlite3.Connection) -> None:
            db.execute("begin immediate")
            db.execute("commit")

        await self._run(probe)

    async def record_export(
        self, api_uri: str, export_id: int, request: str, key: str | None, now: float | None = None
    ) -> None:
        """Remember an export made here, with its canonical request (exports.request_key)."""
        created = now or time.time()
        start = int(json.loads(request).get("start_from_hit_id") or 0)
        await self._run(
            lambda db: db.execute(
                "insert or replace into exports (api_uri, export_id, created_at, start_from_hit_id, idempotency_key, "
                "request) values (?, ?, ?, ?, ?, ?)",
                (api_uri, export_id, created, start, key, request),
            )
        )

    async def reserve(self, api_uri: str, key: str, request: str, in_flight: float, now: float) -> Reservation:
        """Take an Idempotency-Key for a request, atomically across processes (one transaction)."""

        def decide(db: sqlite3.Connection) -> Reservation:
            row = db.execute(
                "select request, state, export_id, started_at from idempotency where api_uri = ? and key = ?",
                (api_uri, key),
            ).fetchone()
            if row is None:
                db.execute("insert into idempotency values (?, ?, ?, 'pending', null, ?)", (api_uri, key, request, now))
                return Reservation("reserved")
            held, state, export_id, started = row
            if held != request:
                return Reservation("mismatch")
            if state == "done":
                return Reservation("done", int(export_id))
            if state == "pending" and now - float(started) < in_flight:
                return Reservation("in_flight")
            db.execute(
                "update idempotency set state = 'pending', started_at = ? where api_uri = ? and key = ?",
                (now, api_uri, key),
            )
            return Reservation("unknown", started_at=float(started))

        def work(db: sqlite3.Connection) -> Reservation:
            db.execute("begin immediate")
            try:
                reservation = decide(db)
            except BaseException:
                db.execute("rollback")
                raise
            db.execute("commit")
            return reservation

        return await self._run(work)

    async def settle(self, api_uri: str, key: str, export_id: int | None, unknown: bool = False) -> None:
        """An Idempotency-Key's outcome: its export, or (None) no export (the key is free again), or unknown."""
        args: tuple[object, ...] = (api_uri, key)
        if export_id is not None:
            sql, args = (
                "update idempotency set state = 'done', export_id = ? where api_uri = ? and key = ?",
                (
                    export_id,
                    *args,
                ),
            )
        elif unknown:
            sql = "update idempotency set state = 'unknown' where api_uri = ? and key = ?"
        else:
            sql = "delete from idempotency where api_uri = ? and key = ? and state != 'done'"
        await self._run(lambda db: db.execute(sql, args))

    async def max_export_id(self, api_uri: str) -> int:
        row = await self._run(
            lambda db: db.execute("select max(export_id) from exports where api_uri = ?", (api_uri,)).fetchone()
        )
        return int(row[0]) if row and row[0] is not None else 0

    async def latest_export(self, api_uri: str, since: float, request: str | None = None) -> int | None:
        """The id of the newest export created here since `since`, for that canonical request when given."""
        query = "select export_id from exports where api_uri = ? and created_at >= ?"
        args: list[object] = [api_uri, since]
        if request is not None:
            query += " and request = ?"
            args.append(request)
        row = await self._run(lambda db: db.execute(query + " order by created_at desc limit 1", args).fetchone())
        return int(row[0]) if row else None

    async def save_budget(
        self,
        api_uri: str,
        limit: int | None,
        remaining: int,
        reset_in: float,
        now: float | None = None,
        scope: Scope = "export",
    ) -> None:
        reset_at = (now or time.time()) + reset_in
        key = budget_key(api_uri, scope)
        await self._run(
            lambda db: db.execute(
                "insert or replace into budgets values (?, ?, ?, ?)", (key, limit, remaining, reset_at)
            )
        )

    async def budget(self, api_uri: str, scope: Scope = "export") -> Budget | None:
        key = budget_key(api_uri, scope)
        row = await self._run(
            lambda db: db.execute(
                "select limit_per_window, remaining, reset_at from budgets where host = ?", (key,)
            ).fetchone()
        )
        return Budget(row[0], int(row[1]), float(row[2])) if row else None
