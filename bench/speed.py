"""Every row of the SPEED issue in one run, each as a ratio to the alternative a user could pick instead.

    .venv/bin/python bench/speed.py                                   # the current tree, ~10 min
    .venv/bin/python bench/speed.py --before-src /work/wt-before      # also an older tree, side by side
    .venv/bin/python bench/speed.py --smoke                           # the CI form: small, short, no report
    .venv/bin/python bench/speed.py --help

The upstream is a static nginx (bench/_upstream.py; the standard library's server when nginx is missing) serving a
finished GoatCounter CSV export of `--rows` realistic rows made deterministically (bench/_data.py) and its export
object. Against it, in rounds (medians of `--rounds`, the order of the contenders rotated each round):

- sync: `goatcounter-exports sync --format csv` into a new database, against
  `zcat F.csv.gz | sqlite3 DB ".import --csv /dev/stdin pageviews"`; and the whole job, against
  `curl -s URL | gunzip | sqlite3 DB ".import --csv ..."` (GoatCounter's documented route); the databases' sizes;
- export: `goatcounter-exports export -o F.csv` (SHA-256 checked), against `curl -s URL | gunzip > F.csv`;
- REST download: `GET /v1/export/7/download` (gzip) against nginx `proxy_pass`; the service's peak RSS while it
  serves files of about 100 MB and 1 GB;
- REST GET: `wrk -t1 -c32 GET /v1/export/7` against nginx `proxy_pass`; the p50 at `-c1` against the upstream's;
- MCP calls: sequential `tools/call get-export-info` with the SDK's client, against fastmcp `from_openapi` (and
  fastmcp's download);
- MCP paging: download-export pages at random offsets after the first; the disk used; upstream downloads.

Every output is checked (row counts, SHA-256, the pages' rows against the CSV). The service is pinned to the first
CPU and the upstream, wrk and this driver to the others, so a server under test has one core; the command-line rows
are not pinned (a shell pipeline uses both cores too). Unless --smoke, the results go to bench/results/<label>.json
and docs/benchmarks.md is written again between its `bench:begin` and `bench:end` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import gzip
import hashlib
import http.client
import io
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import EXPORT_ID, Dataset, build
from _measure import WRK_REPORT_LUA, PeakRss, run_wrk, stop_group
from _upstream import LOOPBACK, PythonUpstream, free_port, nginx_available, nginx_proxy, nginx_upstream, wait_listening

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
FASTMCP_PYTHON = Path(os.environ.get("BENCH_FASTMCP_PYTHON", "/tmp/fastmcp-venv/bin/python"))
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
KEY = "bench-key"
SERVICE_START_TIMEOUT_S = 90.0
COMMAND_TIMEOUT_S = 900.0
CHUNK = 256 * 1024

TARGETS = {
    "sync": ">= 0.5x the sqlite3 CLI import",
    "size": "<= 1.2x the plain import",
    "export": ">= 0.8x curl | gunzip",
    "download": ">= 0.9x nginx proxy_pass; peak RSS < 100 MB at 1 GB, flat from 100 MB",
    "get": ">= 0.15x nginx proxy_pass; <= 1 ms added at p50 (c1)",
    "mcp": ">= 2x fastmcp from_openapi",
    "paging": "any page within 50 ms after the first; one upstream download; bounded disk",
    "job": ">= 0.5x curl + gunzip + sqlite3",
}


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    rows: int
    rounds: int
    seed: int
    data: Path
    sources: dict[str, Path]  # label -> repository root whose src/ is measured
    extra_paths: dict[str, tuple[str, ...]]  # label -> more of PYTHONPATH (packages not in .venv, for A/B runs)
    wrk_seconds: int
    calls: int
    pages: int
    smoke: bool
    only: frozenset[str]
    label: str
    pin: bool
    big: bool
    merge: Path | None = None

    def wants(self, row: str) -> bool:
        return not self.only or row in self.only


ROWS = ("sync", "export", "download", "get", "mcp", "paging")


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the made-up export (1000-5000000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (1-9)")
    parser.add_argument("--seed", type=int, default=1, help="the data's seed")
    parser.add_argument("--data", type=Path, help="where the made-up export is kept (default: in /tmp)")
    parser.add_argument("--src", type=Path, default=REPO, help="the tree measured as 'after' (default: this one)")
    parser.add_argument("--before-src", type=Path, help="a tree measured as 'before', side by side")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=DIR[,PATH...]",
        help="one more tree, measured side by side, with PATHs put on its PYTHONPATH (e.g. packages to try)",
    )
    parser.add_argument("--wrk-seconds", type=int, default=10, help="seconds of each wrk run (1-60)")
    parser.add_argument("--calls", type=int, default=300, help="sequential MCP calls per round (10-5000)")
    parser.add_argument("--pages", type=int, default=40, help="random download-export pages (5-500)")
    parser.add_argument("--only", default="", help=f"comma-separated rows to run, of {', '.join(ROWS)}")
    parser.add_argument("--label", default="", help="results file name (default: after, or smoke)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the servers to CPUs")
    parser.add_argument("--no-big", dest="big", action="store_false", help="skip the 100 MB / 1 GB files")
    parser.add_argument("--smoke", action="store_true", help="CI form: 3000 rows, 1 round, short, no report")
    parser.add_argument(
        "--merge", type=Path, help="a results file of an earlier run: its rows this run does not measure are kept"
    )
    args = parser.parse_args(argv)
    only = frozenset(r.strip() for r in args.only.split(",") if r.strip())
    if only - set(ROWS):
        parser.error(f"unknown rows {sorted(only - set(ROWS))}; choose from {', '.join(ROWS)}")
    if args.smoke:
        args.rows, args.rounds, args.wrk_seconds, args.calls, args.pages, args.big = 3000, 1, 1, 20, 5, False
    bounds = {"rows": (1000, 5_000_000), "rounds": (1, 9), "wrk_seconds": (1, 60), "calls": (10, 5000)}
    for name, (low, high) in {**bounds, "pages": (5, 500)}.items():
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    sources = {"after": args.src.resolve()}
    extra_paths: dict[str, tuple[str, ...]] = {}
    if args.before_src:
        sources = {"before": args.before_src.resolve(), **sources}
    for tree in args.tree:
        label, _, rest = tree.partition("=")
        root, *paths = rest.split(",")
        if not label or not root or label in sources:
            parser.error(f"--tree takes a new LABEL=DIR[,PATH...], got {tree!r}")
        sources[label] = Path(root).resolve()
        extra_paths[label] = tuple(str(Path(p).resolve()) for p in paths)
    for label, root in sources.items():
        if not (root / "src" / "goatcounter_exports").is_dir():
            parser.error(f"{root} has no src/goatcounter_exports (for {label})")
    # Not under $HOME: nginx's workers run as another user, and must be able to read the files.
    data = args.data or Path(tempfile.gettempdir()) / "goatcounter-exports-bench" / f"export-{args.rows}-{args.seed}"
    return Settings(
        rows=args.rows,
        rounds=args.rounds,
        seed=args.seed,
        data=data,
        sources=sources,
        extra_paths=extra_paths,
        wrk_seconds=args.wrk_seconds,
        calls=args.calls,
        pages=args.pages,
        smoke=args.smoke,
        only=only,
        label=args.label or ("smoke" if args.smoke else "after"),
        pin=args.pin,
        big=args.big,
        merge=args.merge,
    )


# --------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Ran:
    seconds: float
    maxrss_kib: int
    returncode: int
    stderr: str


def run_timed(argv: Sequence[str], env: dict[str, str], cwd: Path) -> Ran:
    """Run a command to its end: wall time, and its peak RSS (the largest of the process and its children)."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return Ran(seconds, int(usage.ru_maxrss), process.returncode, text)


def shell(script: str) -> list[str]:
    return ["bash", "-c", "set -euo pipefail; " + script]


def service_env(src: Path, upstream: str, state: Path, paths: Sequence[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOATCOUNTER", "PYTHONPATH"))}
    env.update(
        GOATCOUNTER_URL=upstream,
        GOATCOUNTER_API_KEY=KEY,
        GOATCOUNTER_EXPORTS_STATE_DIR=str(state),
        PYTHONPATH=os.pathsep.join([str(src / "src"), *paths]),
    )
    return env


def ours(*args: str) -> list[str]:
    return [str(PYTHON), "-m", "goatcounter_exports", *args]


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    rest: str
    mcp: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def rest_port(self) -> int:
        return int(self.rest.rsplit(":", 1)[1].rstrip("/"))


@contextlib.contextmanager
def running_service(
    src: Path, upstream: str, workdir: Path, cpus: set[int] | None, paths: Sequence[str] = ()
) -> Iterator[Service]:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    log = state / "service.log"
    argv = ours("serve", "--host", LOOPBACK, "--rest-port", "0", "--mcp-port", "0")
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env=service_env(src, upstream, state, paths),
            cwd=state,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    try:
        rest = mcp = ""
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while not (rest and mcp):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{log.read_text(errors='replace')[-2000:]}")
            for line in log.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) == 2 and words[0] in ("REST", "MCP"):
                    rest, mcp = (words[1].rstrip("/"), mcp) if words[0] == "REST" else (rest, words[1])
            time.sleep(0.05)
        yield Service(process, rest, mcp, log)
    finally:
        stop_group(process)


@contextlib.contextmanager
def running_fastmcp(upstream: str, cpus: set[int] | None) -> Iterator[str | None]:
    """fastmcp's bridge on a free port (None when its virtual environment is missing)."""
    if not FASTMCP_PYTHON.exists():
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [str(FASTMCP_PYTHON), str(REPO / "bench" / "_fastmcp_server.py"), "--upstream", upstream, "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    try:
        wait_listening(port, None, None, SERVICE_START_TIMEOUT_S)
        yield f"http://{LOOPBACK}:{port}/mcp"
    finally:
        stop_group(process)


# --------------------------------------------------------------------------------------------------
# Checks


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def csv_sha256(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    with gzip.open(dataset.gzip_path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def count_rows(database: Path, table: str = "pageviews") -> int:
    import sqlite3

    with contextlib.closing(sqlite3.connect(database)) as db:
        return int(db.execute(f"select count(*) from {table}").fetchone()[0])  # noqa: S608 - our own names


def db_bytes(database: Path) -> int:
    return sum(p.stat().st_size for p in database.parent.glob(database.name + "*") if p.is_file())


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, int, str, float]:
    """GET on a new connection, read to the end through SHA-256: (status, bytes, sha256, seconds)."""
    digest, size = hashlib.sha256(), 0
    started = time.perf_counter()
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        while chunk := response.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return response.status, size, digest.hexdigest(), time.perf_counter() - started
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------------
# The rows


@dataclass
class Context:
    settings: Settings
    dataset: Dataset
    upstream_url: str
    upstream_requests: Callable[[str], int]
    workdir: Path
    service_cpus: set[int] | None
    other_cpus: set[int] | None
    nginx: bool
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def env(self, who: str, state: Path) -> dict[str, str]:
        return service_env(self.settings.sources[who], self.upstream_url, state, self.settings.extra_paths.get(who, ()))

    def record(self, row: str, who: str, key: str, value: Any) -> None:
        self.results.setdefault(row, {}).setdefault(who, {}).setdefault(key, []).append(value)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def rotated(items: Sequence[str], round_no: int) -> list[str]:
    shift = round_no % len(items)
    return [*items[shift:], *items[:shift]]


def row_sync(ctx: Context) -> None:
    """sync into a new database, against `.import` from the file (sqlite3 CLI) and from curl (the whole route)."""
    have_sqlite = shutil.which("sqlite3") is not None
    have_curl = shutil.which("curl") is not None
    if not have_sqlite:
        ctx.notes.append("sync: sqlite3 is not installed, so its baselines were skipped")
    gz = ctx.dataset.gzip_path
    url = f"{ctx.upstream_url}/api/v0/export/{EXPORT_ID}/download"
    contenders = [*ctx.settings.sources, *(["sqlite3"] if have_sqlite else []), *(["curl"] if have_curl else [])]
    if not have_sqlite:
        contenders = [c for c in contenders if c != "curl"]
    for round_no in range(ctx.settings.rounds):
        for who in rotated(contenders, round_no):
            folder = Path(tempfile.mkdtemp(prefix=f"sync-{who}-", dir=ctx.workdir))
            database = folder / "db.sqlite3"
            if who in ctx.settings.sources:
                env = ctx.env(who, folder / "state")
                ran = run_timed(ours("sync", "--db", str(database), "--format", "csv"), env, folder)
                table = "pageviews"
            elif who == "sqlite3":
                script = f"zcat {shlex.quote(str(gz))} | sqlite3 {shlex.quote(str(database))} "
                ran = run_timed(shell(script + "'.import --csv /dev/stdin pageviews'"), dict(os.environ), folder)
                table = "pageviews"
            else:
                script = f"curl -sf {shlex.quote(url)} | gunzip | sqlite3 {shlex.quote(str(database))} "
                ran = run_timed(shell(script + "'.import --csv /dev/stdin pageviews'"), dict(os.environ), folder)
                table = "pageviews"
            if ran.returncode != 0:
                raise RuntimeError(f"sync ({who}) failed ({ran.returncode}):\n{ran.stderr[-2000:]}")
            rows = count_rows(database, table)
            if rows != ctx.dataset.rows:
                raise RuntimeError(f"sync ({who}) left {rows} rows, not {ctx.dataset.rows}")
            ctx.record("sync", who, "seconds", ran.seconds)
            ctx.record("sync", who, "bytes", db_bytes(database))
            if who in ctx.settings.sources:
                ctx.record("sync", who, "rss_kib", ran.maxrss_kib)
            size = db_bytes(database) / 1e6
            ctx.say(f"  sync {who}: {ran.seconds:.2f} s, {size:.0f} MB, {ran.maxrss_kib / 1024:.0f} MiB")
            shutil.rmtree(folder, ignore_errors=True)


def row_export(ctx: Context) -> None:
    want = csv_sha256(ctx.dataset)
    url = f"{ctx.upstream_url}/api/v0/export/{EXPORT_ID}/download"
    contenders = [*ctx.settings.sources, *(["curl"] if shutil.which("curl") else [])]
    for round_no in range(ctx.settings.rounds):
        for who in rotated(contenders, round_no):
            folder = Path(tempfile.mkdtemp(prefix=f"export-{who}-", dir=ctx.workdir))
            out = folder / "pageviews.csv"
            if who in ctx.settings.sources:
                env = ctx.env(who, folder / "state")
                ran = run_timed(ours("export", "-o", str(out)), env, folder)
            else:
                script = f"curl -sf {shlex.quote(url)} | gunzip > {shlex.quote(str(out))}"
                ran = run_timed(shell(script), dict(os.environ), folder)
            if ran.returncode != 0:
                raise RuntimeError(f"export ({who}) failed ({ran.returncode}):\n{ran.stderr[-2000:]}")
            if sha256_file(out) != want:
                raise RuntimeError(f"export ({who}) wrote another CSV than the export's")
            ctx.record("export", who, "seconds", ran.seconds)
            ctx.say(f"  export {who}: {ran.seconds:.2f} s")
            shutil.rmtree(folder, ignore_errors=True)


def row_download(ctx: Context, who: str, service: Service, proxy_port: int | None) -> None:
    """The gzip through REST against nginx proxy_pass; then the service's peak RSS on ~100 MB and ~1 GB files."""
    want = ctx.dataset.export_object(EXPORT_ID)["hash"]
    size = ctx.dataset.gzip_path.stat().st_size
    path = f"/v1/export/{EXPORT_ID}/download"
    for _ in range(max(3, ctx.settings.rounds)):
        targets = [("ours", service.rest_port, path)]
        targets += [("nginx", proxy_port, f"/api/v0{path[3:]}")] if proxy_port else []
        for name, port, url in targets:
            status, got, digest, seconds = fetch(port, url)
            if (status, got, f"sha256-{digest}") != (200, size, want):
                raise RuntimeError(f"download ({name}) answered {status}, {got} bytes, not the file")
            ctx.record("download", who if name == "ours" else "nginx", "seconds", seconds)
    if not ctx.settings.big:
        return
    for export_id in (8, 9):
        document = ctx.dataset.export_object(export_id)
        with PeakRss(service.pid) as rss:
            status, got, digest, seconds = fetch(service.rest_port, f"/v1/export/{export_id}/download")
        if (status, f"sha256-{digest}") != (200, document["hash"]):
            raise RuntimeError(f"download of export {export_id} answered {status}, not the file")
        ctx.record("download", who, f"peak_kib_{export_id}", rss.peak_kib)
        ctx.record("download", who, f"mb_per_s_{export_id}", got / 1e6 / seconds)
        ctx.say(f"  download {who} {got / 1e6:.0f} MB: {seconds:.2f} s, peak RSS {rss.peak_kib / 1024:.1f} MiB")


WRK_LUA = WRK_REPORT_LUA


def row_get(ctx: Context, who: str, service: Service, proxy_port: int | None) -> None:
    lua = ctx.workdir / "report.lua"
    lua.write_text(WRK_LUA)
    seconds = ctx.settings.wrk_seconds
    ours_url = f"{service.rest}/v1/export/{EXPORT_ID}"
    proxy_url = f"http://{LOOPBACK}:{proxy_port}/api/v0/export/{EXPORT_ID}" if proxy_port else None
    direct_url = f"{ctx.upstream_url}/api/v0/export/{EXPORT_ID}"
    for round_no in range(ctx.settings.rounds):
        for name in rotated(["ours", *(["nginx"] if proxy_url else [])], round_no):
            url = ours_url if name == "ours" else proxy_url
            assert url is not None
            run_wrk(url, lua, 1, 1, 32)  # warm-up
            result = run_wrk(url, lua, seconds, 1, 32)
            if result.errors:
                raise RuntimeError(f"GET {url}: {result.errors} errors under wrk")
            ctx.record("get", who if name == "ours" else "nginx", "rps", result.rps)
        for name, url in (("ours", ours_url), ("direct", direct_url)):
            result = run_wrk(url, lua, max(1, seconds // 2), 1, 1)
            ctx.record("get", who if name == "ours" else "direct", "p50_ms_c1", result.p50_ms)
    ctx.say(f"  get {who}: {statistics.median(ctx.results['get'][who]['rps']):,.0f} req/s")


async def sequential_calls(url: str, tool: str, count: int) -> float:
    from mcp import Client

    async with Client(url) as client:
        for _ in range(min(20, count)):
            result = await client.call_tool(tool, {"id": EXPORT_ID})
            if result.is_error or (result.structured_content or {}).get("id") != EXPORT_ID:
                raise RuntimeError(f"{tool} at {url} did not answer export {EXPORT_ID}: {str(result.content)[:300]}")
        started = time.perf_counter()
        for _ in range(count):
            await client.call_tool(tool, {"id": EXPORT_ID})
        return count / (time.perf_counter() - started)


async def fastmcp_download(url: str) -> str:
    from mcp import Client

    async with Client(url) as client:
        try:
            result = await client.call_tool("download_export", {"id": EXPORT_ID})
        except Exception as exc:
            return f"raised {type(exc).__name__}: {str(exc)[:200]}"
        text = " ".join(getattr(block, "text", "") for block in result.content)[:200]
        return ("error: " if result.is_error else "answered: ") + text


def row_mcp(ctx: Context, who: str, service: Service, fastmcp: str | None) -> None:
    for round_no in range(ctx.settings.rounds):
        for name in rotated(["ours", *(["fastmcp"] if fastmcp else [])], round_no):
            if name == "ours":
                rate = asyncio.run(sequential_calls(service.mcp, "get-export-info", ctx.settings.calls))
            else:
                assert fastmcp is not None
                rate = asyncio.run(sequential_calls(fastmcp, "get_export_info", ctx.settings.calls))
            ctx.record("mcp", who if name == "ours" else "fastmcp", "calls_per_s", rate)
    if fastmcp and "fastmcp_download" not in ctx.results.get("mcp", {}):
        ctx.results.setdefault("mcp", {})["fastmcp_download"] = asyncio.run(fastmcp_download(fastmcp))
    ctx.say(f"  mcp {who}: {statistics.median(ctx.results['mcp'][who]['calls_per_s']):.0f} calls/s")


def expected_pages(dataset: Dataset, offsets: Sequence[tuple[int, int]]) -> dict[int, list[list[str]]]:
    """The rows [offset, offset+limit) of the CSV for each page, from one pass over the file."""
    wanted = sorted(offsets)
    pages: dict[int, list[list[str]]] = {offset: [] for offset, _ in wanted}
    with gzip.open(dataset.gzip_path, "rt", encoding="utf-8", newline="") as text:
        reader = csv.reader(text)
        next(reader)
        for index, record in enumerate(reader):
            for offset, limit in wanted:
                if offset <= index < offset + limit:
                    pages[offset].append(record)
            if index >= wanted[-1][0] + wanted[-1][1]:
                break
    return pages


async def page_calls(url: str, offsets: Sequence[tuple[int, int]], budget_s: float) -> list[tuple[int, float, Any]]:
    """download-export at each (offset, limit), in order, timed one by one: the first is the cold one."""
    from mcp import Client

    done: list[tuple[int, float, Any]] = []
    started_all = time.perf_counter()
    async with Client(url) as client:
        for offset, limit in offsets:
            started = time.perf_counter()
            result = await client.call_tool("download-export", {"id": EXPORT_ID, "offset": offset, "limit": limit})
            seconds = time.perf_counter() - started
            if result.is_error:
                raise RuntimeError(f"download-export at {offset}: {str(result.content)[:300]}")
            done.append((offset, seconds, result))
            if time.perf_counter() - started_all > budget_s and len(done) >= 3:
                break  # a slow tree (every page reads the whole file) is measured on the pages it got through
    return done


def row_paging(ctx: Context, who: str, service: Service) -> None:
    rng = random.Random(ctx.settings.seed)  # noqa: S311 - offsets, not secrets
    rows = ctx.dataset.rows
    offsets = [(0, 100)] + [(rng.randrange(0, rows), rng.choice((100, 100, 1000))) for _ in range(ctx.settings.pages)]
    before = ctx.upstream_requests(f"/export/{EXPORT_ID}/download")
    budget = 30.0 if ctx.settings.smoke else 120.0
    done = asyncio.run(page_calls(service.mcp, offsets, budget))
    downloads = ctx.upstream_requests(f"/export/{EXPORT_ID}/download") - before
    checked = {offset: limit for offset, limit in offsets[: len(done)][:4] if offset < rows}
    want = expected_pages(ctx.dataset, list(checked.items()))
    for offset, _, result in done:
        structured = result.structured_content or {}
        if structured.get("total_rows") != rows or structured.get("offset") != offset:
            raise RuntimeError(f"download-export at {offset} answered {str(structured)[:300]}")
        if offset in want:
            text = result.content[1].resource.text
            got = list(csv.reader(io.StringIO(text, newline="")))[1:]
            if got != want[offset][: len(got)] or len(got) != min(checked[offset], rows - offset):
                raise RuntimeError(f"download-export at {offset} returned other rows than the CSV's")
    cache = Path(service.log).parent / "exports"
    disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
    warm = [seconds for _, seconds, _ in done[1:]]
    ctx.results.setdefault("paging", {})[who] = {
        "first_s": done[0][1],
        "pages": len(warm),
        "p50_ms": statistics.median(warm) * 1000 if warm else None,
        "max_ms": max(warm) * 1000 if warm else None,
        "upstream_downloads": downloads,
        "disk_bytes": disk,
        "gzip_bytes": ctx.dataset.gzip_path.stat().st_size,
    }
    ctx.say(f"  paging {who}: first {done[0][1]:.2f} s, then max {max(warm) * 1000 if warm else 0:.0f} ms")


def server_rows(ctx: Context) -> None:
    wanted = [r for r in ("download", "get", "mcp", "paging") if ctx.settings.wants(r)]
    if not wanted:
        return
    have_nginx, have_wrk = ctx.nginx, shutil.which("wrk") is not None
    if not have_nginx:
        ctx.notes.append("nginx is not installed: the proxy_pass baselines were skipped")
    if not have_wrk and "get" in wanted:
        ctx.notes.append("wrk is not installed: the REST GET row was skipped")
        wanted.remove("get")
    proxy = nginx_proxy(int(ctx.upstream_url.rsplit(":", 1)[1]), ctx.workdir, ctx.service_cpus) if have_nginx else None
    with proxy or contextlib.nullcontext() as nginx, running_fastmcp(ctx.upstream_url, ctx.service_cpus) as fastmcp:
        proxy_port = nginx.port if nginx is not None else None
        if fastmcp is None and "mcp" in wanted:
            ctx.notes.append(f"fastmcp's environment ({FASTMCP_PYTHON}) is missing: its baseline was skipped")
        for who, src in ctx.settings.sources.items():
            paths = ctx.settings.extra_paths.get(who, ())
            with running_service(src, ctx.upstream_url, ctx.workdir, ctx.service_cpus, paths) as service:
                if "download" in wanted:  # first: its peak RSS is of a service that has done nothing else yet
                    row_download(ctx, who, service, proxy_port)
                if "get" in wanted:
                    row_get(ctx, who, service, proxy_port)
                if "mcp" in wanted:
                    row_mcp(ctx, who, service, fastmcp)
                if "paging" in wanted:  # counts the upstream downloads of export 7 it causes
                    row_paging(ctx, who, service)
                if service.process.poll() is not None:
                    raise RuntimeError(f"the service ({who}) exited:\n{service.log.read_text()[-2000:]}")


# --------------------------------------------------------------------------------------------------
# Report


def median(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def figures(results: dict[str, Any], who: str) -> dict[str, Any]:
    """One contender's figures and ratios (higher is better for every ratio but the size's)."""
    out: dict[str, Any] = {}
    sync = results.get("sync", {})
    if who in sync:
        mine = median(sync[who]["seconds"])
        out["sync_s"] = mine
        out["sync_rss_mib"] = max(sync[who]["rss_kib"]) / 1024
        out["db_mb"] = median(sync[who]["bytes"]) / 1e6
        if "sqlite3" in sync and mine:
            out["sync_ratio"] = median(sync["sqlite3"]["seconds"]) / mine
            out["size_ratio"] = median(sync[who]["bytes"]) / median(sync["sqlite3"]["bytes"])
        if "curl" in sync and mine:
            out["job_ratio"] = median(sync["curl"]["seconds"]) / mine
    export = results.get("export", {})
    if who in export:
        out["export_s"] = median(export[who]["seconds"])
        if "curl" in export:
            out["export_ratio"] = median(export["curl"]["seconds"]) / out["export_s"]
    download = results.get("download", {})
    if who in download:
        out["download_s"] = median(download[who]["seconds"])
        if "nginx" in download:
            out["download_ratio"] = median(download["nginx"]["seconds"]) / out["download_s"]
        for export_id in (8, 9):
            if f"peak_kib_{export_id}" in download[who]:
                out[f"peak_mib_{export_id}"] = max(download[who][f"peak_kib_{export_id}"]) / 1024
    get = results.get("get", {})
    if who in get:
        out["get_rps"] = median(get[who]["rps"])
        if "nginx" in get:
            out["get_ratio"] = out["get_rps"] / median(get["nginx"]["rps"])
        out["get_added_p50_ms"] = median(get[who]["p50_ms_c1"]) - median(get["direct"]["p50_ms_c1"])
    mcp = results.get("mcp", {})
    if who in mcp:
        out["mcp_calls"] = median(mcp[who]["calls_per_s"])
        if "fastmcp" in mcp:
            out["mcp_ratio"] = out["mcp_calls"] / median(mcp["fastmcp"]["calls_per_s"])
    if who in results.get("paging", {}):
        out["paging"] = results["paging"][who]
    return out


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def verdicts(f: dict[str, Any]) -> dict[str, bool | None]:
    paging = f.get("paging") or {}
    peak8, peak9 = f.get("peak_mib_8"), f.get("peak_mib_9")
    return {
        "sync": None if "sync_ratio" not in f else f["sync_ratio"] >= 0.5,
        "size": None if "size_ratio" not in f else f["size_ratio"] <= 1.2,
        "export": None if "export_ratio" not in f else f["export_ratio"] >= 0.8,
        "download": None
        if "download_ratio" not in f or peak9 is None or peak8 is None
        else f["download_ratio"] >= 0.9 and peak9 < 100 and peak9 - peak8 < 5,
        "get": None if "get_ratio" not in f else f["get_ratio"] >= 0.15 and f.get("get_added_p50_ms", 99) <= 1.0,
        "mcp": None if "mcp_ratio" not in f else f["mcp_ratio"] >= 2.0,
        "paging": None
        if not paging or paging.get("max_ms") is None
        else paging["max_ms"] <= 50 and paging["upstream_downloads"] <= 1,
        "job": None if "job_ratio" not in f else f["job_ratio"] >= 0.5,
    }


def table(results: dict[str, Any], labels: Sequence[str]) -> list[str]:
    per = {label: figures(results, label) for label in labels}
    sync, export, download = results.get("sync", {}), results.get("export", {}), results.get("download", {})
    get, mcp = results.get("get", {}), results.get("mcp", {})
    base = {
        "sync": fmt(median(sync.get("sqlite3", {}).get("seconds")), ".2f", " s") + " (sqlite3 .import)",
        "size": fmt((median(sync.get("sqlite3", {}).get("bytes")) or 0) / 1e6 or None, ".0f", " MB"),
        "export": fmt(median(export.get("curl", {}).get("seconds")), ".2f", " s") + " (curl | gunzip)",
        "download": fmt(median(download.get("nginx", {}).get("seconds")), ".3f", " s") + " (nginx)",
        "get": fmt(median(get.get("nginx", {}).get("rps")), ",.0f", " req/s") + " (nginx)",
        "mcp": fmt(median(mcp.get("fastmcp", {}).get("calls_per_s")), ",.0f", " calls/s") + " (fastmcp)",
        "paging": "-",
        "job": fmt(median(sync.get("curl", {}).get("seconds")), ".2f", " s") + " (curl | gunzip | sqlite3)",
    }

    def cell(key: str, f: dict[str, Any]) -> str:
        paging = f.get("paging") or {}
        return {
            "sync": f"{fmt(f.get('sync_s'), '.2f', ' s')}, {fmt(f.get('sync_rss_mib'), '.0f', ' MiB')} RSS; "
            f"**{fmt(f.get('sync_ratio'))}**",
            "size": f"{fmt(f.get('db_mb'), '.0f', ' MB')}; **{fmt(f.get('size_ratio'))}x**",
            "export": f"{fmt(f.get('export_s'), '.2f', ' s')}; **{fmt(f.get('export_ratio'))}**",
            "download": f"{fmt(f.get('download_s'), '.3f', ' s')}; **{fmt(f.get('download_ratio'))}**; peak "
            f"{fmt(f.get('peak_mib_8'), '.0f')} / {fmt(f.get('peak_mib_9'), '.0f')} MiB (100 MB / 1 GB)",
            "get": f"{fmt(f.get('get_rps'), ',.0f', ' req/s')}; **{fmt(f.get('get_ratio'))}**; "
            f"+{fmt(f.get('get_added_p50_ms'), '.2f', ' ms')} p50 (c1)",
            "mcp": f"{fmt(f.get('mcp_calls'), ',.0f', ' calls/s')}; **{fmt(f.get('mcp_ratio'))}**",
            "paging": "-"
            if not paging
            else f"first {fmt(paging.get('first_s'), '.2f', ' s')}, then p50 {fmt(paging.get('p50_ms'), '.1f')} / "
            f"max **{fmt(paging.get('max_ms'), '.1f', ' ms')}** ({paging.get('pages')} pages); "
            f"{paging.get('upstream_downloads')} download(s); disk {paging.get('disk_bytes', 0) / 1e6:.0f} MB "
            f"(gzip {paging.get('gzip_bytes', 0) / 1e6:.0f} MB)",
            "job": f"{fmt(f.get('sync_s'), '.2f', ' s')}; **{fmt(f.get('job_ratio'))}**",
        }[key]

    names = {
        "sync": "`sync` of the export into SQLite",
        "size": "database size after that sync",
        "export": "`export -o file.csv`",
        "download": "REST download of the gzip",
        "get": "REST `GET /v1/export/7`, `wrk -t1 -c32`",
        "mcp": "MCP `get-export-info`, sequential, SDK client",
        "paging": "MCP `download-export` pages",
        "job": "whole job: export into a queryable database",
    }
    head = "| row | " + " | ".join(labels) + " | alternative | target | met (" + labels[-1] + ") |"
    lines = [head, "|---|" + "---|" * len(labels) + "---|---|---|"]
    for key, name in names.items():
        met = verdicts(per[labels[-1]])[key]
        mark = "-" if met is None else "yes" if met else "**no**"
        cells = [name, *(cell(key, per[label]) for label in labels), base[key], TARGETS[key], mark]
        lines.append("| " + " | ".join(c.replace(" | ", " \\| ") for c in cells) + " |")
    if "fastmcp_download" in mcp:
        found = mcp["fastmcp_download"].replace("|", "/")
        lines.append("| fastmcp's `download_export` (binary gzip) | " + "- | " * len(labels) + f"{found} | - | - |")
    return lines


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError):
        memory = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1024 / 1024:.0f} GiB"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPUs, {memory}; Linux {platform.release()}; load average {load} at the end"


def tool_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    probes = {
        "nginx": ["nginx", "-v"],
        "sqlite3": ["sqlite3", "--version"],
        "wrk": ["wrk", "--version"],
        "curl": ["curl", "--version"],
    }
    for name, argv in probes.items():
        if shutil.which(argv[0]) or (name == "nginx" and nginx_available()):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            text = (done.stdout or done.stderr).strip().splitlines()
            found[name] = text[0][:60] if text else "?"
    if FASTMCP_PYTHON.exists():
        done = subprocess.run(
            [str(FASTMCP_PYTHON), "-c", "import fastmcp; print(fastmcp.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        found["fastmcp"] = done.stdout.strip() or "?"
    return found


def render(document: dict[str, Any]) -> str:
    labels = list(document["sources"])
    settings = document["settings"]
    lines = [
        f"Run {document['started']} UTC, {document['seconds'] / 60:.0f} min: `{document['command']}`",
        "",
        f"- machine: {document['machine']}",
        "- tools: " + ", ".join(f"{k} {v}" for k, v in document["versions"].items()),
        "- trees: " + "; ".join(f"{label} = `{info}`" for label, info in document["sources"].items()),
        f"- data: {settings['rows']:,} rows, {document['gzip_mb']:.1f} MB gzip, {document['csv_mb']:.0f} MB CSV "
        f"(seed {settings['seed']}); medians of {settings['rounds']} rounds; upstream: {document['upstream']}",
        f"- placement: {document['placement']}",
        *[f"- note: {note}" for note in document["notes"]],
        "",
        *table(document["results"], labels),
        "",
        "Ratios are the alternative's time over ours (for req/s and calls/s, ours over the alternative's): above 1 "
        "we are faster. The size ratio is ours over the plain import's.",
    ]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    current = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in current or END not in current:
        current += f"\n{BEGIN}\n{END}\n"
    head, _, rest = current.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def describe(root: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return f"{root} at {done.stdout.strip() or '?'}"


# --------------------------------------------------------------------------------------------------
# The run


def run(settings: Settings) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    print(f"making the export of {settings.rows:,} rows in {settings.data} (kept for next time) ...", file=sys.stderr)
    dataset = build(settings.data, settings.rows, settings.seed, big=settings.big)
    cpus = sorted(os.sched_getaffinity(0))
    service_cpus = other_cpus = None
    if settings.pin and len(cpus) >= 2:
        service_cpus, other_cpus = {cpus[0]}, set(cpus[1:])
        placement = (
            f"servers under test (ours, nginx proxy, fastmcp) on CPU {cpus[0]}; upstream, wrk, driver on {cpus[1:]}"
        )
    else:
        placement = "no pinning"
    nginx = nginx_available()
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        workdir = Path(tmp)
        if nginx:
            upstream: Any = nginx_upstream(dataset, workdir, other_cpus)
        else:
            upstream = PythonUpstream(dataset)
        with upstream as server:
            if other_cpus:
                os.sched_setaffinity(0, other_cpus)  # the driver, and what it starts, off the service's CPU
                with contextlib.suppress(OSError):
                    for pid in getattr(server, "worker_pids", list)():
                        os.sched_setaffinity(pid, other_cpus)
            ctx = Context(settings, dataset, server.url, server.requests, workdir, service_cpus, other_cpus, nginx)
            if other_cpus:
                os.sched_setaffinity(0, set(cpus))  # the command-line rows use every CPU, like their pipelines
            try:
                if settings.wants("sync"):
                    print("sync ...", file=sys.stderr, flush=True)
                    row_sync(ctx)
                if settings.wants("export"):
                    print("export ...", file=sys.stderr, flush=True)
                    row_export(ctx)
                if other_cpus:
                    os.sched_setaffinity(0, other_cpus)
                print("servers ...", file=sys.stderr, flush=True)
                server_rows(ctx)
            except BaseException:
                if not settings.smoke:  # what was measured is kept, for a run that failed late
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    partial = RESULTS / f"{settings.label}.partial.json"
                    partial.write_text(json.dumps({"results": ctx.results, "notes": ctx.notes}, indent=1) + "\n")
                    print(f"what was measured is in {partial}", file=sys.stderr)
                raise
    return {
        "started": f"{started:%Y-%m-%d %H:%M}",
        "seconds": time.perf_counter() - clock,
        "command": shlex.join(["python", "bench/speed.py", *sys.argv[1:]]),
        "machine": machine(),
        "versions": tool_versions(),
        "sources": {
            label: describe(root) + "".join(f" + {p}" for p in settings.extra_paths.get(label, ()))
            for label, root in settings.sources.items()
        },
        "settings": {"rows": settings.rows, "rounds": settings.rounds, "seed": settings.seed},
        "gzip_mb": dataset.gzip_path.stat().st_size / 1e6,
        "csv_mb": dataset.csv_bytes / 1e6,
        "upstream": "static nginx" if nginx else "the standard library's HTTP server (nginx is not installed)",
        "placement": placement,
        "notes": ctx.notes,
        "results": ctx.results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        document = run(settings)
    except KeyboardInterrupt:
        print("interrupted: every process this benchmark started has been stopped", file=sys.stderr)
        return 130
    if settings.merge is not None:
        earlier = json.loads(settings.merge.read_text())
        kept = [row for row in earlier["results"] if row not in document["results"]]
        document["results"].update({row: earlier["results"][row] for row in kept})
        if kept:
            document["notes"].append(
                f"rows {', '.join(kept)} are from the run of {earlier['started']} UTC ({settings.merge.name}), "
                f"on {earlier['machine']}"
            )
    text = render(document)
    print(text)
    if not settings.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{settings.label}.json").write_text(json.dumps(document, indent=1) + "\n")
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
