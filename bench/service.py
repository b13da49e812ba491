"""Benchmark goatcounter-exports itself against a real GoatCounter, as ratios to GoatCounter measured directly.

One run, everything on 127.0.0.1, every step bounded:

1. start a real GoatCounter (the project's launcher, `goatcounter_exports.testbed`) with its rate limits lifted, seed it
   with pageviews (default 20,000, in batches) and create one export directly, then wait until it is finished;
2. start `.venv/bin/goatcounter-exports serve --rest-port 0 --mcp-port 0` against it, as a subprocess;
3. check that both paths answer the same export, byte for byte for the downloads;
4. wrk (2 threads, 32 connections, 10 s after a 2 s warm-up): GET /api/v0/export/{id} on GoatCounter (direct),
   then GET /v1/export/{id} through our REST adapter: req/s, p50, p99, errors, CPU per request;
5. N sequential full downloads, direct (/api/v0/export/{id}/download) and ours (/v1/export/{id}/download, as gzip
   and with `Accept: text/csv`, decompressed by the service), with the service's peak RSS;
6. N sequential `tools/call get-export-info` with the MCP SDK client, against N sequential GETs of the same
   export from Python clients (aiohttp; httpx2, the SDK's own transport) through REST and direct.

By default the service is pinned to the first CPU, and GoatCounter, wrk and this driver to the others, so the
single-threaded service has one core to itself and the direct baseline runs on the same cores in both cases.

Prerequisites (checked at start, with a hint when missing): Linux, wrk (`apt-get install -y wrk`), GoatCounter
(`scripts/install-goatcounter`) and the project's .venv (`scripts/bootstrap`). Run from the repository root:

    .venv/bin/python bench/service.py            # about 1.5 min
    .venv/bin/python bench/service.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import gzip
import hashlib
import http.client
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# The script runs as a file, so its own folder is normally first on sys.path already; not with -P/PYTHONSAFEPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (
    LOOPBACK,
    STOP_TIMEOUT_S,
    WRK_REPORT_LUA,
    BenchError,
    PeakRss,
    Throughput,
    check_bounds,
    cpu_seconds,
    run_guarded,
    run_wrk,
    stop_group,
    tail,
    versions,
)

REPO = Path(__file__).resolve().parent.parent
SERVICE_BIN = REPO / ".venv" / "bin" / "goatcounter-exports"
# The launcher's default (NO_RATELIMIT) still allows 1,000 API calls a second, and wrk asks GoatCounter for ~7,000:
# the direct baseline would mostly measure 429s, and our service would wait them out. Lift the API limit for real.
RATELIMIT = "export:1000/1,api:100000000/1,api-count:100000000/1"
SEED_BATCH = 2000  # pageviews per gc.seed call (it posts them 500 at a time and waits until stored)
SERVICE_START_TIMEOUT_S = 60.0
EXPORT_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 60.0
CHUNK = 64 * 1024
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
VERSIONED_PACKAGES = ("goatcounter-exports", "starlette", "uvicorn", "aiohttp", "mcp", "httpx2")

# `--tcp-nodelay` (an A/B experiment, not the shipped service): start the service with its listening sockets created
# as IPPROTO_TCP. asyncio sets TCP_NODELAY on accepted connections only when the listener's proto says TCP, and
# goatcounter_exports.server.bind() creates it with proto 0 (see bench/README.md, "uvicorn ... stalls").
NODELAY_SHIM = """
import socket, sys, types
from goatcounter_exports import server
shim = types.ModuleType("socket")
shim.__dict__.update(socket.__dict__)
shim.socket = lambda family=-1, kind=-1, proto=0, fileno=None: socket.socket(
    family, kind, proto or socket.IPPROTO_TCP, fileno)
server.socket = shim
from goatcounter_exports.cli import main
sys.argv = ["goatcounter-exports", *sys.argv[1:]]
main()
"""

WRK_LUA = (
    r"""
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTHORIZATION")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
"""
    + WRK_REPORT_LUA
)


# --------------------------------------------------------------------------------------------------
# Settings and prerequisites


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    threads: int
    connections: int
    downloads: int
    pageviews: int
    calls: int
    pin: bool
    service_command: tuple[str, ...]


BOUNDS: dict[str, tuple[int, int]] = {
    "duration": (1, 60),
    "warmup": (0, 10),
    "threads": (1, 8),
    "connections": (1, 256),
    "downloads": (1, 50),
    "pageviews": (500, 200_000),
    "calls": (10, 5000),
}


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per target (1-60)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measurement (0-10)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (1-8)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (1-256)")
    parser.add_argument("--downloads", type=int, default=5, help="sequential full downloads per path (1-50)")
    parser.add_argument("--pageviews", type=int, default=20_000, help="pageviews seeded into the export (500-200000)")
    parser.add_argument("--calls", type=int, default=300, help="sequential MCP / REST calls per client (10-5000)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the service to its own CPU")
    parser.add_argument(
        "--service-command",
        default=str(SERVICE_BIN),
        help="how to start the service, before `serve ...` (for A/B runs and profiling; default: %(default)s)",
    )
    parser.add_argument(
        "--tcp-nodelay",
        action="store_true",
        help="A/B: run the service with TCP_NODELAY on its accepted connections (a bench-only patch, see the code)",
    )
    args = parser.parse_args(argv)
    check_bounds(parser, args, BOUNDS)
    command = tuple(shlex.split(args.service_command))
    if not command:
        parser.error("--service-command must not be empty")
    if args.tcp_nodelay:
        if args.service_command != str(SERVICE_BIN):
            parser.error("--tcp-nodelay and --service-command cannot be combined")
        command = (str(REPO / ".venv" / "bin" / "python"), "-c", NODELAY_SHIM)
    if "/" in command[0]:  # the service runs in a temporary directory: make a relative path absolute
        command = (os.path.abspath(command[0]), *command[1:])
    return Settings(**{name: getattr(args, name) for name in (*BOUNDS, "pin")}, service_command=command)


def goatcounter_binary() -> Path:
    """The GoatCounter that scripts/install-goatcounter installed (the launcher moved to testbed.py)."""
    from goatcounter_exports.settings import default_cache_dir
    from goatcounter_exports.testbed import find_binary

    return find_binary(cache_dir=default_cache_dir(os.environ))


def check_prerequisites() -> list[str]:
    """What is missing, each with how to install it."""
    problems: list[str] = []
    if not Path("/proc/self/status").exists():
        problems.append("Linux with /proc is needed (CPU time and RSS are read from it)")
    if shutil.which("wrk") is None:
        problems.append("wrk is not on PATH: apt-get update && apt-get install -y wrk")
    if not os.access(SERVICE_BIN, os.X_OK):
        problems.append(f"{SERVICE_BIN} is missing: run scripts/bootstrap (or scripts/run) first")
    for module in ("goatcounter_exports", "aiohttp", "httpx2", "mcp"):
        try:
            __import__(module)
        except ImportError:
            problems.append(f"python module {module!r} is missing: run this with .venv/bin/python")
    if not problems:
        from goatcounter_exports.errors import GoatCounterNotInstalled

        try:
            goatcounter_binary()
        except GoatCounterNotInstalled as exc:
            problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------------------------------
# Processes: CPU time, memory, the service


def goatcounter_pid(binary: Path) -> int:
    """Our GoatCounter child, found in /proc (the launcher keeps its process private)."""
    me = os.getpid()
    for child in Path(f"/proc/{me}/task/{me}/children").read_text().split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/exe").resolve() == binary.resolve():
                return int(child)
    raise BenchError("cannot find the GoatCounter process among this driver's children")


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """Runs in the service's process before exec: its own CPU, and SIGTERM when this driver dies."""

    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    rest: str  # http://127.0.0.1:PORT
    mcp: str  # http://127.0.0.1:PORT/mcp
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def rest_port(self) -> int:
        return int(self.rest.rsplit(":", 1)[1])


def log_tail(log: Path) -> str:
    return tail(log, missing=f"(no {log})")


@contextlib.contextmanager
def running_service(command: Sequence[str], gc_url: str, key: str, workdir: Path, cpu: int | None) -> Iterator[Service]:
    """`goatcounter-exports serve` on free ports; stopped (SIGTERM, then SIGKILL) however the block ends."""
    state = workdir / "state"
    state.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("GOATCOUNTER")}
    env |= {"GOATCOUNTER_URL": gc_url, "GOATCOUNTER_API_KEY": key, "GOATCOUNTER_EXPORTS_STATE_DIR": str(state)}
    log = workdir / "service.log"
    argv = [*command, "serve", "--host", LOOPBACK, "--rest-port", "0", "--mcp-port", "0"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the driver only; the driver stops the service
            preexec_fn=_child_setup(cpu),  # before any thread of ours starts
        )
    try:
        rest = mcp = ""
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while not (rest and mcp):
            if process.poll() is not None:
                raise BenchError(f"the service exited with {process.returncode} at startup:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"the service did not announce REST and MCP in {SERVICE_START_TIMEOUT_S:.0f}s")
            for line in log.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) == 2 and words[0] == "REST":
                    rest = words[1].rstrip("/")
                elif len(words) == 2 and words[0] == "MCP":
                    mcp = words[1]
            time.sleep(0.05)
        yield Service(process, rest, mcp, log)
    finally:
        stop_group(process, timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run the block (and every process it starts) on `cpus`; None: leave placement alone."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --------------------------------------------------------------------------------------------------
# GoatCounter: data and the export


def fake_pageviews(start: int, count: int) -> list[dict[str, Any]]:
    """Pageviews with some variety (unique paths and query strings), so the export compresses like a real one."""
    return [
        {
            "path": f"/blog/post-{i % 97}/{hashlib.md5(str(i).encode(), usedforsecurity=False).hexdigest()[:8]}",
            "title": f"Post number {i % 97}",
            "ref": f"https://ref{i % 13}.example.com/?q={i * 7919 % 100_003}",
            "user_agent": USER_AGENT,
        }
        for i in range(start, start + count)
    ]


def create_export(gc: Any) -> dict[str, Any]:
    """POST /api/v0/export directly, then poll until GoatCounter has finished writing it."""
    created = gc.request("POST", "/api/v0/export", key=gc.export_key, body={})
    if created.status != 202:
        raise BenchError(f"POST /api/v0/export answered {created.status}: {created.body[:300]!r}")
    export_id = int(created.json()["id"])
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while time.monotonic() < deadline:
        info = gc.request("GET", f"/api/v0/export/{export_id}", key=gc.export_key)
        if info.status != 200:
            raise BenchError(f"GET /api/v0/export/{export_id} answered {info.status}")
        document: dict[str, Any] = info.json()
        if document.get("error"):
            raise BenchError(f"export {export_id} failed: {document['error']}")
        if document.get("finished_at"):
            return document
        time.sleep(0.1)
    raise BenchError(f"export {export_id} did not finish in {EXPORT_TIMEOUT_S:.0f}s")


# --------------------------------------------------------------------------------------------------
# Blocking HTTP (stdlib) for the checks and the downloads


@dataclass(frozen=True)
class Fetched:
    status: int
    content_type: str
    size: int
    sha256: str
    body: bytes  # kept only when asked
    seconds: float


def fetch(port: int, path: str, headers: Mapping[str, str], *, keep: bool = False) -> Fetched:
    """GET http://127.0.0.1:PORT/path on a fresh connection, streamed through SHA-256."""
    digest, kept, size = hashlib.sha256(), bytearray(), 0
    started = time.perf_counter()
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=HTTP_TIMEOUT_S)
    try:
        connection.request("GET", path, headers=dict(headers))
        response = connection.getresponse()
        while chunk := response.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if keep:
                kept += chunk
        content_type = response.headers.get("Content-Type", "")
    finally:
        connection.close()
    return Fetched(response.status, content_type, size, digest.hexdigest(), bytes(kept), time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # connect/read/write/timeout errors and HTTP statuses >= 400
    service_cpu_us: float | None  # per request
    goatcounter_cpu_us: float  # per request


def load(
    url: str, settings: Settings, lua: Path, authorization: str, service_pid: int | None, gc_pid: int
) -> WrkResult:
    env = {**os.environ, "BENCH_AUTHORIZATION": authorization}  # not on the command line, where ps shows it
    threads, connections = settings.threads, settings.connections
    if settings.warmup:
        run_wrk(url, lua, settings.warmup, threads, connections, env=env)
    service_before = cpu_seconds(service_pid) if service_pid else 0.0
    gc_before = cpu_seconds(gc_pid)
    wrk = run_wrk(url, lua, settings.duration, threads, connections, env=env)
    requests = max(1, wrk.requests)
    return WrkResult(
        requests=wrk.requests,
        rps=wrk.rps,
        p50_ms=wrk.p50_ms,
        p99_ms=wrk.p99_ms,
        errors=wrk.errors,
        service_cpu_us=(cpu_seconds(service_pid) - service_before) / requests * 1e6 if service_pid else None,
        goatcounter_cpu_us=(cpu_seconds(gc_pid) - gc_before) / requests * 1e6,
    )


# --------------------------------------------------------------------------------------------------
# Sequential downloads


@dataclass
class DownloadResult(Throughput):
    label: str
    seconds: list[float]
    size: int
    rss_before_kib: int | None = None
    rss_peak_kib: int | None = None
    rss_method: str = ""


def time_downloads(
    label: str, port: int, path: str, headers: Mapping[str, str], want: Fetched, count: int, pid: int | None
) -> DownloadResult:
    """One untimed download (warm-up, also checked), then `count` timed ones, each checked against `want`."""

    def one() -> float:
        got = fetch(port, path, headers)
        if (got.status, got.size, got.sha256) != (200, want.size, want.sha256):
            raise BenchError(f"{label}: GET {path} answered {got.status}, {got.size} bytes, not the expected file")
        return got.seconds

    one()
    if pid is None:
        return DownloadResult(label, [one() for _ in range(count)], want.size)
    with PeakRss(pid) as rss:
        seconds = [one() for _ in range(count)]
    return DownloadResult(label, seconds, want.size, rss.before_kib, rss.peak_kib, rss.method)


# --------------------------------------------------------------------------------------------------
# Sequential calls: MCP tools/call against REST GETs


@dataclass(frozen=True)
class CallsResult:
    label: str
    seconds: list[float]
    service_cpu_us: float | None

    @property
    def per_s(self) -> float:
        return len(self.seconds) / sum(self.seconds)

    def percentile_ms(self, q: int) -> float:
        return statistics.quantiles(self.seconds, n=100, method="inclusive")[q - 1] * 1000


async def time_calls(
    label: str, call: Callable[[], Awaitable[None]], count: int, service_pid: int | None
) -> CallsResult:
    for _ in range(min(20, count)):  # warm-up: connections, caches, first-call imports
        await call()
    before = cpu_seconds(service_pid) if service_pid else 0.0
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - started)
    cpu = (cpu_seconds(service_pid) - before) / count * 1e6 if service_pid else None
    return CallsResult(label, seconds, cpu)


async def sequential_calls(
    service: Service, gc_base: str, key: str, export: Mapping[str, Any], count: int
) -> list[CallsResult]:
    import aiohttp
    import httpx2

    from mcp import Client

    export_id = int(export["id"])
    rest_url = f"{service.rest}/v1/export/{export_id}"
    direct_url = f"{gc_base}/api/v0/export/{export_id}"
    direct_headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def check(document: Any, via: str) -> None:
        if not isinstance(document, dict) or document.get("id") != export_id:
            raise BenchError(f"{via} did not answer export {export_id}: {str(document)[:300]}")

    results: list[CallsResult] = []
    async with Client(service.mcp) as client:

        async def mcp_call() -> None:
            result = await client.call_tool("get-export-info", {"id": export_id})
            if result.is_error:
                raise BenchError(f"MCP get-export-info failed: {str(result.content)[:300]}")
            check(result.structured_content, "MCP get-export-info")

        results.append(await time_calls("MCP tools/call get-export-info (SDK client)", mcp_call, count, service.pid))

    async with aiohttp.ClientSession() as session:

        async def aiohttp_get(url: str, headers: Mapping[str, str]) -> None:
            async with session.get(url, headers=dict(headers)) as response:
                if response.status != 200:
                    raise BenchError(f"GET {url} answered {response.status}")
                check(await response.json(), f"GET {url}")

        results.append(
            await time_calls(
                "REST GET /v1/export/{id} (aiohttp)", lambda: aiohttp_get(rest_url, {}), count, service.pid
            )
        )
        results.append(
            await time_calls(
                "direct GET /api/v0/export/{id} (aiohttp)",
                lambda: aiohttp_get(direct_url, direct_headers),
                count,
                None,
            )
        )

    async with httpx2.AsyncClient(trust_env=False) as httpx_client:

        async def httpx_get() -> None:
            response = await httpx_client.get(rest_url)
            if response.status_code != 200:
                raise BenchError(f"GET {rest_url} answered {response.status_code}")
            check(response.json(), f"GET {rest_url}")

        results.append(await time_calls("REST GET /v1/export/{id} (httpx2)", httpx_get, count, service.pid))
    return results


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class Report:
    started: dt.datetime
    settings: Settings
    placement: str
    versions: dict[str, str]
    export: dict[str, Any] = field(default_factory=dict)
    gz_bytes: int = 0
    csv_bytes: int = 0
    seed_s: float = 0.0
    wrk: dict[str, WrkResult] = field(default_factory=dict)
    downloads: list[DownloadResult] = field(default_factory=list)
    calls: list[CallsResult] = field(default_factory=list)


def check_same_export(service: Service, gc_port: int, export_id: int, direct_headers: Mapping[str, str]) -> None:
    direct = fetch(gc_port, f"/api/v0/export/{export_id}", direct_headers, keep=True)
    ours = fetch(service.rest_port, f"/v1/export/{export_id}", {}, keep=True)
    if direct.status != 200 or ours.status != 200:
        raise BenchError(f"GET export info: direct answered {direct.status}, ours {ours.status}")
    mine, theirs = json.loads(ours.body), json.loads(direct.body)
    differs = [k for k in ("id", "last_hit_id", "num_rows", "hash", "finished_at") if mine.get(k) != theirs.get(k)]
    if differs:
        raise BenchError(f"our GET /v1/export/{export_id} differs from GoatCounter's in {differs}")


def run(settings: Settings, out: IO[str]) -> int:
    problems = check_prerequisites()
    if problems:
        print("Missing prerequisites:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    from goatcounter_exports.testbed import LocalGoatCounter

    cpus = sorted(os.sched_getaffinity(0))
    service_cpu: int | None = None
    others: set[int] | None = None
    if settings.pin and len(cpus) >= 2:
        service_cpu, others = cpus[0], set(cpus[1:])
        placement = f"service pinned to CPU {service_cpu}; GoatCounter, wrk and this driver on CPUs {sorted(others)}"
    else:
        placement = f"no pinning ({len(cpus)} CPUs shared by the service, GoatCounter, wrk and this driver)"
    report = Report(dt.datetime.now(dt.UTC), settings, placement, versions(VERSIONED_PACKAGES))
    print(f"# goatcounter-exports service benchmark, {report.started:%Y-%m-%d %H:%M} UTC", file=out, flush=True)
    binary = goatcounter_binary()

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp, affinity(others):
        workdir = Path(tmp)
        lua = workdir / "bench.lua"
        lua.write_text(WRK_LUA)
        with LocalGoatCounter(binary, workdir / "goatcounter", ratelimit=RATELIMIT) as gc:
            report.versions["goatcounter"] = gc.version
            gc_pid = goatcounter_pid(binary)
            gc_port = int(gc.url.rsplit(":", 1)[1])
            print(f"seeding {settings.pageviews:,} pageviews ...", file=out, flush=True)
            started = time.perf_counter()
            for start in range(0, settings.pageviews, SEED_BATCH):
                gc.seed(fake_pageviews(start, min(SEED_BATCH, settings.pageviews - start)), timeout=60)
            report.seed_s = time.perf_counter() - started
            report.export = create_export(gc)
            export_id = int(report.export["id"])
            if report.export.get("num_rows") != settings.pageviews:
                raise BenchError(
                    f"export {export_id} has {report.export.get('num_rows')} rows, not {settings.pageviews}"
                )
            authorization = f"Bearer {gc.export_key}"
            direct_headers = {"Authorization": authorization, "Content-Type": "application/json"}
            gz = fetch(gc_port, f"/api/v0/export/{export_id}/download", direct_headers, keep=True)
            if gz.status != 200:
                raise BenchError(f"direct download answered {gz.status}")
            csv = gzip.decompress(gz.body)
            want_csv = Fetched(200, "text/csv", len(csv), hashlib.sha256(csv).hexdigest(), b"", 0.0)
            report.gz_bytes, report.csv_bytes = gz.size, want_csv.size

            with running_service(settings.service_command, gc.url, gc.export_key, workdir, service_cpu) as service:
                print(f"service: REST {service.rest}, MCP {service.mcp}; checking answers ...", file=out, flush=True)
                check_same_export(service, gc_port, export_id, direct_headers)

                print("wrk: direct ...", file=out, flush=True)
                direct_url = f"{gc.base}/api/v0/export/{export_id}"
                report.wrk["direct"] = load(direct_url, settings, lua, authorization, None, gc_pid)
                print("wrk: ours ...", file=out, flush=True)
                ours_url = f"{service.rest}/v1/export/{export_id}"
                report.wrk["ours"] = load(ours_url, settings, lua, "", service.pid, gc_pid)

                print(f"downloads: {settings.downloads} x 3 ...", file=out, flush=True)
                n, pid = settings.downloads, service.pid
                gz_path, csv_accept = f"/v1/export/{export_id}/download", {"Accept": "text/csv"}
                report.downloads = [
                    time_downloads(
                        "direct .csv.gz", gc_port, f"/api/v0/export/{export_id}/download", direct_headers, gz, n, None
                    ),
                    time_downloads("ours .csv.gz", service.rest_port, gz_path, {}, gz, n, pid),
                    time_downloads("ours Accept: text/csv", service.rest_port, gz_path, csv_accept, want_csv, n, pid),
                ]

                print(f"sequential calls: {settings.calls} x 4 ...", file=out, flush=True)
                report.calls = asyncio.run(
                    sequential_calls(service, gc.base, gc.export_key, report.export, settings.calls)
                )
                if service.process.poll() is not None:
                    raise BenchError(f"the service exited during the run:\n{log_tail(service.log)}")
    print(file=out)
    print(render(report), file=out)
    print(f"\n(took {(dt.datetime.now(dt.UTC) - report.started).total_seconds():.0f} s)", file=out)
    return 0


# --------------------------------------------------------------------------------------------------
# Output


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def render(report: Report) -> str:
    s = report.settings
    lines = [
        f"machine: {os.cpu_count()} CPUs; {report.placement}",
        "service: "
        + ("TCP_NODELAY patch (--tcp-nodelay)" if "-c" in s.service_command else shlex.join(s.service_command)),
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"export {report.export['id']}: {report.export['num_rows']:,} rows, {report.gz_bytes / 1e6:.2f} MB .csv.gz, "
        f"{report.csv_bytes / 1e6:.2f} MB CSV (seeded in {report.seed_s:.0f} s)",
        "",
        f"GET export info: wrk {s.threads} threads, {s.connections} connections, {s.duration} s after {s.warmup} s "
        "warm-up",
        "",
        "| target | req/s | p50 ms | p99 ms | errors | ours/direct req/s | service CPU µs/req | GC CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    direct = report.wrk["direct"]
    for name, path in (("direct", "/api/v0/export/{id}"), ("ours", "/v1/export/{id}")):
        r = report.wrk[name]
        service_cpu = "-" if r.service_cpu_us is None else f"{r.service_cpu_us:.0f}"
        lines.append(
            f"| {name} `{path}` | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | "
            f"{ratio(r.rps, direct.rps)} | {service_cpu} | {r.goatcounter_cpu_us:.0f} |"
        )
    lines += [
        "",
        f"Full downloads: {s.downloads} sequential, each on a new connection and checked by SHA-256 (after one "
        "untimed)",
        "",
        "| path | MB | median s | MB/s | time vs direct | service RSS before MiB | peak MiB | +peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = report.downloads[0]
    for d in report.downloads:
        extra = "-" if d.rss_peak_kib is None or d.rss_before_kib is None else mib(d.rss_peak_kib - d.rss_before_kib)
        lines.append(
            f"| {d.label} | {d.size / 1e6:.2f} | {d.median_s:.3f} | {d.mb_per_s:.0f} | "
            f"{ratio(d.median_s, base.median_s)} | {mib(d.rss_before_kib)} | {mib(d.rss_peak_kib)} | {extra} |"
        )
    lines += [
        "",
        f"Sequential calls: {s.calls} after 20 warm-up calls, one client, one connection kept alive",
        "",
        "| client | calls/s | p50 ms | p99 ms | vs REST (aiohttp) | service CPU µs/call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rest = next(c for c in report.calls if c.label.startswith("REST") and "aiohttp" in c.label)
    for c in report.calls:
        cpu = "-" if c.service_cpu_us is None else f"{c.service_cpu_us:.0f}"
        lines.append(
            f"| {c.label} | {c.per_s:,.0f} | {c.percentile_ms(50):.2f} | {c.percentile_ms(99):.2f} | "
            f"{ratio(c.per_s, rest.per_s)} | {cpu} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_guarded(lambda: run(settings, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
