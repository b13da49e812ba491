"""Run a real GoatCounter on 127.0.0.1, for the test bed and `goatcounter-exports demo`.

    binary = find_binary(cache_dir=settings.cache_dir)   # installed by scripts/install-goatcounter
    with LocalGoatCounter(binary, workdir) as gc:
        gc.seed(["/a", "/b"])                   # POST /api/v0/count, then wait until stored
        gc.url, gc.export_key                   # point the capability here

Everything lives in `workdir`: the SQLite database, the server log (`serve.log`) and the
export files (GoatCounter writes them to its TMPDIR, which is set to `workdir/tmp`).
Starting again on the same `workdir` reuses the database and its tokens, so a test can
restart the server with other rate limits and keep its data.

It lives apart from the GoatCounter domain modules (goatcounter/): it is equipment, not knowledge.

GoatCounter v2.6+ does not keep individual pageviews (the `hits` table that CSV exports
read) unless the site's "Individual pageviews" collect flag is set; sites made here get it
unless `collect_hits=False`, which reproduces a fresh self-hosted install (exports with
0 rows).

Each site gets three API tokens (`db create apitoken`): `export_key` (export, count),
`noexport_key` (count) and `siteread_key` (export, count, site_read); with `stats_key=True` also
`stats_key` (export, count, site_read and stats, 64: a permission `db create apitoken -perm` does
not accept, so it is set in the database before `serve` starts).

GoatCounter main (a commit build, `goatcounter-main-*`) has one more rate-limit store than
v2.7.0, `api2` (500 API requests an hour); `NO_RATELIMIT` lifts it there too (v2.7.0 panics
on that name, so the flag follows the version `<binary> version` reports).

Stdlib only, synchronous, subprocess based. Tokens are secrets: they are never logged and
are left out of every repr.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BufferedWriter
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .errors import GoatCounterNotInstalled, LocalGoatCounterError

GOATCOUNTER_VERSION = "v2.7.0"
BINARY_NAME = f"goatcounter-{GOATCOUNTER_VERSION}"
# GoatCounter's main branch at the commit scripts/install-goatcounter pins (`main_commit` there):
# `scripts/install-goatcounter main` builds it as MAIN_BINARY_NAME.
MAIN_COMMIT = "f3c7b792f78b"
MAIN_BINARY_NAME = f"goatcounter-main-{MAIN_COMMIT}"
INSTALL_SCRIPT = "scripts/install-goatcounter"
# Lifts GoatCounter's limits (export:1/3600, api:4/1, api-count:60/120) for ordinary tests; on a
# build that has the `api2` store (main: 500/3600), LocalGoatCounter adds NO_RATELIMIT_API2.
NO_RATELIMIT = "export:1000/1,api:1000/1,api-count:1000/1"
NO_RATELIMIT_API2 = "api2:1000/1"
PRIMARY_VHOST = "127.0.0.1"
# Site setting `collect` flag "Individual pageviews" (goatcounter.CollectHits): store rows in `hits`.
COLLECT_HITS = 256
# Site setting `collect` flag "Sessions" (goatcounter.CollectSession): count visitors, not pageviews.
COLLECT_SESSION = 128
# API token permission bits (goatcounter.APIPerm*); `db create apitoken -perm` has no name for stats.
PERM_STATS = 64
# The most pageviews POST /api/v0/count accepts in one request.
COUNT_BATCH = 500
# Statistics tables GoatCounter's `persist hits` task writes for each new visitor, in the order it
# writes them (each its own transaction): seed() waits for the first and the last.
_FIRST_STATS_TABLE = ("hit_counts", "total")
_LAST_STATS_TABLE = ("size_stats", "count")

_TAGGED_RELEASE = re.compile(r"v(\d+)\.(\d+)\.(\d+)")
_binary_versions: dict[tuple[str, int, int], str] = {}

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def binary_version(binary: Path) -> str:
    """The version `<binary> version` reports (`v2.7.0`, or `<commit>_<date>` for a commit build).

    Asked once per binary file (path, size, mtime); an empty string when the binary does not say.
    """
    stat = binary.stat()
    key = (str(binary.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _binary_versions:
        result = subprocess.run(
            [str(binary), "version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
        )
        match = re.search(rb"version=([^;\s]+)", result.stdout)
        _binary_versions[key] = match.group(1).decode() if match else ""
    return _binary_versions[key]


def has_api2_ratelimit(version: str, binary_name: str = "") -> bool:
    """Whether GoatCounter `version` has the `api2` rate-limit store (main has; v2.7.0 and older do not).

    A tagged release up to v2.7 has none; a commit build (main) has it. Without a version, the
    binary's name decides (`goatcounter-main-*`).
    """
    tagged = _TAGGED_RELEASE.fullmatch(version)
    if tagged is not None:
        return (int(tagged.group(1)), int(tagged.group(2))) > (2, 7)
    if version:
        return True
    return binary_name.startswith("goatcounter-main-")


def find_binary(explicit: str | os.PathLike[str] | None = None, *, cache_dir: Path, name: str = BINARY_NAME) -> Path:
    """The GoatCounter binary to run.

    In order: `explicit` (an error when it is not an executable file), then the cache of
    scripts/install-goatcounter (`cache_dir`: `Settings.cache_dir`), then
    `goatcounter` on PATH. Raises GoatCounterNotInstalled naming the install script.
    Another `name` (MAIN_BINARY_NAME) is looked for in the cache only: `goatcounter` on PATH
    is no particular version.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise GoatCounterNotInstalled(
            f"GoatCounter binary {str(path)!r} does not exist or is not executable; "
            f"run {INSTALL_SCRIPT} to install GoatCounter {GOATCOUNTER_VERSION}"
        )
    cached = cache_dir / "bin" / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    if name != BINARY_NAME:
        raise GoatCounterNotInstalled(
            f"GoatCounter is not installed: no {cached}; run {INSTALL_SCRIPT} main "
            f"(builds GoatCounter main at {MAIN_COMMIT}; needs Go 1.27 and gcc)"
        )
    on_path = shutil.which("goatcounter")
    if on_path is not None:
        return Path(on_path)
    raise GoatCounterNotInstalled(
        f"GoatCounter is not installed: no {cached} and no 'goatcounter' on PATH; "
        f"run {INSTALL_SCRIPT} (builds GoatCounter {GOATCOUNTER_VERSION}; needs Go and gcc)"
    )


@dataclass(frozen=True)
class LocalSite:
    """One GoatCounter site of a LocalGoatCounter; chosen by the Host header (port ignored)."""

    site_id: int
    vhost: str
    url: str  # http://<vhost>:<port>, the site URL without /api/v0
    email: str
    password: str = field(repr=False)  # dashboard login
    export_key: str = field(repr=False)  # API token with perms export,count
    noexport_key: str = field(repr=False)  # API token with only count: export calls answer 403
    siteread_key: str = field(repr=False)  # API token with perms export,count,site_read
    # API token with perms export,count,site_read,stats; None unless LocalGoatCounter(stats_key=True).
    stats_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class HTTPResult:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LocalGoatCounter:
    """A real `goatcounter serve` on 127.0.0.1; a context manager (start on enter, stop on exit).

    `ratelimit=None` keeps GoatCounter's own defaults (for tests of rate-limit handling);
    `NO_RATELIMIT` (the default) lifts them all, `api2` included on a build that has it; any other
    value is passed to `-ratelimit` as given.
    `stats_key=True` also makes each site a key with the `stats` permission (`LocalSite.stats_key`).
    `extra_vhosts` adds sites, each with its own user and tokens, chosen by the Host header: e.g.
    "localhost", whose `url` http://localhost:PORT reaches the same server. A vhost must resolve
    to 127.0.0.1 for its `url` to be usable as is (otherwise send the Host header yourself).
    """

    binary: Path
    workdir: Path
    port: int | None = None
    ratelimit: str | None = NO_RATELIMIT
    extra_vhosts: Sequence[str] = ()
    collect_hits: bool = True
    stats_key: bool = False
    startup_timeout: float = 30.0
    stop_timeout: float = 10.0
    extra_env: Mapping[str, str] = field(default_factory=dict)

    sites: list[LocalSite] = field(default_factory=list, init=False, repr=False)
    version: str = field(default="", init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: BufferedWriter | None = field(default=None, init=False, repr=False)
    _wanted_port: int | None = field(default=None, init=False, repr=False)
    # (site id, session, path) seed() has sent: a path's second view in a session is no new visitor.
    _seen_visits: set[tuple[int, str, str]] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._wanted_port = self.port  # None: a free port on every start

    # ------------------------------------------------------------------ paths and site shortcuts

    @property
    def db_path(self) -> Path:
        return self.workdir / "db.sqlite3"

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    @property
    def export_dir(self) -> Path:
        return self.workdir / "tmp"

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT, the address the server listens on."""
        if self.port is None:
            raise LocalGoatCounterError("LocalGoatCounter is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def site(self) -> LocalSite:
        if not self.sites:
            raise LocalGoatCounterError("LocalGoatCounter is not started")
        return self.sites[0]

    @property
    def url(self) -> str:
        return self.site.url

    @property
    def export_key(self) -> str:
        return self.site.export_key

    @property
    def noexport_key(self) -> str:
        return self.site.noexport_key

    @property
    def siteread_key(self) -> str:
        return self.site.siteread_key

    @property
    def binary_version(self) -> str:
        """What `<binary> version` reports, before the server starts (`version` is what /status said)."""
        return binary_version(self.binary)

    @property
    def ratelimit_flag(self) -> str | None:
        """The `-ratelimit` value `serve` gets: `ratelimit`, with `api2` lifted too when it is NO_RATELIMIT."""
        if self.ratelimit == NO_RATELIMIT and has_api2_ratelimit(self.binary_version, self.binary.name):
            return f"{NO_RATELIMIT},{NO_RATELIMIT_API2}"
        return self.ratelimit

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create the database, sites and tokens when missing, then serve and wait for GET /status."""
        if self._process is not None:
            raise LocalGoatCounterError("LocalGoatCounter is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.export_dir.mkdir(exist_ok=True)
        vhosts = [PRIMARY_VHOST, *(v for v in self.extra_vhosts if v != PRIMARY_VHOST)]
        for vhost in vhosts:
            self._ensure_site(vhost)
        fixed_port = self._wanted_port
        attempts = 1 if fixed_port is not None else 3
        for attempt in range(attempts):
            self.port = fixed_port if fixed_port is not None else _free_port()
            self.sites = [self._load_site(vhost) for vhost in vhosts]
            try:
                self._serve()
                return
            except LocalGoatCounterError:
                in_use = "address already in use" in self._log_tail()
                self.stop()
                if not in_use or attempt == attempts - 1:
                    self.port = fixed_port
                    raise

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after stop_timeout. Safe to call more than once."""
        process, self._process = self._process, None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            elif process is not None:
                process.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    # ------------------------------------------------------------------ data

    def seed(
        self, paths: Iterable[str | Mapping[str, Any]], *, site: LocalSite | None = None, timeout: float = 20.0
    ) -> None:
        """Count pageviews (a path, or a full hit object of POST /api/v0/count) and wait until stored.

        Uses the site's export key (it has the `count` permission). What it waits for:

        - with collect_hits (the `hits` table is kept): the site's `hits` rows grew by the number sent;
        - without: GoatCounter keeps only statistics, which count visitors (a path's first view in a
          session), not pageviews. Each hit without a `session` gets a session of its own (a new
          visitor); hits that share a `session` count once per path (GoatCounter's path identity:
          case-insensitive, events without their leading `/`), and a (session, path) this instance
          already seeded counts no more; hits with `bot` set count nothing. Then it waits until both
          the first and the last statistics table GoatCounter writes (`hit_counts`, `size_stats`)
          grew by that many visitors. A user agent GoatCounter takes for a bot is not foreseen here
          (the wait then times out): send `bot` for those.
        """
        target = site or self.site
        hits = [{"path": p} if isinstance(p, str) else dict(p) for p in paths]
        if not hits:
            return
        want_growth = len(hits)
        if not self.collect_hits:
            for hit in hits:
                if not hit.get("session"):
                    hit["session"] = f"seed-{secrets.token_hex(8)}"
            want_growth = self._new_visitors(hits, target)
        before = self._stored(target)
        for start in range(0, len(hits), COUNT_BATCH):
            batch = hits[start : start + COUNT_BATCH]
            result = self.request(
                "POST", "/api/v0/count", key=target.export_key, site=target, body={"no_sessions": True, "hits": batch}
            )
            if result.status != 202:
                raise LocalGoatCounterError(
                    f"POST /api/v0/count answered {result.status}: {result.body[:500].decode(errors='replace')}"
                )
        if not self.collect_hits:
            self._seen_visits.update((target.site_id, *_visit_key(hit)) for hit in hits if not hit.get("bot"))
        what = "pageviews" if self.collect_hits else "visitors"
        deadline = time.monotonic() + timeout
        while True:
            now = self._stored(target)
            if all(n - b >= want_growth for n, b in zip(now, before, strict=True)):
                return
            if not self.running:
                raise LocalGoatCounterError(f"GoatCounter exited while storing {what}\n{self._log_tail()}")
            if time.monotonic() > deadline:
                got = min(n - b for n, b in zip(now, before, strict=True))
                raise LocalGoatCounterError(
                    f"only {got} of {want_growth} {what} were stored after {timeout:.0f}s\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def visitor_count(self, site: LocalSite | None = None) -> int:
        """Visitors GoatCounter counted for the site: the sum of `hit_counts.total`."""
        return self._table_sum(_FIRST_STATS_TABLE, (site or self.site).site_id)

    def hit_count(self, site: LocalSite | None = None) -> int:
        """Rows in the `hits` table (what a CSV export reads) for the site."""
        return self._query_int("select count(*) from hits where site_id = ?", (site or self.site).site_id)

    def max_hit_id(self, site: LocalSite | None = None) -> int:
        """The highest hit id of the site, 0 when none: the `last_hit_id` a full export reports."""
        return self._query_int(
            "select coalesce(max(hit_id), 0) from hits where site_id = ?", (site or self.site).site_id
        )

    def status(self, *, timeout: float = 10.0) -> dict[str, Any]:
        """GET /status (no auth): version, uptime, database, go, ..."""
        result = self.request("GET", "/status", timeout=timeout)
        if result.status != 200:
            raise LocalGoatCounterError(f"GET /status answered {result.status}")
        data = result.json()
        if not isinstance(data, dict):
            raise LocalGoatCounterError("GET /status did not answer a JSON object")
        return data

    def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        body: Any = None,
        site: LocalSite | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> HTTPResult:
        """One HTTP request to the server, for tests and probes; never raises for an HTTP status.

        Sends `Content-Type: application/json` (GoatCounter answers errors as HTML without it, and
        415 to a body of another type), the Host of `site` and `Authorization: Bearer key`.
        """
        target = site or (self.sites[0] if self.sites else None)
        all_headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if target is not None:
            all_headers["Host"] = f"{target.vhost}:{self.port}"
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        all_headers.update(headers or {})
        data = None if body is None else json.dumps(body).encode()
        # Always http://127.0.0.1:PORT: no user-supplied scheme.
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=all_headers)  # noqa: S310
        try:
            with _NO_PROXY.open(req, timeout=timeout) as resp:
                return HTTPResult(resp.status, dict(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return HTTPResult(err.code, dict(err.headers.items()), err.read())

    # ------------------------------------------------------------------ internals

    def _env(self) -> dict[str, str]:
        # A clean environment: `goatcounter` takes flag defaults from $GOATCOUNTER_*, and
        # writes export files to TMPDIR. Nothing from the caller's environment leaks in.
        tmp = str(self.export_dir)
        return {"HOME": str(self.workdir), "TMPDIR": tmp, "GOATCOUNTER_TMPDIR": tmp, "TZ": "UTC", **self.extra_env}

    def _db_flag(self) -> str:
        return f"sqlite+{self.db_path}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.binary), *args],
            env=self._env(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise LocalGoatCounterError(
                f"goatcounter {args[0]} {args[1]} {args[2]} failed ({result.returncode}): {output}"
            )

    def _ensure_site(self, vhost: str) -> None:
        if self._site_id(vhost) is None:
            email = f"site{len(self._vhosts_in_db()) + 1}@example.com"
            # `-vhost` must be a domain with 2+ labels; "localhost" is set in the database afterwards.
            create_as = vhost if "." in vhost else f"{vhost}.goatcounter-exports.test"
            self._run(
                "db", "create", "site", "-createdb", "-db", self._db_flag(), "-vhost", create_as,
                "-user.email", email, f"-user.password={self._password(vhost)}",
            )  # fmt: skip
            if create_as != vhost:
                with self._connect(readonly=False) as conn, conn:
                    conn.execute("update sites set cname = ? where cname = ?", (vhost, create_as))
        site_id = self._site_id(vhost)
        if site_id is None:
            raise LocalGoatCounterError(f"site {vhost!r} was not created")
        user_id, _ = self._user(site_id)
        tokens = [
            (f"export-{vhost}", "export,count"),
            (f"noexport-{vhost}", "count"),
            (f"siteread-{vhost}", "export,count,site_read"),
        ]
        if self.stats_key:
            tokens.append((f"stats-{vhost}", "export,count,site_read"))
        for name, perm in tokens:
            if self._token(name) is None:
                # -user takes a user id, or "<site>,<email>"; the id is simplest.
                self._run(
                    "db", "create", "apitoken", "-db", self._db_flag(),
                    "-user", str(user_id), "-perm", perm, "-name", name,
                )  # fmt: skip
        if self.stats_key:
            # Before `serve` starts, like every change made here in the database.
            with self._connect(readonly=False) as conn, conn:
                conn.execute(
                    "update api_tokens set permissions = cast(permissions as integer) | ? where name = ?",
                    (PERM_STATS, f"stats-{vhost}"),
                )
        if self.collect_hits:
            self._set_collect_hits(site_id)

    def _password(self, vhost: str) -> str:
        # The dashboard password of the site's user, kept next to the database (mode 0600).
        pwfile = self.workdir / f".password-{vhost}"
        if not pwfile.exists():
            pwfile.touch(mode=0o600)
            # Letters and digits only: a leading "-" would be read as a flag.
            pwfile.write_text(secrets.token_hex(16))
        return pwfile.read_text().strip()

    def _load_site(self, vhost: str) -> LocalSite:
        site_id = self._site_id(vhost)
        export_key = self._token(f"export-{vhost}")
        noexport_key = self._token(f"noexport-{vhost}")
        siteread_key = self._token(f"siteread-{vhost}")
        stats_key = self._token(f"stats-{vhost}") if self.stats_key else None
        if (
            site_id is None
            or export_key is None
            or noexport_key is None
            or siteread_key is None
            or (self.stats_key and stats_key is None)
        ):
            raise LocalGoatCounterError(f"site {vhost!r} or its API tokens are missing from {self.db_path}")
        return LocalSite(
            site_id=site_id,
            vhost=vhost,
            url=f"http://{vhost}:{self.port}",
            email=self._user(site_id)[1],
            password=self._password(vhost),
            export_key=export_key,
            noexport_key=noexport_key,
            siteread_key=siteread_key,
            stats_key=stats_key,
        )

    def _connect(self, *, readonly: bool = True) -> contextlib.closing[sqlite3.Connection]:
        uri = f"file:{self.db_path}?mode={'ro' if readonly else 'rw'}"
        return contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10))

    def _query_int(self, sql: str, *params: object) -> int:
        with self._connect() as conn:
            row = conn.execute(sql, params).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _vhosts_in_db(self) -> list[str]:
        if not self.db_path.exists():
            return []
        with self._connect() as conn:
            return [str(r[0]) for r in conn.execute("select cname from sites")]

    def _site_id(self, vhost: str) -> int | None:
        if not self.db_path.exists():
            return None
        with self._connect() as conn:
            row = conn.execute("select site_id from sites where cname = ?", (vhost,)).fetchone()
        return None if row is None else int(row[0])

    def _user(self, site_id: int) -> tuple[int, str]:
        """The first user of a site: (user_id, email)."""
        with self._connect() as conn:
            row = conn.execute(
                "select user_id, email from users where site_id = ? order by user_id limit 1", (site_id,)
            ).fetchone()
        if row is None:
            raise LocalGoatCounterError(f"site {site_id} has no user")
        return int(row[0]), str(row[1])

    def _token(self, name: str) -> str | None:
        with self._connect() as conn:
            row = conn.execute("select token from api_tokens where name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def _set_collect_hits(self, site_id: int) -> None:
        # Done before `serve` starts: the server caches sites.
        with self._connect(readonly=False) as conn, conn:
            (raw,) = conn.execute("select settings from sites where site_id = ?", (site_id,)).fetchone()
            settings = json.loads(raw)
            collect = int(settings.get("collect") or 0)
            if not collect & COLLECT_HITS:
                settings["collect"] = collect | COLLECT_HITS
                conn.execute("update sites set settings = ? where site_id = ?", (json.dumps(settings), site_id))

    def _stored(self, site: LocalSite) -> tuple[int, ...]:
        """What seed() watches grow: the `hits` rows, or the visitors of the first and last statistics table."""
        if self.collect_hits:
            return (self.hit_count(site),)
        return tuple(self._table_sum(table, site.site_id) for table in (_FIRST_STATS_TABLE, _LAST_STATS_TABLE))

    def _table_sum(self, table: tuple[str, str], site_id: int) -> int:
        name, column = table  # module constants, never user input
        return self._query_int(f"select coalesce(sum({column}), 0) from {name} where site_id = ?", site_id)  # noqa: S608

    def _new_visitors(self, hits: Sequence[Mapping[str, Any]], site: LocalSite) -> int:
        """How many of `hits` GoatCounter will count as visitors (see seed)."""
        counted = [hit for hit in hits if not hit.get("bot")]
        if not self._site_collect(site.site_id) & COLLECT_SESSION:
            return len(counted)  # without sessions, every pageview is a first visit
        return len({(site.site_id, *_visit_key(hit)) for hit in counted} - self._seen_visits)

    def _site_collect(self, site_id: int) -> int:
        with self._connect() as conn:
            row = conn.execute("select settings from sites where site_id = ?", (site_id,)).fetchone()
        return int(json.loads(row[0]).get("collect") or 0) if row else 0

    def _serve(self) -> None:
        args = [
            str(self.binary), "serve", "-db", self._db_flag(), "-listen", f"127.0.0.1:{self.port}",
            "-tls", "http", "-automigrate", "-store-every", "1",
        ]  # fmt: skip
        ratelimit = self.ratelimit_flag
        if ratelimit is not None:
            args += ["-ratelimit", ratelimit]
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- goatcounter serve on 127.0.0.1:{self.port}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            args,
            env=self._env(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                raise LocalGoatCounterError(
                    f"goatcounter serve exited with {self._process.returncode} during startup\n{self._log_tail()}"
                )
            try:
                version = str(self.status(timeout=1.0).get("version", ""))
            except (OSError, LocalGoatCounterError, ValueError):
                pass
            else:
                # Whoever answered, our process must still be alive (not exited on "address in use").
                time.sleep(0.05)
                if self._process.poll() is None:
                    self.version = version
                    return
            if time.monotonic() > deadline:
                waited = f"{self.startup_timeout:.0f}s"
                raise LocalGoatCounterError(
                    f"goatcounter serve did not answer GET /status in {waited}\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path}:\n{tail}"


def _visit_key(hit: Mapping[str, Any]) -> tuple[str, str]:
    """(session, path) as GoatCounter tells visits apart: paths case-insensitive, an event's without leading `/`."""
    path = str(hit.get("path", "")).strip()
    if hit.get("event"):
        path = path.lstrip("/") or "(no event name)"
    elif path:
        path = "/" + path.strip("/")
    return str(hit.get("session", "")), path.lower()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
