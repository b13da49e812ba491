"""`browse`: the synced database in Datasette, looked at in a real headless Chromium, and its canned queries.

A real GoatCounter v2.7.0 gets pageviews on several days; `sync` copies them; `run_browse` serves the copy;
Chromium (Debian's `chromium`, installed by scripts/install-browser) loads the top-paths page and the daily
chart, offline (every host name but 127.0.0.1 fails to resolve), and what it shows must be GoatCounter's own
numbers: the table's counts per path, the chart's bars per day (in the DOM, and painted: the bars' pixels in a
screenshot). In process, every canned query answers what `pageview-stats` answers, over individual pageviews
and over the statistics of a JSON sync (recordings of GoatCounter main), and the database is never written.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from goatcounter_exports import browse
from goatcounter_exports.errors import ConfigError, InputError
from goatcounter_exports.goatcounter.stats import QUESTIONS, ask
from goatcounter_exports.goatcounter.warehouse import SqliteWarehouse
from goatcounter_exports.testbed import LocalGoatCounter

from .conftest import service_env
from .replay import EXPORT_KEY, FIXTURES, ReplayGoatCounter
from .support import ROOT, clean_env, goatcounter_binary, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WINDOW = (900, 560)  # the chart is near the top: the screenshot stays small enough to decode in Python
# (days ago, path, pageviews): 4 days with pageviews and 3 without between them.
SEEDS = [
    (6, "/", 3),
    (6, "/blog", 1),
    (4, "/", 4),
    (4, "/blog", 2),
    (4, "/about", 1),
    (2, "/blog", 2),
    (0, "/", 2),
    (0, "/about", 1),
    (0, "/docs/install", 1),
]


@dataclass(frozen=True)
class Synced:
    database: Path
    site: str
    per_path: Counter[str]  # GoatCounter's own pageviews per path
    per_day: Counter[str]  # ... and per UTC day


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Synced:
    folder = tmp_path_factory.mktemp("browse")
    database = folder / "pageviews.sqlite3"
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)  # never in the future
    hits = [
        {"path": path, "created_at": (base - timedelta(days=ago)).isoformat().replace("+00:00", "Z")}
        for ago, path, count in SEEDS
        for _ in range(count)
    ]
    with LocalGoatCounter(goatcounter_binary(), folder / "gc") as goatcounter:
        goatcounter.seed(hits)
        run = run_cli(["sync"], service_env(goatcounter, folder / "state", GOATCOUNTER_EXPORTS_DB=str(database)))
        assert run.returncode == 0, run.stderr
        with sqlite3.connect(goatcounter.db_path) as db:
            query = (
                "select p.path, substr(h.created_at, 1, 10) from hits h join paths p using (path_id) "
                "where h.site_id = ?"
            )
            rows = db.execute(query, (goatcounter.site.site_id,)).fetchall()
        site = goatcounter.url
    per_path, per_day = Counter(path for path, _ in rows), Counter(day for _, day in rows)
    # GoatCounter stored exactly what was sent: the test's numbers are its numbers.
    assert per_path == Counter({path: n for path, n in Counter(h["path"] for h in hits).items()})
    assert per_day == Counter((base - timedelta(days=ago)).date().isoformat() for ago, _, n in SEEDS for _ in range(n))
    return Synced(database, site, per_path, per_day)


# -- the server and the browser ---------------------------------------------------------------------------

SERVE = "import sys, pathlib; from goatcounter_exports.browse import run_browse; " + (
    "run_browse(pathlib.Path(sys.argv[1]), host='127.0.0.1', port=0, open_browser=False)"
)


@contextmanager
def browse_server(database: Path) -> Iterator[str]:
    """`run_browse` in a process of its own on a free port; yields its URL (…/goatcounter) and stops it."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(database)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=clean_env(),
    )
    lines: list[str] = []
    announced = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Browse "):
                announced.set()
        announced.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert announced.wait(30), "browse did not start"
        match = re.match(r"Browse\s+(http://127\.0\.0\.1:\d+/goatcounter)\s", lines[-1] if lines else "")
        assert match, "\n".join(lines)
        yield match.group(1)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        reader.join(5)
        assert process.stdout is not None
        process.stdout.close()
    assert process.returncode == 0, "\n".join(lines)  # SIGTERM stops it cleanly
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


def chromium(url: str, profile: Path, *args: str) -> str:
    """Headless Chromium on `url` with `args` (--dump-dom, --screenshot=...); its stdout. Offline but for
    127.0.0.1, so a page that needed anything from the internet would show it. Every process it started is
    ended, by its process group."""
    assert Path(CHROMIUM).exists(), "run scripts/install-browser"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        *args,
        url,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=90)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its renderer and helpers, if any outlived it
        process.wait(5)
    assert process.returncode == 0, err[-3000:]
    return out


LOADED = {"script", "link", "img", "iframe", "object", "embed", "source", "video", "audio", "image", "use"}


class Page(HTMLParser):
    """What a test reads of a page: table cells by column, the chart's bars and labels, external references."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.cells: dict[str, list[str]] = {}
        self.bars: list[dict[str, str]] = []
        self.labels: dict[str, list[str]] = {"value": [], "day": []}
        self.external: list[str] = []
        self.h1 = ""
        self._into: list[str] | None = None
        self._h1 = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        css = attributes.get("class", "")
        for name in ("src", "href"):  # what the page loads (a link to elsewhere is no load)
            if tag in LOADED and re.match(r"(https?:)?//(?!127\.0\.0\.1[:/])", attributes.get(name, "")):
                self.external.append(f"<{tag} {name}={attributes[name]}>")
        if tag == "td" and css.startswith("col-"):
            self._into = self.cells.setdefault(css.removeprefix("col-"), [])
            self._into.append("")
        elif tag == "rect" and css == "bar":
            self.bars.append(attributes)
        elif tag == "text" and css in self.labels:
            self._into = self.labels[css]
            self._into.append("")
        elif tag == "h1":
            self._h1 = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "text"):
            self._into = None
        self._h1 = self._h1 and tag != "h1"

    def handle_data(self, data: str) -> None:
        if self._into is not None:
            self._into[-1] += data.strip()
        if self._h1:
            self.h1 += data.strip()


def png_rows(data: bytes) -> tuple[int, list[bytes]]:
    """(bytes per pixel, rows of pixels) of an 8-bit RGB or RGBA, non-interlaced PNG: what Chromium writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, compressed, header = 8, b"", (0, 0, 0, 0, 0, 0, 0)
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            compressed += chunk
        position += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    size = 3 if color == 2 else 4
    stride = width * size
    raw = zlib.decompress(compressed)
    rows: list[bytes] = []
    above = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - size] if i >= size else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + above[i]) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + above[i]) // 2) & 0xFF
            elif kind == 4:
                upper_left = above[i - size] if i >= size else 0
                estimate = left + above[i] - upper_left
                a, b, c = abs(estimate - left), abs(estimate - above[i]), abs(estimate - upper_left)
                line[i] = (line[i] + (left if a <= b and a <= c else above[i] if b <= c else upper_left)) & 0xFF
        rows.append(bytes(line))
        above = line
    return size, rows


def painted_bars(png: bytes, color: str) -> list[tuple[int, int]]:
    """The bars of `color` in a screenshot, left to right: (x where it starts, height in pixels)."""
    size, rows = png_rows(png)
    rgb = bytes.fromhex(color.removeprefix("#"))
    per_column: Counter[int] = Counter()
    for row in rows:
        for x in range(len(row) // size):
            if row[x * size : x * size + 3] == rgb:
                per_column[x] += 1
    bars: list[tuple[int, int]] = []
    previous = -2
    for x in sorted(per_column):
        if x != previous + 1:
            bars.append((x, per_column[x]))
        previous = x
    return bars


def all_days(per_day: Counter[str]) -> dict[str, int]:
    """Every day from the first to the last with pageviews, with its count (0 on a day without)."""
    first, last = date.fromisoformat(min(per_day)), date.fromisoformat(max(per_day))
    days = ((first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1))
    return {day: per_day.get(day, 0) for day in days}


# -- in a real browser -------------------------------------------------------------------------------------


def test_chromium_shows_the_top_paths_and_the_daily_chart_with_goatcounters_numbers(
    synced: Synced, tmp_path: Path
) -> None:
    before = synced.database.read_bytes()
    with browse_server(synced.database) as url:
        top = Page(chromium(f"{url}/pageviews_top_paths", tmp_path / "profile", "--dump-dom"))
        shot = tmp_path / "daily.png"
        daily = Page(chromium(f"{url}/pageviews_daily", tmp_path / "profile", "--dump-dom", f"--screenshot={shot}"))
        home = Page(chromium(url, tmp_path / "profile", "--dump-dom"))
        missing = 0
        try:  # a mistyped URL: a 404 page, and no traceback printed by the server
            urllib.request.urlopen(f"{url}/no_such_query", timeout=30).close()
        except urllib.error.HTTPError as error:
            missing = error.code
            error.close()
    assert missing == 404

    # The top paths, as GoatCounter counted them, most viewed first.
    assert top.h1 == "Top paths: pageviews"
    shown = dict(zip(top.cells["path"], map(int, top.cells["pageviews"]), strict=True))
    assert shown == synced.per_path
    assert list(shown.values()) == sorted(shown.values(), reverse=True)

    # The chart: one bar per day from the first to the last, the days without pageviews at 0, each labelled.
    expected = all_days(synced.per_day)
    assert [(bar["data-day"], int(bar["data-value"])) for bar in daily.bars] == list(expected.items())
    assert daily.labels["value"] == [str(n) for n in expected.values()]
    assert daily.labels["day"] == [day[5:] for day in expected]
    assert dict(zip(daily.cells["day"], map(int, daily.cells["pageviews"]), strict=True)) == synced.per_day

    # Painted: as many bars of the chart's colour as days with pageviews, in order, each as tall as its count.
    painted = painted_bars(shot.read_bytes(), browse.BAR_COLOR)
    plot = browse.CHART_HEIGHT - browse.PLOT_TOP - browse.PLOT_BOTTOM
    counts = [n for n in expected.values() if n]
    assert [height for _, height in painted] == [round(plot * n / max(counts)) for n in counts]

    # Nothing came from, or points to, anywhere but this server; the database was not written.
    assert top.external == daily.external == [], top.external + daily.external
    assert home.h1 == "GoatCounter: the synced copy" and home.external == []
    assert synced.database.read_bytes() == before


# -- in process: the queries, both sources, the sites, read-only ------------------------------------------


def get(datasette: Any, path: str) -> Any:
    async def fetch() -> Any:
        return await datasette.client.get(path)

    return asyncio.run(fetch())


@contextmanager
def served(database: Path) -> Iterator[Any]:
    datasette = browse.build_datasette(database)
    try:
        yield datasette
    finally:
        browse.close(datasette)


def answers(datasette: Any, query: str, **params: str) -> list[list[Any]]:
    arguments = "&".join(f"{k}={v}" for k, v in params.items())
    response = get(datasette, f"/goatcounter/{query}.json?_shape=arrays&{arguments}")
    assert response.status_code == 200, response.text
    rows: list[list[Any]] = response.json()["rows"]
    return rows


def assert_same_as_pageview_stats(database: Path, site: str, unit: str, since: str, until: str) -> int:
    """Each canned query of `unit` answers what pageview-stats answers; returns how many were compared."""
    source = "pageviews" if unit == "pageviews" else "aggregates"
    compared = 0
    with served(database) as datasette:
        for question in QUESTIONS:
            try:
                expected = ask(database, site, question, since=since, until=until, limit=100, source=source)
            except InputError:  # a question this source cannot answer (languages over pageviews): no such query
                assert get(datasette, f"/goatcounter/{unit}_{question}.json").status_code == 404
                continue
            want = [[expected.total]] if question == "total" else [[r["value"], r[unit]] for r in expected.rows]
            assert answers(datasette, f"{unit}_{question}", since=since, until=until) == want, question
            assert answers(datasette, f"{unit}_{question}", since=since, until=until, site=site) == want, question
            compared += 1
    return compared


def test_every_pageviews_query_answers_what_pageview_stats_answers(synced: Synced) -> None:
    days = sorted(synced.per_day)
    assert assert_same_as_pageview_stats(synced.database, synced.site, "pageviews", days[0], days[-1]) == 10
    # A period: since and until are both included; a day that is not a date finds nothing.
    with served(synced.database) as datasette:
        assert answers(datasette, "pageviews_total", since=days[1], until=days[1]) == [[synced.per_day[days[1]]]]
        assert answers(datasette, "pageviews_total", since=days[1]) == [[sum(synced.per_day.values()) - 4]]
        assert answers(datasette, "pageviews_total", until="yesterday-ish") == [[0]]
        assert answers(datasette, "sites") == [[synced.site, "individual pageviews", 17, "pageviews", ANY_TIME]]


class _AnyTime:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", other) is not None


ANY_TIME = _AnyTime()


def test_every_visitors_query_answers_what_pageview_stats_answers_from_a_json_sync(tmp_path: Path) -> None:
    database = tmp_path / "copy.sqlite3"
    with ReplayGoatCounter(FIXTURES) as replay:
        env = clean_env(
            GOATCOUNTER_URL=replay.url,
            GOATCOUNTER_API_KEY=EXPORT_KEY,
            GOATCOUNTER_EXPORTS_STATE_DIR=str(tmp_path / "state"),
            GOATCOUNTER_EXPORTS_DB=str(database),
        )
        for _ in range(2):
            run = run_cli(["sync"], env)
            assert run.returncode == 0, run.stderr
        site = replay.url
    assert assert_same_as_pageview_stats(database, site, "visitors", "2026-11-01", "2026-11-30") == 12
    with served(database) as datasette:
        # Only the statistics are there: no pageviews queries, and the pageviews table is kept out of the way.
        assert get(datasette, "/goatcounter/pageviews_top_paths.json").status_code == 404
        page = get(datasette, "/goatcounter/visitors_daily")
        tables = get(datasette, "/goatcounter.json").json()["tables"]
    chart = Page(page.text)
    daily = ask(database, site, "daily", limit=100, source="aggregates").rows
    assert {b["data-day"]: int(b["data-value"]) for b in chart.bars if b["data-value"] != "0"} == {
        r["value"]: r["visitors"] for r in daily
    }
    shown = {t["name"] for t in tables if not t["hidden"]}
    assert "hit_stats" in shown and "paths" in shown and not {"pageviews", "sync_state"} & shown


def test_a_database_of_several_sites_needs_the_site_named(synced: Synced, tmp_path: Path) -> None:
    database = tmp_path / "two.sqlite3"
    shutil.copy(synced.database, database)
    with sqlite3.connect(database) as db:  # the columns as the CSV sync made them (names map to themselves)
        columns = [row[1] for row in db.execute("pragma table_info(pageviews)")][3:]
    values = {"path": "/x", "bot": "0", "date": f"{max(synced.per_day)}T12:00:00Z"}
    warehouse = SqliteWarehouse(database)
    try:
        with warehouse.transaction():
            warehouse.prepare_pageviews(columns)
            added = warehouse.insert_pageviews(
                "https://other.example", 1, columns, [[values.get(c, "") for c in columns]]
            )
            warehouse.finish_pageviews()
            warehouse.set_pageview_cursor("https://other.example", 1, 1, added)
    finally:
        warehouse.close()
    with served(database) as datasette:
        assert answers(datasette, "pageviews_top_paths") == []  # which site? none is guessed
        assert answers(datasette, "pageviews_top_paths", site="https://other.example") == [["/x", 1]]
        assert dict(map(tuple, answers(datasette, "pageviews_top_paths", site=synced.site))) == synced.per_path


def test_it_is_read_only(synced: Synced) -> None:
    before = synced.database.read_bytes()
    with served(synced.database) as datasette:
        connection = datasette.databases[browse.DATABASE_NAME].connect()
        with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only|query_only"):
            connection.execute("delete from sync_state")
        with pytest.raises(ConfigError):
            datasette.databases[browse.DATABASE_NAME].connect(write=True)
        refused = get(datasette, "/goatcounter.json?sql=delete+from+sync_state")
    assert refused.status_code == 400
    assert synced.database.read_bytes() == before


@pytest.mark.fast
def test_the_chart_draws_missing_days_as_zero_and_escapes_what_it_writes() -> None:
    svg = browse.bar_chart([("2026-11-01", 2), ("2026-11-04", 4)], unit="pageviews")
    chart = Page(svg)
    assert [(b["data-day"], b["data-value"]) for b in chart.bars] == [
        ("2026-11-01", "2"),
        ("2026-11-02", "0"),
        ("2026-11-03", "0"),
        ("2026-11-04", "4"),
    ]
    assert [b["height"] for b in chart.bars] == ["102", "0", "0", "204"]
    assert browse.bar_chart([], unit="pageviews") == ""
    assert "<b>" not in browse.bar_chart([("<b>", 1)], unit="pageviews")
    many = Page(browse.bar_chart([(f"2026-{m:02}-01", m) for m in range(1, 13)], unit="visitors"))
    assert len(many.bars) == 335 and many.labels["day"] == ["2026-01-01", "2026-12-01"]


def test_without_datasette_or_a_database_it_says_what_to_do(
    synced: Synced, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="run `goatcounter-exports sync` first"):
        browse.build_datasette(tmp_path / "missing.sqlite3")
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).close()
    with pytest.raises(ConfigError, match="nothing is synced"):
        browse.build_datasette(empty)
    monkeypatch.setitem(sys.modules, "datasette.app", None)
    with pytest.raises(ConfigError, match=r"pip install 'goatcounter-exports\[browse\]'"):
        browse.run_browse(synced.database, host="127.0.0.1", port=0, open_browser=False)
