"""The export job and the incremental sync, through the real CLI, against real GoatCounter instances."""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from goatcounter_exports.app import build_app
from goatcounter_exports.errors import ExportError
from goatcounter_exports.goatcounter.exportfile import RecordStream, split_header
from goatcounter_exports.goatcounter.warehouse import LAYOUT
from goatcounter_exports.settings import Settings
from goatcounter_exports.spec import load_default
from goatcounter_exports.testbed import LocalGoatCounter
from mcp import Client

from .conftest import service_env
from .support import SERVE, goatcounter_binary, run_cli, running

EXIT_RATE_LIMITED, EXIT_TIMEOUT, EXIT_INTEGRITY = 3, 5, 6


def goatcounter_paths(instance: LocalGoatCounter) -> list[str]:
    """GoatCounter's own data: every stored pageview's path, in hit order."""
    with sqlite3.connect(instance.db_path) as db:
        query = "select p.path from hits h join paths p using (path_id) where h.site_id = ? order by h.hit_id"
        return [row[0] for row in db.execute(query, (instance.site.site_id,))]


def synced_paths(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("select path from pageviews order by seq")]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[LocalGoatCounter]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc") as instance:
        yield instance


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[LocalGoatCounter]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", ratelimit=None) as instance:
        instance.seed([f"/limited-{i}" for i in range(12)])
        yield instance


def test_export_command_writes_the_verified_csv_atomically(fresh: LocalGoatCounter, tmp_path: Path) -> None:
    paths = [f"/doc-{i % 5}" for i in range(23)]
    fresh.seed(paths)
    out = tmp_path / "out"
    out.mkdir()
    env = service_env(fresh, tmp_path / "state")
    run = run_cli(["export", "-o", str(out / "views.csv")], env)
    assert run.returncode == 0, run.stderr
    assert "SHA-256 verified" in run.stderr and fresh.export_key not in run.stderr + run.stdout
    rows = list(csv.reader(io.StringIO((out / "views.csv").read_text())))
    assert rows[0][0] == "2Path" and Counter(r[0] for r in rows[1:]) == Counter(paths)
    gz = run_cli(["export", "-o", str(out / "views.csv.gz"), "--gzip", "--since-hit-id", "0"], env)
    assert gz.returncode == 0, gz.stderr
    assert gzip.decompress((out / "views.csv.gz").read_bytes()).decode().count("\n") == len(paths) + 1
    assert sorted(p.name for p in out.iterdir()) == ["views.csv", "views.csv.gz"]  # no temporary files left


def test_export_since_hit_id_is_exclusive(fresh: LocalGoatCounter, tmp_path: Path) -> None:
    fresh.seed(["/one", "/two", "/three"])
    first = fresh.max_hit_id() - 2  # the id of "/one"
    run = run_cli(["export", "-o", str(tmp_path / "x.csv"), "--since-hit-id", str(first)], service_env(fresh, tmp_path))
    assert run.returncode == 0, run.stderr
    rows = list(csv.reader(io.StringIO((tmp_path / "x.csv").read_text())))
    assert [r[0] for r in rows[1:]] == ["/two", "/three"]


def test_a_file_whose_hash_does_not_match_is_refused_and_not_left_behind(
    limited: LocalGoatCounter, tmp_path: Path
) -> None:
    env = service_env(limited, tmp_path / "state")
    first = run_cli(["export", "-o", str(tmp_path / "first.csv")], env)
    assert first.returncode == 0, first.stderr
    # Tamper with GoatCounter's stored file; its recorded hash stays. The next run, inside the hour,
    # reuses that export (the budget is spent) and must refuse what it downloads.
    (stored,) = list(limited.export_dir.glob("*.csv.gz"))
    stored.write_bytes(gzip.compress(b"2Path,Title\n/forged,x\n"))
    out = tmp_path / "out"
    out.mkdir()
    second = run_cli(["export", "-o", str(out / "second.csv")], env)
    assert second.returncode == EXIT_INTEGRITY, second.stderr
    assert "Reusing export" in second.stderr and "does not match" in second.stderr
    assert list(out.iterdir()) == []


def test_export_exit_code_when_rate_limited(limited: LocalGoatCounter, tmp_path: Path) -> None:
    assert limited.request("POST", "/api/v0/export", key=limited.export_key, body={}).status == 202
    run = run_cli(["export", "-o", str(tmp_path / "x.csv")], service_env(limited, tmp_path / "state"))
    assert run.returncode == EXIT_RATE_LIMITED
    assert "rate limited" in run.stderr and "seconds" in run.stderr
    assert not (tmp_path / "x.csv").exists()


def test_export_exit_code_on_timeout(tmp_path: Path) -> None:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "big") as big:
        big.seed([f"/bulk-{i}" for i in range(5200)])  # two batches: GoatCounter pauses 0.5 s between them
        run = run_cli(["export", "-o", str(tmp_path / "x.csv"), "--timeout", "0.2"], service_env(big, tmp_path / "s"))
    assert run.returncode == EXIT_TIMEOUT, run.stderr
    assert "did not finish within" in run.stderr
    assert not (tmp_path / "x.csv").exists()


def test_sync_copies_exactly_and_increments_with_nothing_lost(fresh: LocalGoatCounter, tmp_path: Path) -> None:
    database = tmp_path / "views.sqlite3"
    env = service_env(fresh, tmp_path / "state")
    fresh.seed([f"/n-{i % 7}" for i in range(40)])
    first = run_cli(["sync", "--db", str(database)], env)
    assert first.returncode == 0, first.stderr
    assert synced_paths(database) == goatcounter_paths(fresh)
    fresh.seed([f"/m-{i % 3}" for i in range(25)])
    second = run_cli(["sync", "--db", str(database)], env)
    assert second.returncode == 0, second.stderr
    assert "Synced 25 pageviews" in second.stderr
    assert synced_paths(database) == goatcounter_paths(fresh)
    assert len(synced_paths(database)) == 65
    third = run_cli(["sync", "--db", str(database)], env)
    assert "Synced 0 pageviews" in third.stderr and len(synced_paths(database)) == 65
    with sqlite3.connect(database) as db:
        (cursor,) = db.execute("select last_hit_id from sync_state").fetchone()
        types = {row[1]: row[2] for row in db.execute("pragma table_info(pageviews)")}
    assert cursor == fresh.max_hit_id()
    assert types["first_visit"] == "INTEGER" and types["referrer_scheme"] == "TEXT" and types["date"] == "TEXT"


@pytest.mark.parametrize("crash_at", ["download", "before-commit", "after-commit"])
def test_sync_killed_at_any_point_converges_on_the_next_run(
    fresh: LocalGoatCounter, tmp_path: Path, crash_at: str
) -> None:
    database = tmp_path / "views.sqlite3"
    env = service_env(fresh, tmp_path / "state")
    fresh.seed([f"/before-{i}" for i in range(10)])
    assert run_cli(["sync", "--db", str(database)], env).returncode == 0
    fresh.seed([f"/after-{i}" for i in range(15)])
    killed = run_cli(["sync", "--db", str(database)], {**env, "GOATCOUNTER_EXPORTS_CRASH_AT": crash_at})
    assert killed.returncode == -9  # SIGKILL, as from `kill -9` or an out-of-memory kill
    resumed = run_cli(["sync", "--db", str(database)], env)
    assert resumed.returncode == 0, resumed.stderr
    assert synced_paths(database) == goatcounter_paths(fresh)
    assert len(synced_paths(database)) == 25


def test_unknown_csv_versions_are_refused() -> None:
    assert split_header(["2Path", "Title"]) == ("2", ["Path", "Title"])
    for header in (["3Path", "Title"], ["Path", "Title"], [""]):
        with pytest.raises(ExportError, match=r"version|header"):
            split_header(header)


def test_records_spanning_batches_and_lines_are_kept_whole() -> None:
    stream = RecordStream()
    first = list(stream.push(["2Path,Title\n", '/a,"two\n']))
    rest = list(stream.push(['lines"\n', "/b,plain\n"], final=True))
    assert first == [["2Path", "Title"]]
    assert rest == [["/a", "two\nlines"], ["/b", "plain"]]


def test_agent_exports_with_progress_and_asks_questions_over_the_synced_copy(
    fresh: LocalGoatCounter, tmp_path: Path
) -> None:
    paths = ["/home"] * 9 + ["/blog"] * 5 + ["/about"] * 2
    fresh.seed(paths)
    env = service_env(fresh, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=str(tmp_path / "views.sqlite3"))
    assert run_cli(["sync"], env).returncode == 0
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def scenario() -> tuple[object, object]:
        async with Client(service.mcp) as client:
            exported = await client.call_tool("export-pageviews", {"preview_rows": 3}, progress_callback=on_progress)
            top = await client.call_tool("pageview-stats", {"question": "top_paths", "limit": 2})
            return exported, top

    with running(SERVE, env) as service:
        exported, top = asyncio.run(scenario())
    assert not exported.is_error, exported.content[0].text  # type: ignore[attr-defined]
    summary = exported.structured_content  # type: ignore[attr-defined]
    assert summary["total_rows"] == len(paths) and summary["hash_ok"] is True
    assert summary["top_paths"][0] == {"path": "/home", "pageviews": 9}
    resource = exported.content[1].resource  # type: ignore[attr-defined]
    assert resource.mime_type == "text/csv" and resource.text.count("\n") == 4  # header + 3 preview rows
    assert progress and any("created" in (m or "") for _, _, m in progress)
    assert top.structured_content["rows"] == [  # type: ignore[attr-defined]
        {"value": "/home", "pageviews": 9},
        {"value": "/blog", "pageviews": 5},
    ]
    assert top.structured_content["total_pageviews"] == len(paths)  # type: ignore[attr-defined]


def test_stats_tool_refuses_anything_but_its_questions(fresh: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(fresh, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=str(tmp_path / "none.sqlite3"))

    async def scenario() -> list[object]:
        async with Client(service.mcp) as client:
            return [
                await client.call_tool("pageview-stats", {"question": "select * from pageviews"}),
                await client.call_tool("pageview-stats", {"question": "top_paths", "since": "yesterday"}),
                await client.call_tool("pageview-stats", {"question": "top_paths", "limit": 10_000}),
                await client.call_tool("pageview-stats", {"question": "total"}),
            ]

    with running(SERVE, env) as service:
        results = asyncio.run(scenario())
    assert all(r.is_error for r in results)  # type: ignore[attr-defined]
    assert "sync" in results[3].content[0].text  # type: ignore[attr-defined]


def test_hash_helper_matches_goatcounters_format() -> None:
    from goatcounter_exports.goatcounter.exportfile import hash_matches

    digest = hashlib.sha256(b"x").hexdigest()
    assert hash_matches("sha256-" + digest, digest) is True
    assert hash_matches("sha256-" + "0" * 64, digest) is False
    assert hash_matches(None, digest) is None


def test_export_exit_code_on_upstream_error(fresh: LocalGoatCounter, tmp_path: Path) -> None:
    run = run_cli(["export", "-o", str(tmp_path / "x.csv")], service_env(fresh, tmp_path, key="not-a-key"))
    assert run.returncode == 4
    assert "401" in run.stderr and "not-a-key" not in run.stderr
    assert not (tmp_path / "x.csv").exists()


def test_two_sites_share_one_database_and_never_mix(tmp_path: Path) -> None:
    """Two sites synced into the default database: each site's questions count its own pageviews only."""
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", extra_vhosts=["localhost"]) as gc:
        one, two = gc.sites
        gc.seed(["/shared"] * 3 + ["/one"], site=one)
        gc.seed(["/shared"] * 5, site=two)
        database = tmp_path / "views.sqlite3"
        for site in (one, two):
            env = service_env(gc, tmp_path / site.vhost, GOATCOUNTER_URL=site.url, GOATCOUNTER_EXPORTS_DB=str(database))
            env["GOATCOUNTER_API_KEY"] = site.export_key
            assert run_cli(["sync"], env).returncode == 0

        async def ask(site_url: str, key: str) -> dict[str, object]:
            settings = Settings(site_url=site_url, secrets={"GOATCOUNTER_API_KEY": key}, state_dir=tmp_path / "s")
            app = build_app(load_default(), replace(settings, database_path=database))
            async with app, Client(app.mcp_server()) as client:
                result = await client.call_tool("pageview-stats", {"question": "top_paths"})
            assert not result.is_error, result.content
            return dict(result.structured_content or {})

        first, second = asyncio.run(ask(one.url, one.export_key)), asyncio.run(ask(two.url, two.export_key))
    assert first["rows"] == [{"value": "/shared", "pageviews": 3}, {"value": "/one", "pageviews": 1}]
    assert second["rows"] == [{"value": "/shared", "pageviews": 5}]
    assert first["total_pageviews"] == 4 and second["total_pageviews"] == 5


def test_sync_all_puts_every_site_in_one_database_scoped_and_a_failing_site_fails_alone(tmp_path: Path) -> None:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", extra_vhosts=["localhost"]) as gc:
        one, two = gc.sites
        gc.seed(["/one-a", "/one-b", "/one-a"], site=one)
        gc.seed(["/two"] * 4, site=two)
        config = tmp_path / "sites.toml"
        config.write_text(
            f'[[sites]]\nname = "one"\nurl = "{one.url}"\nkey_env = "KEY_ONE"\n\n'
            f'[[sites]]\nname = "two"\nurl = "{two.url}"\nkey_env = "KEY_TWO"\n\n'
            f'[[sites]]\nname = "broken"\nurl = "{one.url}"\nkey_env = "KEY_BROKEN"\n'
        )
        database = tmp_path / "all.sqlite3"
        env = service_env(gc, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=str(database))
        env.update(KEY_ONE=one.export_key, KEY_TWO=two.export_key, KEY_BROKEN="not-a-key-of-any-site")
        run = run_cli(["--config", str(config), "sync", "--all"], env)
        again = run_cli(["--config", str(config), "sync", "--all"], env)
    assert run.returncode == 4, run.stdout + run.stderr  # the one failure's exit code
    lines = {line.split(":", 1)[0]: line for line in (run.stdout + run.stderr).splitlines()}
    assert set(lines) == {"one", "two", "broken"}
    assert "FAILED" in lines["broken"] and "401" in lines["broken"]
    assert "Synced 3 pageviews" in lines["one"] and "Synced 4 pageviews" in lines["two"]
    assert "Synced 0 pageviews" in again.stdout
    with sqlite3.connect(database) as db:
        per_site = dict(db.execute("select site, count(*) from pageviews group by site"))
    assert per_site == {one.url: 3, two.url: 4}
    assert "not-a-key-of-any-site" not in run.stdout + run.stderr


def test_a_sqlite_copy_of_a_newer_layout_is_refused_and_left_alone(fresh: LocalGoatCounter, tmp_path: Path) -> None:
    database = tmp_path / "views.sqlite3"
    env = service_env(fresh, tmp_path / "state")
    fresh.seed(["/a", "/b"])
    assert run_cli(["sync", "--db", str(database)], env).returncode == 0
    with sqlite3.connect(database) as db:
        assert db.execute("pragma user_version").fetchone() == (LAYOUT,)
        db.execute(f"pragma user_version = {LAYOUT + 1}")
    fresh.seed(["/c"])
    run = run_cli(["sync", "--db", str(database)], env)
    assert run.returncode == 2 and "newer goatcounter-exports" in run.stderr, run.stderr
    assert synced_paths(database) == ["/a", "/b"]
    with sqlite3.connect(fresh.db_path) as gc:
        assert gc.execute("select count(*) from exports").fetchone() == (1,)  # refused before any export was made
