"""The speed work's correctness, and bench/speed.py's smoke form (it proves the benchmark still runs; it times nothing).

In process, against bench's static upstream (the standard library's server: no nginx needed): the CSV sync's
pipeline (records bound as they are, the index built after a large load, one transaction whatever fails), the
`pageviews` view over compact rows and the conversion of a database of an earlier version, the page index that
serves any page of a CSV export from one verified download, and the chunked inflater's bounds.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from goatcounter_exports.app import App, build_app
from goatcounter_exports.errors import IntegrityError
from goatcounter_exports.goatcounter import exportfile, stats, warehouse
from goatcounter_exports.goatcounter.exportfile import (
    Inflater,
    LocalExport,
    PageIndex,
    RecordSplitter,
    _evict,
    gunzip,
    parse_csv,
)
from goatcounter_exports.goatcounter.exports import Export
from goatcounter_exports.goatcounter.sync import sync
from goatcounter_exports.goatcounter.warehouse import SqliteWarehouse
from goatcounter_exports.settings import Settings
from goatcounter_exports.spec import load_default
from mcp import Client

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from _data import EXPORT_ID, HEADER, Dataset, build  # noqa: E402 - bench/ is not a package
from _upstream import PythonUpstream  # noqa: E402

ROWS = 3000
KEY = "speed-smoke-key"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return build(tmp_path_factory.mktemp("data"), ROWS, seed=3, big=False)


@pytest.fixture(scope="module")
def records(dataset: Dataset) -> list[list[str]]:
    with gzip.open(dataset.gzip_path, "rt", encoding="utf-8", newline="") as text:
        return list(csv.reader(text))[1:]


@pytest.fixture
def upstream(dataset: Dataset) -> Iterator[PythonUpstream]:
    with PythonUpstream(dataset) as server:
        yield server


def make_app(url: str, state: Path) -> App:
    return build_app(load_default(), Settings(site_url=url, secrets={"GOATCOUNTER_API_KEY": KEY}, state_dir=state))


async def run_sync(app: App, database: Path) -> Any:
    house = SqliteWarehouse(database)
    try:
        async with app:
            return await sync(app.export_job(), house, export_format="csv", wait_seconds=10)
    finally:
        house.close()


# --------------------------------------------------------------------------------------------------
# The CSV sync


@pytest.mark.parametrize("rebuild", [False, True], ids=["index-kept", "index-rebuilt"])
def test_sync_copies_every_record_exactly(
    upstream: PythonUpstream, records: list[list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebuild: bool
) -> None:
    monkeypatch.setattr(warehouse, "REBUILD_INDEX_ROWS", 100 if rebuild else 10**9)
    database = tmp_path / "views.sqlite3"
    result = asyncio.run(run_sync(make_app(upstream.url, tmp_path / "state"), database))
    assert (result.rows_added, result.total, result.cursor_after) == (ROWS, ROWS, str(ROWS))
    with sqlite3.connect(database) as db:
        names = [row[1] for row in db.execute("pragma table_info(pageviews)")]
        types = {row[1]: row[2] for row in db.execute("pragma table_info(pageviews)")}
        stored = db.execute(f"select {', '.join(names[3:])} from pageviews order by seq").fetchall()  # noqa: S608
        sites = {row[0] for row in db.execute("select site from pageviews")}
        indexes = {row[1] for row in db.execute("pragma index_list(pageview_rows)")}
        plan = " ".join(
            str(r)
            for r in db.execute(
                "explain query plan select count(*) from pageviews where site = ? and date >= '2026-01-01'",
                (upstream.url,),
            )
        )
    assert names[:4] == ["seq", "site", "export_id", "path"] and names[-1] == "date" and len(names) == 3 + 14
    assert types["first_visit"] == "INTEGER" and types["site"] == "TEXT" and types["date"] == "TEXT"
    assert sites == {upstream.url}
    assert "pageview_rows_site_date" in indexes and "pageview_rows_site_date" in plan
    integers = {2, 7, 12}  # Event, Bot, FirstVisit
    want = [tuple(int(v) if i in integers else v for i, v in enumerate(r)) for r in records]
    assert stored == want  # every value, in hit order, line breaks inside quoted titles included
    assert any("\n" in row[1] for row in stored)
    top = stats.ask(database, upstream.url, "top_paths", limit=3)
    assert top.total == sum(1 for r in records if r[7] == "0")  # bots left out
    assert top.rows[0]["pageviews"] >= top.rows[1]["pageviews"]


def test_a_file_that_does_not_match_its_hash_leaves_the_database_as_it_was(
    dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warehouse, "REBUILD_INDEX_ROWS", 100)  # the index was dropped: it must come back too
    forged = tmp_path / "forged"
    shutil.copytree(dataset.folder, forged)
    document = json.loads((forged / f"export-{EXPORT_ID}.json").read_text())
    document["hash"] = "sha256-" + "0" * 64
    (forged / f"export-{EXPORT_ID}.json").write_text(json.dumps(document))
    database = tmp_path / "views.sqlite3"
    with PythonUpstream(Dataset(forged, ROWS, 3)) as server, pytest.raises(IntegrityError, match="does not match"):
        asyncio.run(run_sync(make_app(server.url, tmp_path / "state"), database))
    with sqlite3.connect(database) as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master")}
        assert db.execute("select count(*) from sync_state").fetchone() == (0,)
    assert "pageview_rows" not in tables and "pageviews" not in tables  # the whole load was rolled back


def test_a_record_with_the_wrong_number_of_fields_is_refused(tmp_path: Path) -> None:
    house = SqliteWarehouse(tmp_path / "views.sqlite3")
    columns = HEADER[1:]
    with house.transaction():
        house.prepare_pageviews(["Path", *columns])
        assert house.insert_pageviews("https://a", 1, ["Path", *columns], [["/x", *[""] * 13]]) == 1
    with pytest.raises(IntegrityError, match="14 fields"), house.transaction():
        house.insert_pageviews("https://a", 1, ["Path", *columns], [["/y", *[""] * 12]])
    row = house.db.execute("select event, bot, first_visit from pageviews").fetchall()
    assert row == [(0, 0, 0)] and house.pageview_count("https://a") == 1
    with house.transaction():
        house.insert_pageviews("https://a", 1, ["Path", *columns], [["/z", "", "true", *[""] * 4, "7", *[""] * 6]])
    assert house.db.execute("select event, bot from pageviews where path = '/z'").fetchone() == (1, 7)
    house.close()


OLD_SCHEMA = """
create table sync_state (site text primary key, last_hit_id integer not null, last_export_id integer,
    rows integer not null default 0, synced_at text not null default (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')));
create table pageviews (seq integer primary key, site text not null, export_id integer not null, path text,
    title text, event integer, user_agent text, browser text, system text, session text, bot integer, referrer text,
    referrer_scheme text, screen_size text, location text, first_visit integer, date text);
create index pageviews_site_date on pageviews (site, date);
create index pageviews_site_path on pageviews (site, path);
"""


def test_a_database_of_the_earlier_layout_is_converted_on_its_next_sync(tmp_path: Path) -> None:
    database = tmp_path / "views.sqlite3"
    with sqlite3.connect(database) as db:
        db.executescript(OLD_SCHEMA)
        for seq, (site, path) in enumerate([("https://a", "/1"), ("https://b", "/2"), ("https://a", "/3")], 10):
            db.execute(
                "insert into pageviews values (?, ?, 5, ?, 't', 0, '', 'B', 'S', 's', 0, '', 'o', '', '', 1, ?)",
                (seq, site, path, f"2026-01-0{seq - 9}T00:00:00Z"),
            )
        db.execute("insert into sync_state (site, last_hit_id, rows) values ('https://a', 3, 2)")
    house = SqliteWarehouse(database)
    columns = HEADER[1:]
    with house.transaction():
        house.prepare_pageviews(["Path", *columns])
        house.insert_pageviews("https://a", 6, ["Path", *columns], [["/4", *[""] * 12, "2026-02-01T00:00:00Z"]])
    rows = house.db.execute("select seq, site, export_id, path from pageviews order by seq").fetchall()
    assert rows == [
        (10, "https://a", 5, "/1"),
        (11, "https://b", 5, "/2"),
        (12, "https://a", 5, "/3"),
        (13, "https://a", 6, "/4"),
    ]
    assert house.db.execute("select type from sqlite_master where name = 'pageviews'").fetchone() == ("view",)
    assert house.pageview_count("https://a") == 3
    house.close()


# --------------------------------------------------------------------------------------------------
# Pages of a CSV export


def test_any_page_comes_from_one_verified_download(
    upstream: PythonUpstream, records: list[list[str]], tmp_path: Path
) -> None:
    rng = random.Random(4)  # noqa: S311 - offsets, not secrets
    wanted = [
        (0, 100),
        (ROWS - 3, 100),
        (ROWS, 10),
        *[(rng.randrange(ROWS), rng.choice((1, 7, 1000))) for _ in range(8)],
    ]

    async def scenario() -> list[dict[str, Any]]:
        app = make_app(upstream.url, tmp_path / "state")
        pages = []
        async with app, Client(app.mcp_server()) as client:
            for offset, limit in wanted:
                result = await client.call_tool("download-export", {"id": EXPORT_ID, "offset": offset, "limit": limit})
                assert not result.is_error, result.content
                text = result.content[1].resource.text  # type: ignore[union-attr]
                pages.append({**(result.structured_content or {}), "rows": list(csv.reader(io.StringIO(text)))})
        return pages

    pages = asyncio.run(scenario())
    for (offset, limit), page in zip(wanted, pages, strict=True):
        assert page["total_rows"] == ROWS and page["offset"] == offset and page["hash_ok"] is True
        assert page["rows"][0] == HEADER[1:] or page["rows"][0][0] == "Path"
        assert page["rows"][1:] == records[offset : offset + limit]
        assert page["has_more"] == (offset + limit < ROWS)
    assert upstream.requests(f"/export/{EXPORT_ID}/download") == 1
    cache = list((tmp_path / "state").rglob("*.csv.gz*"))
    assert sorted(p.name.rsplit(".gz", 1)[1] for p in cache) == ["", ".pages", ".pages.json"]


def test_the_page_index_is_exact_on_awkward_csv(tmp_path: Path) -> None:
    rng = random.Random(5)  # noqa: S311 - test data
    cells = ["a", "b,c", 'q"x', "l\nm", "", "r\r\ns", "\u2028z", "é", "\rx"]  # as GoatCounter quotes them
    rows = [[rng.choice(cells) for _ in range(3)] for _ in range(2500)]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["2Path", "Title", "Event"])
    for row in rows:  # quoted as Go's encoding/csv quotes (csv.writer would leave a lone \r bare), or all quoted
        if any("\r" in cell for cell in row) or rng.random() < 0.2:
            csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL).writerow(row)
        else:
            csv.writer(buffer, lineterminator="\n").writerow(row)
    data = gzip.compress(buffer.getvalue().encode())
    path = tmp_path / "1-x.csv.gz"
    path.write_bytes(data)
    export = Export.parse({"id": 1, "hash": "sha256-x", "finished_at": "2026-01-01T00:00:00Z"})
    index = PageIndex(LocalExport(export, path))
    index.build()
    again = PageIndex(LocalExport(export, path))
    assert again.load() and again.total == len(rows) and again.columns == ["Path", "Title", "Event"]
    for offset, limit in [
        (0, 1),
        (0, 2500),
        (511, 2),
        (512, 512),
        (2499, 5),
        (2500, 1),
        *[(rng.randrange(2500), rng.randrange(1, 1200)) for _ in range(30)],
    ]:
        assert again.rows(offset, limit) == rows[offset : offset + limit]
    other = Export.parse({"id": 1, "hash": "sha256-y", "finished_at": "2026-01-01T00:00:00Z"})
    assert not PageIndex(LocalExport(other, path)).load()  # an index of another file is not taken


def test_a_copy_and_its_page_index_are_evicted_together(tmp_path: Path) -> None:
    old, new = tmp_path / "1-a.csv.gz", tmp_path / "2-b.csv.gz"
    for path, size in ((old, 600), (new, 600)):
        path.write_bytes(b"x" * size)
        Path(f"{path}.pages").write_bytes(b"y" * 300)
        Path(f"{path}.pages.json").write_bytes(b"{}")
    import os

    os.utime(old, (1, 1))
    for suffix in (".pages", ".pages.json"):
        os.utime(f"{old}{suffix}", (1, 1))
    _evict(tmp_path, 1500, keep=new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2-b.csv.gz", "2-b.csv.gz.pages", "2-b.csv.gz.pages.json"]


# --------------------------------------------------------------------------------------------------
# Inflating and cutting records


def test_records_cut_across_pieces_are_the_csv_modules_records() -> None:
    rng = random.Random(6)  # noqa: S311 - test data
    cells = ["a", "b,c", 'q"x', "l\nm", "", "r\r\ns", "\u2028z"]
    for _ in range(200):
        rows = [[rng.choice(cells) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(0, 30))]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        text = buffer.getvalue()
        if rng.random() < 0.3:
            text = text.rstrip("\n")
        splitter, got, at = RecordSplitter(), [], 0
        while at < len(text):
            step = rng.randint(1, 12)
            got += splitter.push(text[at : at + step])
            at += step
        assert got + splitter.finish() == parse_csv(text)


def test_gunzip_is_bounded_reads_several_members_and_refuses_damage() -> None:
    plain = bytes(random.Random(7).randbytes(20_000))  # noqa: S311 - test data
    plain += b"a" * 3_000_000  # compresses about 150 times

    async def inflate(data: bytes, size: int) -> bytes:
        async def chunks() -> Any:
            for at in range(0, len(data), size):
                yield data[at : at + size]

        out = []
        async for piece in gunzip(chunks(), 1000):
            assert len(piece) <= 1000
            out.append(piece)
        return b"".join(out)

    packed = gzip.compress(plain)
    assert asyncio.run(inflate(packed, 7)) == plain
    assert asyncio.run(inflate(packed + packed, 65536)) == plain + plain
    for damaged in (packed[:-9], b"", b"not gzip"):
        with pytest.raises(IntegrityError):
            asyncio.run(inflate(damaged, 100))
    inflater = Inflater(piece=1000, budget=5000)
    assert sum(map(len, inflater.step(packed))) == 5000 and inflater.backlog  # the rest waits for the next step
    assert zlib.decompress(packed, 31)[:5000] == plain[:5000]
    assert exportfile.PIECE >= 64 * 1024


# --------------------------------------------------------------------------------------------------
# The benchmark's smoke form


def test_the_benchmark_runs_in_its_smoke_form() -> None:
    """Every row, small and short, each checked by the benchmark itself; a baseline whose tool is missing
    (nginx, wrk, sqlite3, curl, fastmcp's environment) is skipped with a note, never the row."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "speed.py"), "--smoke"],  # its data in /tmp, where nginx's workers may read
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for row in ("`sync`", "`export -o", "REST download", "MCP `get-export-info`", "MCP `download-export` pages"):
        line = next(line for line in table.splitlines() if row in line)
        assert "| -, - RSS" not in line and "| -; **-**" not in line, line  # ours was measured
