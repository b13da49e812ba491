"""Metrics read from what this installation keeps, at scrape time: the budgets it learnt, and synced rows."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


def _rows(path: Path, query: str) -> list[tuple[object, ...]]:
    """Read-only, and nothing when the file or table is not there yet."""
    if not path.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
            return list(db.execute(query))
    except sqlite3.Error:
        return []


class StateCollector(Collector):
    def __init__(self, state_file: Path, database: Path) -> None:
        self.state_file = state_file
        self.database = database

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
        for key, left, reset_at in _rows(self.state_file, "select host, remaining, reset_at from budgets"):
            host, _, scope = str(key).partition(" ")
            remaining.add_metric([host, scope or "export"], float(str(left)))
            reset.add_metric([host, scope or "export"], float(str(reset_at)))
        yield remaining
        yield reset
        synced = GaugeMetricFamily(
            "goatcounter_exports_sync_rows", "Pageviews `sync` has added to the local copy, by site.", labels=["site"]
        )
        for site, rows in _rows(self.database, "select site, rows from sync_state"):
            synced.add_metric([str(site)], float(str(rows)))
        yield synced
