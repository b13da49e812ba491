"""Metrics read at scrape time from what this installation keeps: the budgets it learnt (the state store, SQLite
or the PostgreSQL one replicas share) and the pageviews `sync` added (the synced copy, in either store)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..errors import GoatcounterExportsError
from .stats import reading
from .store import Store

STORE_WAIT_SECONDS = 5.0  # a scrape waits this long for the state store at most


def synced_rows(database: Path | str) -> list[tuple[str, int]]:
    """(site, rows) of the synced copy's cursors, read-only; nothing when there is no copy (yet) or it cannot be
    read: a scrape shows what it can, and never fails for it."""
    if isinstance(database, Path) and not database.exists():
        return []
    try:
        with reading(database) as db:
            if not db.has_table("sync_state"):
                return []
            return [(str(site), int(rows)) for site, rows in db.rows("select site, rows from sync_state")]
    except (GoatcounterExportsError, sqlite3.Error):
        return []


class StateCollector(Collector):
    """Prometheus reads collectors on a thread and cannot wait for the store: `refresh` reads both just before a
    scrape (the /metrics route awaits it), and `collect` shows what it read."""

    def __init__(self, store: Store, database: Path | str) -> None:
        self.store = store
        self.database = database
        self._budgets: list[tuple[str, int, float]] = []
        self._synced: list[tuple[str, int]] = []

    async def refresh(self) -> None:
        try:
            self._budgets = await asyncio.wait_for(self.store.budgets(), STORE_WAIT_SECONDS)
        except (GoatcounterExportsError, TimeoutError):  # a locked or unreachable store: no budget figures this time
            self._budgets = []
        self._synced = await asyncio.to_thread(synced_rows, self.database)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        remaining = GaugeMetricFamily(
            "goatcounter_exports_budget_remaining",
            "GoatCounter's budget as last learnt: exports (scope export) or API calls (scope api) left.",
            labels=["host", "scope"],
        )
        reset = GaugeMetricFamily(
            "goatcounter_exports_budget_reset_timestamp_seconds",
            "When that budget is next full.",
            labels=["host", "scope"],
        )
        for key, left, reset_at in self._budgets:
            host, _, scope = key.partition(" ")
            remaining.add_metric([host, scope or "export"], float(left))
            reset.add_metric([host, scope or "export"], reset_at)
        yield remaining
        yield reset
        synced = GaugeMetricFamily(
            "goatcounter_exports_sync_rows", "Pageviews `sync` has added to the local copy, by site.", labels=["site"]
        )
        for site, rows in self._synced:
            synced.add_metric([site], float(rows))
        yield synced
