"""The state store in PostgreSQL, for several replicas of the gateway behind one address.

GoatCounter counts its hourly export budget per client IP, so replicas behind one egress share one
budget: they must share what they know of it too. The tables and statements are the SQLite store's
(goatcounter/store.py); here they run on a psycopg 3 async connection pool, each call one short
transaction, and the rows a decision depends on are locked (`for update`) for its length only. A
replica that dies mid-transaction holds nothing: PostgreSQL rolls it back with the connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from ..errors import StateError
from .store import Store, Tx, version_of

try:  # the `postgres` extra
    import psycopg
    from psycopg_pool import AsyncConnectionPool
except ImportError:  # pragma: no cover - the error below says what to install
    psycopg = None  # type: ignore[assignment]

MIGRATION_LOCK = 7_317_005_501  # a pg_advisory_xact_lock key: replicas starting together migrate one at a time


def is_postgres_url(value: str) -> bool:
    return urlsplit(value).scheme in ("postgres", "postgresql")


def safe_name(url: str) -> str:
    """The URL as messages may show it: no password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


class _PgTx:
    def __init__(self, connection: Any) -> None:
        self.connection = connection

    async def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        cursor = await self.connection.execute(sql.replace("?", "%s"), tuple(args))
        return int(cursor.rowcount)

    async def fetchone(self, sql: str, args: Sequence[object] = ()) -> tuple[Any, ...] | None:
        cursor = await self.connection.execute(sql.replace("?", "%s"), tuple(args))
        row: tuple[Any, ...] | None = await cursor.fetchone()
        return row

    async def fetchall(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        cursor = await self.connection.execute(sql.replace("?", "%s"), tuple(args))
        return list(await cursor.fetchall())


class PostgresStateStore(Store):
    lock_rows = " for update"

    def __init__(self, url: str, *, max_connections: int = 8) -> None:
        if psycopg is None:
            raise StateError(
                "a PostgreSQL state store needs the postgres extra: pip install 'goatcounter-exports[postgres]'"
            )
        self.url = url
        self._pool = AsyncConnectionPool(url, min_size=1, max_size=max_connections, open=False, timeout=5)
        self._ready = False

    @property
    def name(self) -> str:
        return safe_name(self.url)

    @asynccontextmanager
    async def _transaction(self, write: bool = True) -> AsyncIterator[Tx]:
        try:
            if not self._ready:
                await self._pool.open(wait=True, timeout=5)
                async with self._pool.connection() as connection, connection.transaction():
                    await self._prepare(_PgTx(connection))
                self._ready = True
            async with self._pool.connection() as connection, connection.transaction():
                yield _PgTx(connection)
        except psycopg.Error as exc:
            raise StateError(f"the state store {self.name} cannot be used: {exc.__class__.__name__}: {exc}") from None

    async def _prepare(self, tx: Tx) -> None:
        await tx.execute("select pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        await tx.execute("create table if not exists schema_version (version integer not null)")
        row = await tx.fetchone("select version from schema_version")
        if row is None:
            await tx.execute("insert into schema_version values (0)")
            row = (0,)
        await self.migrate(tx, version_of(row))

    async def close(self) -> None:
        await self._pool.close()
