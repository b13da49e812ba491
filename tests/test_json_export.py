"""A goatcounter.com-like site (GoatCounter main, Individual pageviews off): the JSON export, the exact aggregate
sync, agents answering from the statistics, and the empty CSV explained.

CI cannot build main, so these replay recordings of a real main build (tests/fixtures/main, made by
scripts/record-main-fixtures) over a real socket; the same scenario runs live against main in
test_main_branch.py. Synthetic ZIPs appear only for faults main cannot produce.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import sqlite3
import subprocess
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from goatcounter_exports.errors import IntegrityError
from goatcounter_exports.goatcounter.exportfile import LocalExport
from goatcounter_exports.goatcounter.exports import Export
from mcp import Client

from .replay import EXPORT_KEY, FIXTURES, SITEREAD_KEY, ReplayGoatCounter
from .support import ROOT, SERVE, clean_env, poll_export, run_cli, running

TRUTH = json.loads((FIXTURES / "truth.json").read_text())
EXIT_USAGE, EXIT_INTEGRITY = 2, 6


@pytest.fixture
def replay() -> Iterator[ReplayGoatCounter]:
    with ReplayGoatCounter(FIXTURES) as server:
        yield server


def env_for(replay: ReplayGoatCounter, tmp_path: Path, key: str = EXPORT_KEY, **extra: str) -> dict[str, str]:
    return clean_env(
        GOATCOUNTER_URL=replay.url,
        GOATCOUNTER_API_KEY=key,
        GOATCOUNTER_EXPORTS_STATE_DIR=str(tmp_path / "state"),
        GOATCOUNTER_EXPORTS_DB=str(tmp_path / "copy.sqlite3"),
        **extra,
    )


def posts(replay: ReplayGoatCounter) -> list[Any]:
    return [r.body for r in replay.requests if r.method == "POST"]


def copy_visitors(database: Path) -> dict[str, dict[str, int]]:
    """The synced copy's visitors per UTC day and path, as GoatCounter's hit_counts has them."""
    found: dict[str, dict[str, int]] = defaultdict(dict)
    query = (
        "select substr(s.hour, 1, 10), p.path, sum(s.count) from hit_stats s "
        "join paths p on p.site = s.site and p.id = s.path_id group by 1, 2"
    )
    with sqlite3.connect(database) as db:
        for day, path, count in db.execute(query):
            found[day][path] = count
    return dict(found)


def test_export_format_json_writes_the_verified_zip_atomically(replay: ReplayGoatCounter, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    run = run_cli(["export", "--format", "json", "-o", str(out / "site.zip")], env_for(replay, tmp_path))
    assert run.returncode == 0, run.stderr
    data = (out / "site.zip").read_bytes()
    assert "sha256-" + hashlib.sha256(data).hexdigest() == TRUTH["phase1"]["export_hash"]
    assert "info.json" in " ".join(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert "SHA-256 verified" in run.stderr
    assert [p.name for p in out.iterdir()] == ["site.zip"]
    assert posts(replay) == [{"format": "json"}] and replay.unmatched == []


def test_a_zip_that_does_not_match_its_hash_is_refused_and_nothing_is_written(
    replay: ReplayGoatCounter, tmp_path: Path
) -> None:
    replay.override_download(TRUTH["phase1"]["export_id"], b"PK\x03\x04 forged")
    run = run_cli(["export", "--format", "json", "-o", str(tmp_path / "site.zip")], env_for(replay, tmp_path))
    assert run.returncode == EXIT_INTEGRITY, run.stderr
    assert "does not match" in run.stderr and not (tmp_path / "site.zip").exists()


def test_rest_serves_the_zip_as_zip_and_refuses_csv_with_406(replay: ReplayGoatCounter, tmp_path: Path) -> None:
    with running(SERVE, env_for(replay, tmp_path)) as service, httpx.Client(timeout=30) as client:
        created = client.post(f"{service.rest}/v1/export", json={"format": "json"})
        assert created.status_code == 202, created.text
        export_id = created.json()["id"]
        poll_export(client, service.rest, export_id)
        download = client.get(f"{service.rest}/v1/export/{export_id}/download")
        as_csv = client.get(f"{service.rest}/v1/export/{export_id}/download", headers={"Accept": "text/csv"})
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    assert download.content[:2] == b"PK"
    assert "sha256-" + hashlib.sha256(download.content).hexdigest() == TRUTH["phase1"]["export_hash"]
    assert as_csv.status_code == 406 and "JSON export" in as_csv.json()["error"]


def test_mcp_pages_through_a_table_of_the_json_export_never_its_bytes(
    replay: ReplayGoatCounter, tmp_path: Path
) -> None:
    export_id = TRUTH["phase1"]["export_id"]

    async def scenario(url: str) -> list[Any]:
        async with Client(url) as client:
            first = await client.call_tool("download-export", {"id": export_id, "table": "paths", "limit": 3})
            while first.structured_content["ready"] is False:  # as recorded: running at the first look
                first = await client.call_tool("download-export", {"id": export_id, "table": "paths", "limit": 3})
            rest = await client.call_tool("download-export", {"id": export_id, "table": "paths", "offset": 3})
            stats = await client.call_tool("download-export", {"id": export_id})  # hit_stats by default
            return [first, rest, stats]

    with running(SERVE, env_for(replay, tmp_path)) as service:
        first, rest, stats = asyncio.run(scenario(service.mcp))
    downloads = [r for r in replay.requests if r.path.endswith("/download")]
    assert not first.is_error, first.content[0].text
    page = first.structured_content
    assert page["table"] == "paths" and page["columns"] == ["id", "path", "title", "event"]
    assert page["rows_returned"] == 3 and page["has_more"] is True and page["next_offset"] == 3
    assert page["hash_ok"] is True and page["format_version"] == "1.0"
    assert set(page["tables"]) >= {"paths", "refs", "hit_stats", "browser_stats", "size_stats"}
    assert rest.structured_content["rows_returned"] == page["tables"]["paths"] - 3
    hit_stats = stats.structured_content
    assert hit_stats["table"] == "hit_stats" and hit_stats["total_rows"] == page["tables"]["hit_stats"]
    assert all(c.type == "text" or c.resource.mime_type == "text/csv" for r in (first, rest, stats) for c in r.content)
    assert len(downloads) == 1  # one verified local copy served every page


def test_sync_json_is_exact_per_day_and_path_after_each_incremental_run(
    replay: ReplayGoatCounter, tmp_path: Path
) -> None:
    env = env_for(replay, tmp_path)
    first = run_cli(["sync"], env)  # --format auto: JSON, since this GoatCounter has it
    assert first.returncode == 0, first.stderr
    assert copy_visitors(tmp_path / "copy.sqlite3") == TRUTH["phase1"]["visitors"]
    second = run_cli(["sync"], env)
    assert second.returncode == 0, second.stderr
    assert copy_visitors(tmp_path / "copy.sqlite3") == TRUTH["phase2"]["visitors"]
    assert posts(replay) == [{"format": "json"}, {"format": "json", "start_from_day": f"{TRUTH['D']}T00:00:00Z"}]
    assert f"{TRUTH['phase2']['total_visitors']} visitors in all" in second.stderr


@pytest.mark.parametrize("crash_at", ["download", "before-commit", "after-commit"])
def test_sync_json_killed_anywhere_converges_to_goatcounters_numbers(
    replay: ReplayGoatCounter, tmp_path: Path, crash_at: str
) -> None:
    env = env_for(replay, tmp_path)
    assert run_cli(["sync"], env).returncode == 0
    killed = run_cli(["sync"], {**env, "GOATCOUNTER_EXPORTS_CRASH_AT": crash_at})
    assert killed.returncode == -9
    expected = TRUTH["phase2" if crash_at == "after-commit" else "phase1"]["visitors"]
    assert copy_visitors(tmp_path / "copy.sqlite3") == expected
    again = run_cli(["sync"], env)
    assert again.returncode == 0, again.stderr
    assert copy_visitors(tmp_path / "copy.sqlite3") == TRUTH["phase2"]["visitors"]


def test_agent_top_pages_last_week_are_goatcounters_own_numbers(replay: ReplayGoatCounter, tmp_path: Path) -> None:
    env = env_for(replay, tmp_path)
    assert run_cli(["sync"], env).returncode == 0
    assert run_cli(["sync"], env).returncode == 0
    since, until = TRUTH["phase2"]["stats_hits_request"].split("start=")[1][:10], TRUTH["D"]

    async def scenario(url: str) -> list[Any]:
        async with Client(url) as client:
            return [
                await client.call_tool("pageview-stats", {"question": "top_paths", "since": since, "until": until}),
                await client.call_tool("pageview-stats", {"question": "daily", "since": since, "until": until}),
                await client.call_tool("pageview-stats", {"question": "top_browsers"}),
            ]

    with running(SERVE, env) as service:
        top, daily, browsers = asyncio.run(scenario(service.mcp))
    assert not top.is_error, top.content[0].text
    dashboard = {hit["path"]: hit["count"] for hit in TRUTH["phase2"]["stats_hits"]["hits"]}
    answer = top.structured_content
    assert answer["source"] == "aggregates" and answer["unit"] == "visitors"
    assert {row["value"]: row["visitors"] for row in answer["rows"]} == dashboard
    per_day = {s["day"]: 0 for s in TRUTH["phase2"]["stats_hits"]["hits"][0]["stats"]}
    for hit in TRUTH["phase2"]["stats_hits"]["hits"]:
        for stat in hit["stats"]:
            per_day[stat["day"]] += stat["daily"]
    assert {r["value"]: r["visitors"] for r in daily.structured_content["rows"]} == {
        d: n for d, n in per_day.items() if n
    }
    assert not browsers.is_error and browsers.structured_content["rows"]


def test_an_empty_csv_export_is_explained_everywhere(replay: ReplayGoatCounter, tmp_path: Path) -> None:
    env = env_for(replay, tmp_path)
    run = run_cli(["export", "--format", "csv", "-o", str(tmp_path / "views.csv")], env)
    assert run.returncode == 0, run.stderr
    assert "Individual pageviews" in run.stderr and "--format json" in run.stderr
    csv_export = TRUTH["csv"]["export_ids"][0]

    async def scenario(url: str) -> Any:
        async with Client(url) as client:
            return await client.call_tool("get-export-info", {"id": csv_export})

    with running(SERVE, env) as service, httpx.Client(timeout=30) as client:
        info = client.get(f"{service.rest}/v1/export/{csv_export}")
        download = client.get(f"{service.rest}/v1/export/{csv_export}/download")
        tool = asyncio.run(scenario(service.mcp))
    assert "Individual pageviews" in info.headers["x-export-note"]
    assert "Individual pageviews" in download.headers["x-export-note"]
    assert "Individual pageviews" in tool.structured_content["note"] and "Individual pageviews" in tool.content[0].text


def test_a_csv_export_the_key_can_tell_would_be_empty_is_refused_before_the_budget_is_spent(
    replay: ReplayGoatCounter, tmp_path: Path
) -> None:
    env = env_for(replay, tmp_path, key=SITEREAD_KEY)
    exported = run_cli(["export", "--format", "csv", "-o", str(tmp_path / "views.csv")], env)
    synced = run_cli(["sync", "--format", "csv"], env)
    for run in (exported, synced):
        assert run.returncode == EXIT_USAGE, run.stderr
        assert "Individual pageviews" in run.stderr and "still spend the hourly export budget" in run.stderr
    assert posts(replay) == []
    assert not (tmp_path / "views.csv").exists() and not (tmp_path / "copy.sqlite3").exists()


def synthetic_zip(path: Path, *, version: str = "1.0", drop: str | None = None) -> LocalExport:
    """A ZIP laid out as main lays it out, for faults main cannot produce."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("goatcounter-export-x/info.json", json.dumps({"export_version": version}))
        for table in ("paths", "refs", "browsers", "systems", "locations", "languages", "hit_stats",
                      "browser_stats", "system_stats", "location_stats", "size_stats", "language_stats"):  # fmt: skip
            if table != drop:
                archive.writestr(f"goatcounter-export-x/{table}.jsonl", "")
    return LocalExport(Export({"id": 9, "format": "json", "finished_at": "2026-11-26T00:00:00Z"}), path)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"version": "2.0"}, "unsupported JSON export_version '2.0'"),
        ({"drop": "hit_stats"}, "lacks the table(s) hit_stats"),
        ({"truncate": True}, "not a valid ZIP"),
    ],
)
def test_a_json_export_this_tool_cannot_read_whole_is_refused(
    tmp_path: Path, fault: dict[str, Any], words: str
) -> None:
    local = synthetic_zip(tmp_path / "x.zip", version=fault.get("version", "1.0"), drop=fault.get("drop"))
    if fault.get("truncate"):
        local.path.write_bytes(local.path.read_bytes()[:-40])
    assert synthetic_zip(tmp_path / "ok.zip").info()["export_version"] == "1.0"
    with pytest.raises(IntegrityError, match=words.replace("(", r"\(").replace(")", r"\)")):
        local.info()


def test_readme_statistics_query_answers_like_goatcounters_dashboard(replay: ReplayGoatCounter, tmp_path: Path) -> None:
    """The README's sqlite3 question of a JSON-synced copy, run against one. The recording is of a fixed week, so
    `date('now', '-7 days')` is read as the first day of the week GoatCounter's dashboard was asked about."""
    readme = (ROOT / "README.md").read_text()
    lines = [
        line
        for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
        for line in block.replace("\\\n", "").splitlines()
    ]
    (query,) = [line for line in lines if line.startswith("sqlite3 ") and "hit_stats" in line]
    home = tmp_path / "home"
    env = {**env_for(replay, tmp_path), "HOME": str(home)}
    del env["GOATCOUNTER_EXPORTS_DB"], env["GOATCOUNTER_EXPORTS_STATE_DIR"]  # the README's default location
    assert run_cli(["sync"], env).returncode == 0
    assert run_cli(["sync"], env).returncode == 0
    week_start = TRUTH["phase2"]["stats_hits_request"].split("start=")[1][:10]
    query = query.replace("https://mysite.goatcounter.com", replay.url).replace(
        "date('now', '-7 days')", f"'{week_start}'"
    )
    answer = subprocess.run(query, shell=True, env=env, capture_output=True, text=True)  # noqa: S602
    assert answer.returncode == 0, answer.stderr
    dashboard = sorted(
        ((h["path"], h["count"]) for h in TRUTH["phase2"]["stats_hits"]["hits"]), key=lambda x: (-x[1], x[0])
    )
    found = [(path, int(count)) for path, count in (line.split("|") for line in answer.stdout.splitlines())]
    assert sorted(found, key=lambda x: (-x[1], x[0])) == dashboard
