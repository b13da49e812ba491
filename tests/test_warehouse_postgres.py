"""`sync --db postgresql://...`: the synced copy in a real PostgreSQL, from a real GoatCounter (CSV) and from
recordings of a real GoatCounter main build (JSON), through the real CLI. The same guarantees as the SQLite
copy: exact after every run, converged after a kill -9 anywhere, once-only under concurrent runs."""

from __future__ import annotations

import asyncio
import gzip
import sqlite3
import subprocess
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from goatcounter_exports.goatcounter.stats import PAGEVIEW_GROUPS, ask
from goatcounter_exports.goatcounter.warehouse_postgres import VERSION
from goatcounter_exports.testbed import LocalGoatCounter
from mcp import Client

from .conftest import service_env
from .postgres import Cluster
from .replay import EXPORT_KEY, FIXTURES, ReplayGoatCounter
from .support import CLI, ROOT, SERVE, clean_env, goatcounter_binary, metric_samples, run_cli, running
from .test_json_export import TRUTH
from .test_workflow import goatcounter_paths

EXIT_INTEGRITY, EXIT_CONFIG = 6, 2
HEADER = (
    "2Path,Title,Event,UserAgent,Browser,System,Session,Bot,Referrer,Referrer scheme,Screen size,"
    + "Location,FirstVisit,Date"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as started:
        yield started


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[LocalGoatCounter]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc") as instance:
        yield instance


def synced_paths(url: str) -> list[str]:
    with psycopg.connect(url) as db:
        return [row[0] for row in db.execute("select path from pageviews order by seq")]


def replay_env(replay: ReplayGoatCounter, tmp_path: Path, database: str) -> dict[str, str]:
    """The environment of a CLI run against the recorded main build, syncing into `database`."""
    return clean_env(
        GOATCOUNTER_URL=replay.url,
        GOATCOUNTER_API_KEY=EXPORT_KEY,
        GOATCOUNTER_EXPORTS_STATE_DIR=str(tmp_path / "state"),
        GOATCOUNTER_EXPORTS_DB=database,
    )


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(sql).fetchall()  # type: ignore[arg-type]


def test_sync_into_postgresql_is_exact_and_incremental(
    fresh: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    url = cluster.new_database()
    env = service_env(fresh, tmp_path / "state")
    fresh.seed([f"/n-{i % 7}" for i in range(40)])
    first = run_cli(["sync", "--db", url], env)
    assert first.returncode == 0, first.stderr
    assert synced_paths(url) == goatcounter_paths(fresh)
    fresh.seed([f"/m-{i % 3}" for i in range(25)])
    second = run_cli(["sync", "--db", url], env)
    assert second.returncode == 0, second.stderr
    assert "Synced 25 pageviews" in second.stderr and "65 in all" in second.stderr
    assert synced_paths(url) == goatcounter_paths(fresh)
    third = run_cli(["sync", "--db", url], env)
    assert "Synced 0 pageviews" in third.stderr and len(synced_paths(url)) == 65
    assert query(url, "select last_hit_id, rows from sync_state") == [(fresh.max_hit_id(), 65)]
    types = dict(
        query(url, "select column_name, data_type from information_schema.columns where table_name = 'pageviews'")
    )
    assert types["first_visit"] == "integer" and types["event"] == "integer" and types["date"] == "text"
    # The values as the SQLite copy has them: GoatCounter's true/false as 1/0, every field as written.
    with psycopg.connect(url) as db:
        rows = db.execute("select path, event, bot, first_visit, date from pageviews order by seq limit 1").fetchall()
    assert rows[0][0] == "/n-0" and rows[0][1] in (0, 1) and rows[0][2] == 0 and rows[0][3] in (0, 1)
    assert query(url, "select version from warehouse_version") == [(VERSION,)]
    indexes = {row[0] for row in query(url, "select indexname from pg_indexes where tablename = 'pageview_rows'")}
    assert indexes == {"pageview_rows_pkey", "pageview_rows_site_date"}  # built after the first load


def test_metrics_show_the_pageviews_synced_into_postgresql(
    fresh: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    url = cluster.new_database()
    env = service_env(fresh, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=url)
    fresh.seed([f"/metric-{i % 4}" for i in range(30)])
    assert run_cli(["sync"], env).returncode == 0
    with running(SERVE, env) as service:
        page = metric_samples(httpx.get(f"{service.rest}/metrics").text)
    shown = {dict(labels)["site"]: v for (name, labels), v in page.items() if name == "goatcounter_exports_sync_rows"}
    assert shown == {site: float(rows) for site, rows in query(url, "select site, rows from sync_state")}
    assert list(shown.values()) == [30.0]
    assert not (tmp_path / "state" / "pageviews.sqlite3").exists()  # read from PostgreSQL, no SQLite copy made


@pytest.mark.parametrize("crash_at", ["download", "before-commit", "after-commit"])
def test_sync_into_postgresql_killed_at_any_point_converges(
    fresh: LocalGoatCounter, cluster: Cluster, tmp_path: Path, crash_at: str
) -> None:
    url = cluster.new_database()
    env = service_env(fresh, tmp_path / "state")
    fresh.seed([f"/before-{i}" for i in range(10)])
    assert run_cli(["sync", "--db", url], env).returncode == 0
    fresh.seed([f"/after-{i}" for i in range(15)])
    killed = run_cli(["sync", "--db", url], {**env, "GOATCOUNTER_EXPORTS_CRASH_AT": crash_at})
    assert killed.returncode == -9
    left = len(synced_paths(url))
    assert left == (25 if crash_at == "after-commit" else 10)  # all or nothing of the killed run
    resumed = run_cli(["sync", "--db", url], env)
    assert resumed.returncode == 0, resumed.stderr
    assert synced_paths(url) == goatcounter_paths(fresh)
    assert len(synced_paths(url)) == 25


def test_two_concurrent_syncs_into_postgresql_store_every_pageview_once(
    fresh: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    url = cluster.new_database()
    fresh.seed([f"/c-{i % 50}" for i in range(5000)])
    env = service_env(fresh, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=url)
    runs = [
        subprocess.Popen([*CLI, "sync"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert query(url, "select count(*), count(distinct seq) from pageviews") == [(5000, 5000)]
    added = sorted(int(err.split("Synced ")[1].split()[0]) for _, err in outputs)
    assert added == [0, 5000]  # the second waited for the first's lock, then found nothing new


def test_a_file_that_does_not_match_its_hash_adds_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """The export is made by a run killed before its commit; GoatCounter's stored file is then replaced (its hash
    stays), large enough to reach PostgreSQL in many pieces before the hash is found wrong at its end."""
    url = cluster.new_database()
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", ratelimit=None) as limited:
        env = service_env(limited, tmp_path / "state")
        limited.seed([f"/x-{i}" for i in range(30)])
        killed = run_cli(["sync", "--db", url], {**env, "GOATCOUNTER_EXPORTS_CRASH_AT": "before-commit"})
        assert killed.returncode == -9
        (stored,) = list(limited.export_dir.glob("*.csv.gz"))
        rows = "".join(
            f"/forged-{uuid.uuid4()},t,false,ua,b,s,{uuid.uuid4().hex},0,,,,,NL,true,2026-11-26\n"
            for _ in range(40_000)
        )
        stored.write_bytes(gzip.compress(f"{HEADER}\n{rows}".encode()))
        assert stored.stat().st_size > 1_000_000
        refused = run_cli(["sync", "--db", url], env)
    assert refused.returncode == EXIT_INTEGRITY, refused.stderr
    assert "does not match" in refused.stderr and "WARNING" not in refused.stderr
    assert query(url, "select to_regclass('pageview_rows')::text") == [(None,)]  # its creation rolled back too
    assert query(url, "select count(*) from sync_state") == [(0,)]


def test_sync_json_into_postgresql_is_goatcounters_numbers(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.new_database()
    with ReplayGoatCounter(FIXTURES) as replay:
        env = replay_env(replay, tmp_path, url)
        first = run_cli(["sync"], env)
        assert first.returncode == 0, first.stderr
        assert visitors(url) == TRUTH["phase1"]["visitors"]
        killed = run_cli(["sync"], {**env, "GOATCOUNTER_EXPORTS_CRASH_AT": "before-commit"})
        assert killed.returncode == -9 and visitors(url) == TRUTH["phase1"]["visitors"]
        second = run_cli(["sync"], env)
        assert second.returncode == 0, second.stderr
    assert visitors(url) == TRUTH["phase2"]["visitors"]
    assert f"{TRUTH['phase2']['total_visitors']} visitors in all" in second.stderr


def visitors(url: str) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = defaultdict(dict)
    rows = query(
        url,
        "select substr(s.hour, 1, 10), p.path, sum(s.count) from hit_stats s "
        "join paths p on p.site = s.site and p.id = s.path_id group by 1, 2",
    )
    for day, path, count in rows:
        found[str(day)][str(path)] = int(count)  # type: ignore[call-overload]
    return dict(found)


def test_a_password_in_the_url_is_never_shown(fresh: LocalGoatCounter, cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.new_database().replace("@", ":pg-s3cret-pw@", 1)  # the test cluster trusts: any password works
    env = service_env(fresh, tmp_path / "state")
    fresh.seed(["/p"])
    run = run_cli(["sync", "--db", url], env)
    assert run.returncode == 0, run.stderr
    assert "pg-s3cret-pw" not in run.stdout + run.stderr and "Synced 1 pageviews" in run.stderr
    shown = run_cli(["config"], {**env, "GOATCOUNTER_EXPORTS_DB": url})
    assert shown.returncode == 0 and ":***@" in shown.stdout and "pg-s3cret-pw" not in shown.stdout + shown.stderr
    broken = run_cli(["sync", "--db", url.rsplit(":", 1)[0] + ":1/nowhere"], env)
    assert broken.returncode != 0 and "pg-s3cret-pw" not in broken.stdout + broken.stderr
    assert "cannot be opened" in broken.stderr


def test_a_database_of_a_newer_layout_is_refused_and_left_alone(
    fresh: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    url = cluster.new_database()
    env = service_env(fresh, tmp_path / "state")
    fresh.seed(["/a", "/b"])
    assert run_cli(["sync", "--db", url], env).returncode == 0
    with psycopg.connect(url) as db:
        db.execute("update warehouse_version set version = %s", (VERSION + 1,))
    fresh.seed(["/c"])
    run = run_cli(["sync", "--db", url], env)
    assert run.returncode == EXIT_CONFIG and "newer goatcounter-exports" in run.stderr
    assert len(synced_paths(url)) == 2
    with sqlite3.connect(fresh.db_path) as gc:
        assert gc.execute("select count(*) from exports").fetchone() == (1,)  # refused before any export was made


def test_every_question_has_the_same_answer_from_either_copy(
    fresh: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    """pageview-stats over the PostgreSQL copy and over the SQLite copy of the same site: equal, row for row."""
    url, sqlite_copy = cluster.new_database(), tmp_path / "copy.sqlite3"
    fresh.seed([f"/q-{i % 9}" for i in range(120)] + ["/about"] * 7)
    env = service_env(fresh, tmp_path / "state")
    for target in (url, str(sqlite_copy)):
        run = run_cli(["sync", "--db", target], env)
        assert run.returncode == 0 and "Synced 127 pageviews" in run.stderr, run.stderr
    with sqlite3.connect(sqlite_copy) as db:
        columns = [
            row[1] for row in db.execute("pragma table_info(pageviews)") if row[1] not in ("seq", "export_id")
        ]  # two exports
        in_sqlite = db.execute(f"select {', '.join(columns)} from pageviews order by seq").fetchall()  # noqa: S608
    in_postgres = query(url, f"select {', '.join(columns)} from pageviews order by seq")  # noqa: S608
    assert len(in_postgres) == 127 and [tuple(row) for row in in_postgres] == in_sqlite  # every value, as typed
    today = date.today().isoformat()
    for question in PAGEVIEW_GROUPS | {"total": ""}:
        for filters in ({}, {"since": today, "until": today, "path_prefix": "/q-", "limit": 3}):
            from_sqlite = ask(sqlite_copy, fresh.url, question, **filters)  # type: ignore[arg-type]
            from_postgres = ask(url, fresh.url, question, **filters)  # type: ignore[arg-type]
            assert from_postgres == from_sqlite, (question, filters)
            assert from_postgres.total in (127, 120)


def test_the_agent_asks_the_postgresql_copy(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.new_database()
    with ReplayGoatCounter(FIXTURES) as replay:
        env = replay_env(replay, tmp_path, url)
        assert run_cli(["sync"], env).returncode == 0
        assert run_cli(["sync"], env).returncode == 0

        async def scenario(mcp_url: str) -> Any:
            async with Client(mcp_url) as client:
                return await client.call_tool("pageview-stats", {"question": "top_paths", "limit": 100})

        with running(SERVE, env) as service:
            top = asyncio.run(scenario(service.mcp))
    assert not top.is_error, top.content[0].text
    dashboard = {hit["path"]: hit["count"] for hit in TRUTH["phase2"]["stats_hits"]["hits"]}
    answer = top.structured_content
    assert answer["source"] == "aggregates" and answer["unit"] == "visitors"
    totals = {row["value"]: row["visitors"] for row in answer["rows"]}
    assert {path: totals.get(path, 0) for path in dashboard} == dashboard


def test_sync_all_fills_one_postgresql_database_with_every_site_scoped(cluster: Cluster, tmp_path: Path) -> None:
    url = cluster.new_database()
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", extra_vhosts=["localhost"]) as gc:
        one, two = gc.sites
        gc.seed(["/one-a", "/one-b", "/one-a"], site=one)
        gc.seed(["/two"] * 4, site=two)
        config = tmp_path / "sites.toml"
        config.write_text(
            f'[[sites]]\nname = "one"\nurl = "{one.url}"\nkey_env = "KEY_ONE"\n\n'
            f'[[sites]]\nname = "two"\nurl = "{two.url}"\nkey_env = "KEY_TWO"\n'
        )
        env = service_env(gc, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=url, KEY_ONE=one.export_key)
        env["KEY_TWO"] = two.export_key
        run = run_cli(["--config", str(config), "sync", "--all"], env)
        gc.seed(["/two-later"], site=two)
        again = run_cli(["--config", str(config), "sync", "--all"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "one: Synced 3 pageviews" in run.stdout and "two: Synced 4 pageviews" in run.stdout
    assert again.returncode == 0 and "two: Synced 1 pageviews" in again.stdout, again.stdout + again.stderr
    per_site = dict(query(url, "select site, count(*) from pageviews group by site"))
    assert per_site == {one.url: 3, two.url: 5}


def test_browse_says_it_serves_a_sqlite_copy_only(tmp_path: Path) -> None:
    env = clean_env(
        GOATCOUNTER_EXPORTS_STATE_DIR=str(tmp_path), GOATCOUNTER_EXPORTS_DB="postgresql://u:pw@127.0.0.1/db"
    )
    run = run_cli(["browse", "--no-open"], env)
    assert run.returncode == EXIT_CONFIG and "serves a SQLite copy" in run.stderr and "pw@" not in run.stderr
