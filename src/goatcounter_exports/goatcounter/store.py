"""What this installation remembers between calls, processes and replicas: exports it created,
Idempotency-Keys, the budgets GoatCounter showed, and which create is on its way.

GoatCounter allows one export an hour per client IP by default, and a refused POST still spends
the hour, so every create is recorded with the `X-Rate-Limit-*` headers it came back with, and a
create is sent only after taking the host's *create slot*: atomically, so that however many
processes or replicas share the store, one create per budget is on its way at a time. A holder that
dies frees the slot when its hold expires (seconds, not a lease forever). The budget is keyed by
upstream host: every site on goatcounter.com shares one.

Two backends, the same tables and the same statements (`?` placeholders; PostgreSQL's are made from
them): SQLite (`StateStore`, the default: one file, WAL, its connection on a thread of its own) and
PostgreSQL (`goatcounter/store_postgres.py`, for replicas). Both carry a schema version and apply
forward-only migrations when opened; an older binary meeting a newer schema refuses to run.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from ..errors import StateError

T = TypeVar("T")

# Forward-only, for both backends (statements separated by ";"). Version n is reached by MIGRATIONS[n-1].
MIGRATIONS: tuple[str, ...] = (
    # 1: 0.1.0's tables
    """
    create table if not exists exports (
        api_uri text not null, export_id integer not null, created_at double precision not null,
        start_from_hit_id bigint not null, idempotency_key text, primary key (api_uri, export_id));
    create unique index if not exists exports_idempotency on exports (api_uri, idempotency_key)
        where idempotency_key is not null;
    create table if not exists budgets (
        host text primary key, limit_per_window integer, remaining integer not null,
        reset_at double precision not null)
    """,
    # 2: the canonical request of each export, and Idempotency-Keys bound to theirs
    """
    alter table exports add column request text;
    create table idempotency (
        api_uri text not null, key text not null, request text not null, state text not null,
        export_id integer, started_at double precision not null, primary key (api_uri, key))
    """,
    # 3: the create slot of each host
    """
    create table create_slots (host text primary key, held_until double precision not null)
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

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


@dataclass(frozen=True)
class Slot:
    """The answer to "may I send a create now?": `go` (the slot is mine), `spent` (the budget is), or `busy`
    (another process's create is on its way; ask again shortly)."""

    state: Literal["go", "spent", "busy"]
    budget: Budget | None = None


class Tx(Protocol):
    """Statements inside one transaction."""

    async def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        """Run a statement; the number of rows it changed."""

    async def fetchone(self, sql: str, args: Sequence[object] = ()) -> tuple[Any, ...] | None: ...

    async def fetchall(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]: ...


class Store(ABC):
    """The state store's logic, for any backend that can run a transaction (`_transaction`)."""

    lock_rows = ""  # what a backend appends to a select whose rows the transaction will change

    @abstractmethod
    def _transaction(self, write: bool = True) -> AbstractAsyncContextManager[Tx]:
        """One transaction; `write=False` for one that only reads (it need not wait for writers)."""

    @abstractmethod
    async def close(self) -> None: ...

    @property
    @abstractmethod
    def name(self) -> str:
        """What messages call this store (never its password)."""

    async def _one(self, sql: str, args: Sequence[object] = ()) -> tuple[Any, ...] | None:
        async with self._transaction(write=False) as tx:
            return await tx.fetchone(sql, args)

    async def _run(self, sql: str, args: Sequence[object] = ()) -> None:
        async with self._transaction() as tx:
            await tx.execute(sql, args)

    @staticmethod
    async def migrate(tx: Tx, current: int) -> None:
        if current > SCHEMA_VERSION:
            raise StateError(
                f"the state store has schema version {current}, newer than this goatcounter-exports knows "
                f"({SCHEMA_VERSION}); upgrade goatcounter-exports, or point it at another state store"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    await tx.execute(statement)
            await tx.execute("update schema_version set version = ?", (version,))

    async def check_writable(self) -> None:
        """Raise StateError now, before an export is created, if its record could not be written after."""
        await self._run("update schema_version set version = version")

    async def record_export(
        self, api_uri: str, export_id: int, request: str, key: str | None, now: float | None = None
    ) -> None:
        """Remember an export made here, with its canonical request (exports.request_key)."""
        created = now or time.time()
        start = int(json.loads(request).get("start_from_hit_id") or 0)
        await self._run(
            "insert into exports (api_uri, export_id, created_at, start_from_hit_id, idempotency_key, request) "
            "values (?, ?, ?, ?, ?, ?) on conflict (api_uri, export_id) do update set created_at = excluded.created_at,"
            " start_from_hit_id = excluded.start_from_hit_id, request = excluded.request",
            (api_uri, export_id, created, start, key, request),
        )

    async def reserve(self, api_uri: str, key: str, request: str, in_flight: float, now: float) -> Reservation:
        """Take an Idempotency-Key for a request, atomically across processes and replicas."""
        async with self._transaction() as tx:
            taken = await tx.execute(
                "insert into idempotency (api_uri, key, request, state, export_id, started_at) "
                "values (?, ?, ?, 'pending', null, ?) on conflict (api_uri, key) do nothing",
                (api_uri, key, request, now),
            )
            if taken:
                return Reservation("reserved")
            row = await tx.fetchone(
                "select request, state, export_id, started_at from idempotency where api_uri = ? and key = ?"  # noqa: S608
                + self.lock_rows,
                (api_uri, key),
            )
            assert row is not None
            held, state, export_id, started = row
            if held != request:
                return Reservation("mismatch")
            if state == "done":
                return Reservation("done", int(export_id))
            if state == "pending" and now - float(started) < in_flight:
                return Reservation("in_flight")
            await tx.execute(
                "update idempotency set state = 'pending', started_at = ? where api_uri = ? and key = ?",
                (now, api_uri, key),
            )
            return Reservation("unknown", started_at=float(started))

    async def settle(self, api_uri: str, key: str, export_id: int | None, unknown: bool = False) -> None:
        """An Idempotency-Key's outcome: its export, or (None) no export (the key is free again), or unknown."""
        if export_id is not None:
            sql = "update idempotency set state = 'done', export_id = ? where api_uri = ? and key = ?"
            await self._run(sql, (export_id, api_uri, key))
        elif unknown:
            await self._run("update idempotency set state = 'unknown' where api_uri = ? and key = ?", (api_uri, key))
        else:
            sql = "delete from idempotency where api_uri = ? and key = ? and state <> 'done'"
            await self._run(sql, (api_uri, key))

    async def take_create_slot(self, api_uri: str, hold: float, now: float) -> Slot:
        """May a create be sent now? Atomically: the budget is read, and the host's slot taken (for `hold`
        seconds at most) and the budget counted down, in one transaction."""
        host = budget_host(api_uri)
        async with self._transaction() as tx:
            row = await tx.fetchone(
                "select limit_per_window, remaining, reset_at from budgets where host = ?" + self.lock_rows,  # noqa: S608
                (host,),
            )
            budget = Budget(row[0], int(row[1]), float(row[2])) if row else None
            if budget is not None and budget.exhausted(now):
                return Slot("spent", budget)
            taken = await tx.execute(
                "insert into create_slots (host, held_until) values (?, ?) on conflict (host) do update "
                "set held_until = excluded.held_until where create_slots.held_until < ?",
                (host, now + hold, now),
            )
            if not taken:
                return Slot("busy", budget)
            if budget is not None:  # counted now; the create's own answer will tell the truth
                await tx.execute("update budgets set remaining = remaining - 1 where host = ?", (host,))
            return Slot("go", budget)

    async def free_create_slot(self, api_uri: str) -> None:
        await self._run("delete from create_slots where host = ?", (budget_host(api_uri),))

    async def max_export_id(self, api_uri: str) -> int:
        row = await self._one("select max(export_id) from exports where api_uri = ?", (api_uri,))
        return int(row[0]) if row and row[0] is not None else 0

    async def latest_export(self, api_uri: str, since: float, request: str | None = None) -> int | None:
        """The id of the newest export created here since `since`, for that canonical request when given."""
        query = "select export_id from exports where api_uri = ? and created_at >= ?"
        args: list[object] = [api_uri, since]
        if request is not None:
            query += " and request = ?"
            args.append(request)
        row = await self._one(query + " order by created_at desc limit 1", args)
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
        await self._run(
            "insert into budgets (host, limit_per_window, remaining, reset_at) values (?, ?, ?, ?) "
            "on conflict (host) do update set limit_per_window = excluded.limit_per_window, "
            "remaining = excluded.remaining, reset_at = excluded.reset_at",
            (budget_key(api_uri, scope), limit, remaining, reset_at),
        )

    async def budgets(self) -> list[tuple[str, int, float]]:
        """Every budget learnt, as (its key: host and scope, remaining, reset_at): what /metrics shows."""
        async with self._transaction(write=False) as tx:
            rows = await tx.fetchall("select host, remaining, reset_at from budgets order by host")
        return [(str(key), int(left), float(reset_at)) for key, left, reset_at in rows]

    async def budget(self, api_uri: str, scope: Scope = "export") -> Budget | None:
        row = await self._one(
            "select limit_per_window, remaining, reset_at from budgets where host = ?", (budget_key(api_uri, scope),)
        )
        return Budget(row[0], int(row[1]), float(row[2])) if row else None


class _SqliteTx:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        return await self.store._on_thread(lambda db: db.execute(sql, tuple(args)).rowcount)

    async def fetchone(self, sql: str, args: Sequence[object] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self.store._on_thread(lambda db: db.execute(sql, tuple(args)).fetchone())
        return row

    async def fetchall(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self.store._on_thread(lambda db: db.execute(sql, tuple(args)).fetchall())
        return rows


class StateStore(Store):
    """The SQLite state file, opened on first use. Its one connection lives on a thread of its own, so the
    event loop never waits on SQLite; a transaction holds the connection until it ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-store")
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._ready = False

    @property
    def name(self) -> str:
        return self.path.name

    async def budgets(self) -> list[tuple[str, int, float]]:
        """As Store.budgets, read on a connection of its own (read-only, waiting at most a second): a scrape
        never queues behind a create's transaction, and never makes the file."""

        def read() -> list[tuple[str, int, float]]:
            if not self.path.exists():
                return []
            with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1)) as db:
                rows = db.execute("select host, remaining, reset_at from budgets order by host").fetchall()
            return [(str(key), int(left), float(reset_at)) for key, left, reset_at in rows]

        try:
            return await asyncio.to_thread(read)
        except sqlite3.Error as exc:
            raise StateError(f"the state store {self.path.name} cannot be read: {exc}") from None

    async def _on_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def on_thread() -> T:
            try:
                if self._db is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
                    db.execute("pragma journal_mode=wal")
                    self._db = db
                return work(self._db)
            except (sqlite3.Error, OSError) as exc:
                raise StateError(f"the state store {self.path.name} cannot be used: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._thread, on_thread)

    @asynccontextmanager
    async def _transaction(self, write: bool = True) -> AsyncIterator[Tx]:
        async with self._lock:
            tx = _SqliteTx(self)
            if not self._ready:
                async with self._begun(tx, "begin immediate"):
                    await self._prepare(tx)
            async with self._begun(tx, "begin immediate" if write else "begin"):
                yield tx

    @asynccontextmanager
    async def _begun(self, tx: Tx, begin: str) -> AsyncIterator[None]:
        await tx.execute(begin)
        try:
            yield
        except BaseException:
            await self._on_thread(lambda db: db.rollback() if db.in_transaction else None)
            raise
        await tx.execute("commit")

    async def _prepare(self, tx: Tx) -> None:
        """The schema version table, and the migrations this file has not had (0.1.0's files included)."""
        await tx.execute("create table if not exists schema_version (version integer not null)")
        row = await tx.fetchone("select version from schema_version")
        if row is None:
            # A file from before schema versions: 0.1.0's tables (version 1), or nothing yet (version 0).
            existing = await tx.fetchone("select count(*) from sqlite_master where name = 'exports'")
            columns = set(await self._columns("exports"))
            version = 0 if not existing or not existing[0] else 2 if "request" in columns else 1
            await tx.execute("insert into schema_version values (?)", (version,))
            row = (version,)
        await self.migrate(tx, version_of(row))
        self._ready = True

    async def _columns(self, table: str) -> list[str]:
        names: list[str] = await self._on_thread(lambda db: [r[1] for r in db.execute(f"pragma table_info({table})")])
        return names

    async def close(self) -> None:
        def close_on_thread() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close_on_thread)
        self._thread.shutdown()


def version_of(row: tuple[Any, ...]) -> int:
    return int(row[0])
