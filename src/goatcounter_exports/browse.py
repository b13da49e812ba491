"""`goatcounter-exports browse`: the synced database in Datasette, read-only, with its questions ready to run.

    run_browse(Path("pageviews.sqlite3"), host="127.0.0.1", port=8001, open_browser=True)

Datasette (the optional `browse` extra) serves the database as `/goatcounter`:
- read-only: every connection is opened `mode=ro` with `query_only` on, so nothing can write to it, while a
  `sync` may run beside it (its data shows on the next page load: the file is not opened immutable);
- with metadata: a title and description for every table and column, and canned queries for the questions
  `pageview-stats` answers (goatcounter/stats.py: the same expressions, so the same numbers), one set per
  source the database holds: `pageviews_<question>` over the individual pageviews of a CSV sync (bots left
  out) and `visitors_<question>` over the statistics of a JSON sync (counts are visitors, as GoatCounter's
  dashboard has them). Each takes `site` (empty: the one site synced, when there is one), and `since`/`until`
  (YYYY-MM-DD, inclusive, UTC; empty: no bound). The sources are those present at start: after a first sync of
  the other kind, start browse again;
- with a chart: the `*_daily` queries draw an inline SVG bar chart of their rows (`bar_chart` below; the
  template `browse_assets/templates/query-goatcounter.html` places it), rendered on the server: nothing is
  fetched from the internet (Datasette's own CSS and JavaScript come from the package), so it works offline.

Datasette is imported only here and only when browsing: without the extra, `run_browse` says how to get it.
Datasette 0.65.5 imports and serves without a warning (Python 3.11, under pytest's filterwarnings=error), so
no warning is filtered here.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import sqlite3
import threading
import webbrowser
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import rich

from .errors import ConfigError
from .goatcounter.stats import AGGREGATE_GROUPS, ORDERED_BY_TIME, PAGEVIEW_GROUPS
from .server import Listener, bind, run_listeners

DATABASE_NAME = "goatcounter"  # the route: /goatcounter, /goatcounter/pageviews_top_paths, ...
ASSETS = Path(__file__).parent / "browse_assets"
INSTALL_HINT = "pip install 'goatcounter-exports[browse]'"
SETTINGS = {
    "sql_time_limit_ms": 10_000,  # a year of pageviews grouped by path takes more than Datasette's 1 s
    "allow_download": False,  # the live file (and its WAL) is no consistent copy; `sqlite3 DB ".backup F"` makes one
    "max_returned_rows": 1000,
}

# question -> the name of its label column, and words for people.
QUESTIONS: dict[str, tuple[str, str]] = {
    "top_paths": ("path", "Top paths"),
    "top_titles": ("title", "Top page titles"),
    "top_referrers": ("referrer", "Top referrers"),
    "top_browsers": ("browser", "Top browsers"),
    "top_systems": ("system", "Top operating systems"),
    "top_locations": ("location", "Top locations"),
    "top_screen_sizes": ("screen_size", "Top screen sizes"),
    "top_languages": ("language", "Top languages"),
    "top_campaigns": ("campaign", "Top campaigns"),
    "daily": ("day", "Per day"),
    "hourly": ("hour", "Per hour"),
    "total": ("", "Total"),
}
PARAMS = ["site", "since", "until"]
PERIOD_HELP = (
    "Parameters: site (the site's URL; empty when the database holds one site), since and until "
    "(YYYY-MM-DD, both included, UTC; empty for no bound)."
)
# The site a query reads: the one asked for, else the only one of that source (none when there are several).
PAGEVIEW_SITE = "coalesce(nullif(:site, ''), (select min(site) from sync_state where rows > 0 having count(*) = 1))"
STATS_SITE = "coalesce(nullif(:site, ''), (select min(site) from stats_sync having count(*) = 1))"


def _period(column: str) -> str:
    # date(x) is NULL for anything that is not a date: a typo finds nothing rather than something wrong.
    return f"(:since = '' or {column} >= date(:since)) and (:until = '' or {column} < date(:until, '+1 day'))"


def pageview_query(question: str) -> str:
    """The canned query over individual pageviews: stats.py's grouping, with the site and period parameters."""
    where = f"site = {PAGEVIEW_SITE}\n  and {_period('date')}\n  and coalesce(bot, 0) = 0"
    if question == "total":
        return f"select count(*) as pageviews\nfrom pageviews\nwhere {where}"
    label = QUESTIONS[question][0]
    order = "1" if question in ORDERED_BY_TIME else "pageviews desc, 1"
    return (
        f"select {PAGEVIEW_GROUPS[question]} as {label}, count(*) as pageviews\n"
        f"from pageviews\nwhere {where}\ngroup by 1\norder by {order}"
    )


def visitor_query(question: str) -> str:
    """The canned query over the statistics: stats.py's table, label and joins, with the site and period."""
    table, expression, joins = AGGREGATE_GROUPS.get(question, AGGREGATE_GROUPS["daily"])
    time = "s.hour" if table == "hit_stats" else "s.day"
    source = f"from {table} s\njoin paths p on p.site = s.site and p.id = s.path_id" + (f"\n{joins}" if joins else "")
    where = f"where s.site = {STATS_SITE}\n  and {_period(time)}"
    if question == "total":
        return f"select coalesce(sum(s.count), 0) as visitors\n{source}\n{where}"
    label = QUESTIONS[question][0]
    order = "1" if question in ORDERED_BY_TIME else "visitors desc, 1"
    return f"select {expression} as {label}, sum(s.count) as visitors\n{source}\n{where}\ngroup by 1\norder by {order}"


SITES_QUERY = """select site, 'individual pageviews' as kept, rows as total, 'pageviews' as unit, synced_at
from sync_state
union all
select site, 'statistics', (select coalesce(sum(count), 0) from hit_stats h where h.site = c.site), 'visitors',
  synced_at
from stats_sync c
order by site, kept"""


def canned_queries(*, pageviews: bool, statistics: bool) -> dict[str, dict[str, Any]]:
    """Datasette's `queries` for the sources present: `pageviews_<question>` and `visitors_<question>`."""
    queries: dict[str, dict[str, Any]] = {
        "sites": {
            "title": "Sites",
            "description": "Each site synced into this database, what is kept of it, and when it was last synced.",
            "sql": SITES_QUERY,
        }
    }
    if pageviews:
        for question in [*PAGEVIEW_GROUPS, "total"]:
            queries[f"pageviews_{question}"] = {
                "title": f"{QUESTIONS[question][1]}: pageviews",
                "description": "Individual pageviews (a CSV sync), bots left out. " + PERIOD_HELP,
                "sql": pageview_query(question),
                "params": PARAMS,
                "hide_sql": True,
            }
    if statistics:
        for question in [*AGGREGATE_GROUPS, "total"]:
            queries[f"visitors_{question}"] = {
                "title": f"{QUESTIONS[question][1]}: visitors",
                "description": "GoatCounter's statistics (a JSON sync): visitors, as its dashboard counts them. "
                + PERIOD_HELP,
                "sql": visitor_query(question),
                "params": PARAMS,
                "hide_sql": True,
            }
    return queries


COLUMNS = {
    "site": "The site's URL: one database holds many sites.",
    "path_id": "The path (table paths).",
    "count": "Visitors: one per visitor, path and hour (GoatCounter's dashboard numbers; bots never counted).",
    "day": "UTC day, YYYY-MM-DD.",
}
PAGEVIEW_COLUMNS = {
    "seq": "Hit order (GoatCounter's CSV has no hit id).",
    "site": COLUMNS["site"],
    "export_id": "The export the row came from.",
    "path": "The page's path, or the event's name.",
    "title": "The page's title.",
    "event": "1 for an event, 0 for a pageview.",
    "user_agent": "The User-Agent header (empty on GoatCounter v2.7.0 and later).",
    "browser": "Browser and version.",
    "system": "Operating system and version.",
    "session": "GoatCounter's session: pageviews of one visit share it.",
    "bot": "0 for a person; GoatCounter's bot kind otherwise (the canned queries leave bots out).",
    "referrer": "The referrer (empty for direct visits).",
    "referrer_scheme": "h: an HTTP referrer, g: generated (e.g. an app), c: a campaign, o: other.",
    "screen_size": "Width, height and scale of the screen.",
    "location": "ISO 3166 country (and region) code.",
    "first_visit": "1 for the first pageview of a visit.",
    "date": "When, in UTC (RFC 3339).",
}
STATS_DESCRIPTION = "Visitors per {what} (a JSON sync); each run replaces the days it exported again."
TABLES: dict[str, dict[str, Any]] = {
    "pageviews": {
        "title": "Pageviews",
        "description": "One row per pageview, from CSV exports (sites with the Individual pageviews setting on).",
        "sort_desc": "seq",
        "columns": PAGEVIEW_COLUMNS,
    },
    "pageview_rows": {
        "title": "Pageviews, as stored",
        "description": "The rows behind the pageviews view, each with its site's number (pageview_sites).",
    },
    "pageview_sites": {"title": "Sites of the pageviews", "description": "site_id -> site."},
    "sync_state": {
        "title": "CSV sync cursors",
        "description": "Per site: the last hit copied (the next CSV export starts after it) and the rows added.",
    },
    "stats_sync": {
        "title": "JSON sync cursors",
        "description": "Per site: the day the next JSON export starts from (its statistics are replaced then).",
    },
    "hit_stats": {
        "title": "Visitors per hour, path and referrer",
        "description": STATS_DESCRIPTION.format(what="hour, path and referrer"),
        "sort_desc": "hour",
        "columns": {**COLUMNS, "hour": "UTC hour (RFC 3339).", "ref_id": "The referrer (table refs)."},
    },
    "browser_stats": {
        "title": "Visitors per day, path and browser",
        "description": STATS_DESCRIPTION.format(what="day, path and browser"),
        "sort_desc": "day",
        "columns": {**COLUMNS, "browser_id": "The browser (table browsers)."},
    },
    "system_stats": {
        "title": "Visitors per day, path and system",
        "description": STATS_DESCRIPTION.format(what="day, path and operating system"),
        "sort_desc": "day",
        "columns": {**COLUMNS, "system_id": "The operating system (table systems)."},
    },
    "location_stats": {
        "title": "Visitors per day, path and location",
        "description": STATS_DESCRIPTION.format(what="day, path and location"),
        "sort_desc": "day",
        "columns": {**COLUMNS, "location": "ISO 3166 country, and region after a dash (table locations)."},
    },
    "size_stats": {
        "title": "Visitors per day, path and screen width",
        "description": STATS_DESCRIPTION.format(what="day, path and screen width"),
        "sort_desc": "day",
        "columns": {**COLUMNS, "width": "Screen width in CSS pixels."},
    },
    "language_stats": {
        "title": "Visitors per day, path and language",
        "description": STATS_DESCRIPTION.format(what="day, path and language"),
        "sort_desc": "day",
        "columns": {**COLUMNS, "language": "ISO 639-3 code (table languages)."},
    },
    "campaign_stats": {
        "title": "Visitors per day, path and campaign",
        "description": STATS_DESCRIPTION.format(what="day, path and campaign")
        + " Only in exports that carry campaigns.",
        "sort_desc": "day",
        "columns": {**COLUMNS, "campaign_id": "The campaign (table campaigns).", "ref": "The campaign's referrer."},
    },
    "paths": {"title": "Paths", "description": "Paths and events the statistics refer to (path_id)."},
    "refs": {"title": "Referrers", "description": "Referrers the statistics refer to (ref_id)."},
    "browsers": {"title": "Browsers", "description": "Browsers and versions (browser_id)."},
    "systems": {"title": "Operating systems", "description": "Operating systems and versions (system_id)."},
    "locations": {"title": "Locations", "description": "Countries and regions with their names."},
    "languages": {"title": "Languages", "description": "ISO 639-3 codes and names."},
    "campaigns": {"title": "Campaigns", "description": "Campaign names (campaign_id)."},
}
CSV_TABLES = {"pageviews", "sync_state"}
ALWAYS_HIDDEN = {"pageview_rows", "pageview_sites"}  # the storage behind the pageviews view


def _sources(database: Path) -> tuple[list[str], list[str]]:
    """The sites with individual pageviews, and those with statistics: what the database holds now."""
    try:
        with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=10) as db:
            # pageviews is a view over pageview_rows (a table in databases of earlier versions)
            names = {row[0] for row in db.execute("select name from sqlite_master where type in ('table', 'view')")}
            pageviews = []
            if {"pageviews", "sync_state"} <= names:
                pageviews = [r[0] for r in db.execute("select site from sync_state where rows > 0 order by site")]
            stats = []
            if "stats_sync" in names:
                stats = [r[0] for r in db.execute("select site from stats_sync order by site")]
            return pageviews, stats
    except sqlite3.Error as exc:
        raise ConfigError(f"{database} cannot be read as a synced database: {exc}") from None


def metadata(pageview_sites: Sequence[str], stats_sites: Sequence[str]) -> dict[str, Any]:
    """Datasette's metadata for a database holding these sites' pageviews and statistics."""
    tables = {}
    for name, table in TABLES.items():
        holds = bool(pageview_sites) if name in CSV_TABLES else bool(stats_sites)
        # A source that is not synced stays out of the way, as does the storage behind the pageviews view.
        tables[name] = {**table, "hidden": name in ALWAYS_HIDDEN or not holds}
    sites = [f"{html.escape(s)} (individual pageviews)" for s in pageview_sites]
    sites += [f"{html.escape(s)} (statistics: visitors)" for s in stats_sites]
    return {
        "title": "GoatCounter",
        "description_html": (
            "The copy <code>goatcounter-exports sync</code> keeps, read-only. Start with the "
            f'<a href="/{DATABASE_NAME}">canned queries</a>.'
        ),
        "about": "goatcounter-exports",
        "databases": {
            DATABASE_NAME: {
                "title": "GoatCounter: the synced copy",
                "description_html": (
                    "<p>Sites: " + ("; ".join(sites) or "none yet") + ".</p><p>The queries below answer what "
                    "<code>pageview-stats</code> answers: <code>pageviews_*</code> count individual pageviews "
                    "(bots left out), <code>visitors_*</code> count visitors as GoatCounter's dashboard does. "
                    "Each takes <code>site</code> (empty when the database holds one site), <code>since</code> "
                    "and <code>until</code> (YYYY-MM-DD, included, UTC). The <code>*_daily</code> queries "
                    "draw a chart.</p>"
                ),
                "tables": tables,
                "queries": canned_queries(pageviews=bool(pageview_sites), statistics=bool(stats_sites)),
            }
        },
    }


# -- the chart ------------------------------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT = 800, 260
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 48, 8, 22, 34
BAR_COLOR = "#3b6fb6"  # tests/test_browse.py finds the bars in a screenshot by this colour
LABEL_EVERY_BAR = 16  # up to this many bars, each has its value and day written by it
MAX_FILLED_DAYS = 3 * 366  # missing days between the first and last are drawn as 0, up to this span


def _days(rows: Sequence[Sequence[Any]]) -> list[tuple[str, int]]:
    """(day, count) per row, with the days the query has no row for (nothing counted) filled in as 0."""
    counted = [(str(row[0]), int(row[1] or 0)) for row in rows if row[0] is not None]
    try:
        first, last = date.fromisoformat(counted[0][0]), date.fromisoformat(counted[-1][0])
        by_day = dict(counted)
    except (IndexError, ValueError):
        return counted
    if not 0 <= (last - first).days <= MAX_FILLED_DAYS:
        return counted
    span = (last - first).days + 1
    return [(d, by_day.get(d, 0)) for d in ((first + timedelta(days=i)).isoformat() for i in range(span))]


def bar_chart(rows: Sequence[Sequence[Any]], unit: str) -> str:
    """An SVG bar chart of (day, count) rows, as markup: one `rect.bar` per day with `data-day`/`data-value`,
    its value and day written by it when there are few bars, and the scale (0 and the highest count)."""
    bars = _days(rows)
    if not bars:
        return ""
    top = max(1, *(value for _, value in bars))
    plot_width = CHART_WIDTH - PLOT_LEFT - PLOT_RIGHT
    plot_height = CHART_HEIGHT - PLOT_TOP - PLOT_BOTTOM
    step = plot_width / len(bars)
    width = max(1, round(step * 0.8))
    baseline = PLOT_TOP + plot_height
    title = f"{unit.capitalize()} per day, {bars[0][0]} to {bars[-1][0]}"
    parts = [
        f'<figure class="goatcounter-chart" style="margin: 1em 0; max-width: 100%; overflow-x: auto">'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" aria-label="{html.escape(title)}" '
        f'shape-rendering="crispEdges" font-family="sans-serif" font-size="11" data-unit="{html.escape(unit)}">',
        f"<title>{html.escape(title)}</title>",
        f'<text class="axis" x="{PLOT_LEFT - 6}" y="{PLOT_TOP + 4}" text-anchor="end">{top}</text>',
        f'<text class="axis" x="{PLOT_LEFT - 6}" y="{baseline}" text-anchor="end">0</text>',
        f'<line x1="{PLOT_LEFT}" y1="{baseline}" x2="{CHART_WIDTH - PLOT_RIGHT}" y2="{baseline}" stroke="#999"/>',
    ]
    for i, (day, value) in enumerate(bars):
        x = round(PLOT_LEFT + i * step + (step - width) / 2)
        height = round(plot_height * value / top)
        label = html.escape(day)
        parts.append(
            f'<rect class="bar" x="{x}" y="{baseline - height}" width="{width}" height="{height}" '
            f'fill="{BAR_COLOR}" data-day="{label}" data-value="{value}"><title>{label}: {value} {unit}</title></rect>'
        )
        middle = x + width / 2
        if len(bars) <= LABEL_EVERY_BAR:
            parts.append(
                f'<text class="value" x="{middle:g}" y="{baseline - height - 4}" text-anchor="middle">{value}</text>'
                f'<text class="day" x="{middle:g}" y="{baseline + 14}" text-anchor="middle">{label[5:]}</text>'
            )
        elif i in (0, len(bars) - 1):
            anchor = "start" if i == 0 else "end"
            parts.append(f'<text class="day" x="{x}" y="{baseline + 14}" text-anchor="{anchor}">{label}</text>')
    parts.append(f"</svg><figcaption>{html.escape(title)}.</figcaption></figure>")
    return "".join(parts)


def chart_for(canned_query: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The chart a query page shows above its table (markup), or "": the `*_daily` canned queries have one."""
    from markupsafe import Markup  # Jinja's own: Datasette renders with Jinja

    if not canned_query or not canned_query.endswith("_daily") or len(columns) != 2:
        return Markup("")
    return Markup(bar_chart(rows, unit=columns[1]))  # noqa: S704 - built from escaped values only


# -- serving --------------------------------------------------------------------------------------


def _import_datasette() -> tuple[Any, Any]:
    try:
        from datasette.app import Datasette  # type: ignore[import-untyped]
        from datasette.database import Database  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(f"browse needs Datasette, an optional extra: {INSTALL_HINT}") from None
    return Datasette, Database


def build_datasette(database: Path) -> Any:
    """A Datasette serving `database` read-only as /goatcounter, with the metadata and the chart template."""
    datasette_class, database_class = _import_datasette()
    if not database.is_file():
        raise ConfigError(f"there is no synced database at {database}; run `goatcounter-exports sync` first")
    pageview_sites, stats_sites = _sources(database)
    if not pageview_sites and not stats_sites:
        raise ConfigError(f"nothing is synced into {database} yet; run `goatcounter-exports sync` first")
    uri = f"{database.resolve().as_uri()}?mode=ro"

    class ReadOnlyDatabase(database_class):  # type: ignore[misc, valid-type]
        """Datasette's mutable database (it sees new syncs), opened read-only whatever is asked of it."""

        def connect(self, write: bool = False) -> sqlite3.Connection:
            if write:
                raise ConfigError("browse serves the synced database read-only")
            connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
            connection.execute("pragma query_only = 1")
            self._all_file_connections.append(connection)
            return connection

    datasette = datasette_class(
        metadata=metadata(pageview_sites, stats_sites),
        template_dir=str(ASSETS / "templates"),
        settings=SETTINGS,
    )
    datasette.jinja_env.globals["goatcounter_chart"] = chart_for
    datasette.add_database(ReadOnlyDatabase(datasette, path=str(database), is_mutable=True), name=DATABASE_NAME)
    return datasette


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_browser(url: str) -> None:
    """Open `url` in the desktop's browser, if there is one: a console browser (lynx, w3m) is not started, since
    it would take over the terminal the server runs in."""
    try:
        controller = webbrowser.get()
    except webbrowser.Error:
        return
    if type(controller) is webbrowser.GenericBrowser:
        return
    threading.Thread(target=controller.open, args=(url,), daemon=True).start()


def _print(line: str) -> None:
    print(line, flush=True)


def run_browse(
    database: Path, *, host: str, port: int, open_browser: bool, announce: Callable[[str], None] = _print
) -> None:
    """Serve `database` with Datasette on host:port (0: any free port) until Ctrl-C or SIGTERM.

    Announces `Browse  http://HOST:PORT/goatcounter` once listening. Raises ConfigError without the `browse`
    extra, without a synced database, or when the port is taken."""
    datasette = build_datasette(database)
    # Datasette prints every error with a traceback and its locals through rich's console, a mistyped URL's
    # 404 included: quiet that console in this process (a server error still prints its plain traceback).
    rich.reconfigure(quiet=True)
    listener = Listener("browse", datasette.app(), host, port)
    bind(listener, "--port")
    url = f"{listener.url}{DATABASE_NAME}"
    if not is_loopback(host):
        announce(f"warning: {host} is not a loopback address: anyone who can reach it reads this data (no login)")

    def started() -> None:
        announce(f"Browse  {url}  ({database}, read-only; Ctrl-C stops)")
        if open_browser:
            _open_browser(url)

    try:
        asyncio.run(run_listeners([listener], on_started=started))
    finally:
        close(datasette)


def close(datasette: Any) -> None:
    """Close every SQLite connection Datasette opened (it keeps one per thread)."""
    for served in datasette.databases.values():
        served.close()
