#!/usr/bin/env python3
"""Which async HTTP client should goatcounter-exports use to call GoatCounter? Measure it.

One run of this script:

1. starts a tiny, fast upstream (a raw asyncio HTTP/1.1 server, its own process) on a free loopback
   port. It serves ``GET /small`` (a ~400 byte JSON body shaped like GoatCounter's Export object) and
   ``GET /big`` (a ~5 MB gzip file, sent as ``application/gzip`` so that no client decompresses it);
2. for each client (aiohttp.ClientSession, httpx.AsyncClient, httpx2.AsyncClient), starts a minimal
   Starlette proxy under uvicorn (one worker, its own process, free loopback port) that holds ONE
   pooled client for its lifetime and forwards ``GET /small`` (body read whole, then returned) and
   ``GET /big`` (streamed through in 64 KiB chunks);
3. drives each proxy, and the upstream directly as a baseline, with wrk on ``/small`` for a fixed
   time, then times N sequential ``/big`` downloads (checking size and SHA-256) while watching the
   proxy's resident memory;
4. prints Markdown tables: req/s, p50/p99 latency, proxy CPU per request, ratios to the best client
   and to the direct baseline, and the /big download times with the proxy's peak RSS.

Everything listens on 127.0.0.1 only. Every wait has a deadline, the children stop themselves when
this process disappears, and everything started is stopped on exit, on Ctrl-C and on SIGTERM.

Prerequisites (checked at start): Linux (/proc), ``wrk`` (``apt-get install -y wrk``) and the
Python packages starlette, uvicorn, aiohttp, httpx (httpx2 optional) in the interpreter running this.

Usage: ``.venv/bin/python bench/upstream_client.py [--duration 10] [--rounds 1] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import hashlib
import http.client
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

# The script runs as a file, so its own folder is normally first on sys.path already; not with -P/PYTHONSAFEPATH.
# The child roles re-run this file the same way, so they find the module too.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (
    LOOPBACK,
    WRK_REPORT_LUA,
    BenchError,
    PeakRss,
    Throughput,
    WrkRun,
    check_bounds,
    cpu_seconds,
    run_guarded,
    run_wrk,
    tail,
    versions,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette

CHUNK_SIZE = 64 * 1024  # what goatcounter_exports.upstream streams with
POOL_SIZE = 100  # connections per client; more than wrk's connections, so no pool churns
KEEPALIVE_S = 15.0
CLIENT_TIMEOUT_S = 30.0
ALL_CLIENTS = ("aiohttp", "httpx", "httpx2")
DIRECT = "direct"  # wrk straight at the upstream: the harness's ceiling
STATIC = "static"  # the same Starlette/uvicorn proxy answering from memory, no client: the server's ceiling
REFERENCES = (DIRECT, STATIC)
REQUIRED_MODULES = ("starlette", "uvicorn", "aiohttp", "httpx")
CHILD_START_TIMEOUT_S = 30.0
CHILD_STOP_TIMEOUT_S = 10.0
CHILD_MAX_LIFETIME_S = 30 * 60.0  # a child never outlives this, whatever happens to its parent
DOWNLOAD_TIMEOUT_S = 60.0
# The /big4 download may raise a streaming proxy's peak RSS by a bounded one-off buffer (about 3 MiB seen with
# uvloop); a buffering proxy raises it by 3 times the file or more. The verdict's threshold sits between the two.
CONSTANT_MEMORY_SLACK = 4 * 2**20

# Shaped like GoatCounter's `Export` object (GET /api/v0/export/{id}): about 400 bytes of JSON.
EXPORT_OBJECT: dict[str, object] = {
    "id": 42,
    "site_id": 1,
    "start_from_hit_id": 0,
    "last_hit_id": 1234567,
    "path": "/var/lib/goatcounter/exports/goatcounter-export-stats.example.com-2024-01-01T00-00-00Z-0.csv.gz",
    "created_at": "2024-01-01T00:00:00Z",
    "finished_at": "2024-01-01T00:00:07Z",
    "num_rows": 1234567,
    "size": "4.8",
    "hash": "sha256-" + hashlib.sha256(b"goatcounter-exports bench").hexdigest(),
    "error": None,
}

VERSIONED_PACKAGES = ("starlette", "uvicorn", "h11", "httptools", "uvloop", "aiohttp", "httpx", "httpcore", "httpx2")


# --------------------------------------------------------------------------------------------------
# Shared by the child processes


def listen_loopback() -> socket.socket:
    """A listening TCP socket on a free loopback port (the kernel picks it, so no race).

    proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and with
    the default proto=0 the accepted connections keep Nagle's algorithm. uvicorn then writes headers and
    body apart, the body waits for the client's delayed ACK, and every keep-alive request takes ~40 ms.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def announce(info: Mapping[str, object]) -> None:
    """Tell the parent we are ready: the one line a child ever writes to stdout."""
    sys.stdout.write("READY " + json.dumps(info) + "\n")
    sys.stdout.flush()


def start_watchdog(stop: Callable[[], None]) -> None:
    """Ask for a graceful stop when the parent goes away or the lifetime cap is reached; exit hard if ignored."""
    parent = os.getppid()
    deadline = time.monotonic() + CHILD_MAX_LIFETIME_S

    def watch() -> None:
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.5)
        stop()
        time.sleep(CHILD_STOP_TIMEOUT_S)
        os._exit(1)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()


# --------------------------------------------------------------------------------------------------
# The upstream: a raw asyncio HTTP/1.1 server, so that it costs far less CPU than the proxy under test


def response_head(content_type: str, length: int, extra_headers: Sequence[tuple[str, str]] = ()) -> bytes:
    headers = [("Content-Type", content_type), ("Content-Length", str(length)), ("Server", "bench-upstream")]
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in [*headers, *extra_headers]) + "\r\n"
    return head.encode("ascii")


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nnot found\n"


def make_small_body() -> bytes:
    return json.dumps(EXPORT_OBJECT, separators=(", ", ": ")).encode() + b"\n"


def make_big_body(size: int) -> bytes:
    """A valid gzip file of about `size` bytes (incompressible content, so the gzip is as large as the data)."""
    data = random.Random(1).randbytes(size)  # noqa: S311 - test data, not a secret
    return gzip.compress(data, compresslevel=1, mtime=0)


class UpstreamProtocol(asyncio.Protocol):
    """Answers GET requests from precomputed responses (written part by part); keeps connections alive."""

    def __init__(self, routes: Mapping[bytes, Sequence[bytes]]) -> None:
        self._routes = routes
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:  # one request head per turn: bounded by the data
            head = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            path = parts[1].partition(b"?")[0] if len(parts) == 3 else b""
            for part in self._routes.get(path, (NOT_FOUND,)):
                transport.write(part)
            if b"connection: close" in headers.lower() or parts[-1] == b"HTTP/1.0":
                transport.close()
                return
        if len(self._buffer) > 64 * 1024:  # no request head is that long
            transport.close()


async def run_upstream(sock: socket.socket, routes: Mapping[bytes, Sequence[bytes]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def request_stop() -> None:
        loop.call_soon_threadsafe(stop.set)

    start_watchdog(request_stop)
    server = await loop.create_server(lambda: UpstreamProtocol(routes), sock=sock)
    async with server:
        await stop.wait()


def serve_upstream(args: argparse.Namespace) -> None:
    small, big = make_small_body(), make_big_body(int(args.big_mb * 1_000_000))
    attachment = [("Content-Disposition", 'attachment; filename="export.csv.gz"')]
    big4_sha256 = hashlib.sha256()
    for _ in range(4):
        big4_sha256.update(big)
    routes: dict[bytes, Sequence[bytes]] = {
        b"/small": (response_head("application/json", len(small)) + small,),
        b"/big": (response_head("application/gzip", len(big), attachment) + big,),
        # Four times the file, still a valid gzip file (four members), for the constant-memory check.
        b"/big4": (response_head("application/gzip", 4 * len(big), attachment), big, big, big, big),
    }
    sock = listen_loopback()
    info = {
        "port": sock.getsockname()[1],
        "pid": os.getpid(),
        "small_bytes": len(small),
        "small_sha256": hashlib.sha256(small).hexdigest(),
        "big_bytes": len(big),
        "big_sha256": hashlib.sha256(big).hexdigest(),
        "big4_bytes": 4 * len(big),
        "big4_sha256": big4_sha256.hexdigest(),
    }
    announce(info)
    asyncio.run(run_upstream(sock, routes))


# --------------------------------------------------------------------------------------------------
# The proxy: Starlette + one pooled client, the way goatcounter_exports uses its upstream


@dataclass
class Streamed:
    """An upstream answer whose body is still to be read, chunk by chunk."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


class UpstreamClient(Protocol):
    async def get(self, url: str) -> tuple[int, str, bytes]: ...

    async def stream(self, url: str) -> Streamed: ...

    async def aclose(self) -> None: ...


PASSED_HEADERS = ("content-type", "content-length", "content-disposition")


def pick_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in PASSED_HEADERS if name in headers}


class AiohttpClient:
    """One aiohttp.ClientSession (with its TCPConnector pool) for the life of the app."""

    def __init__(self, default_limits: bool) -> None:
        import aiohttp

        connector = (
            aiohttp.TCPConnector()
            if default_limits
            else aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=POOL_SIZE, keepalive_timeout=KEEPALIVE_S)
        )
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def get(self, url: str) -> tuple[int, str, bytes]:
        async with self._session.get(url) as response:
            body = await response.read()
            return response.status, response.headers.get("Content-Type", "application/octet-stream"), body

    async def stream(self, url: str) -> Streamed:
        response = await self._session.get(url)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                    yield chunk
            finally:
                response.release()

        async def close() -> None:
            response.release()

        return Streamed(response.status, pick_headers(response.headers), chunks(), close)

    async def aclose(self) -> None:
        await self._session.close()


class HttpxFamilyClient:
    """One httpx.AsyncClient -- or httpx2.AsyncClient, whose API is the same -- for the life of the app."""

    def __init__(self, module_name: str, default_limits: bool) -> None:
        module = importlib.import_module(module_name)
        limits: dict[str, Any] = (
            {}
            if default_limits
            else {
                "limits": module.Limits(
                    max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE, keepalive_expiry=KEEPALIVE_S
                )
            }
        )
        # trust_env=False: no proxy from the environment may sit between the proxy and the loopback upstream.
        self._client: Any = module.AsyncClient(timeout=CLIENT_TIMEOUT_S, trust_env=False, **limits)

    async def get(self, url: str) -> tuple[int, str, bytes]:
        response = await self._client.get(url)
        return response.status_code, response.headers.get("content-type", "application/octet-stream"), response.content

    async def stream(self, url: str) -> Streamed:
        response = await self._client.send(self._client.build_request("GET", url), stream=True)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw(CHUNK_SIZE):
                    yield chunk
            finally:
                await response.aclose()

        return Streamed(response.status_code, pick_headers(response.headers), chunks(), response.aclose)

    async def aclose(self) -> None:
        await self._client.aclose()


class StaticClient:
    """No client at all: the upstream's answers, byte for byte, from memory (the proxy server's own cost)."""

    def __init__(self, big_mb: float) -> None:
        self._small = make_small_body()
        self._big = make_big_body(int(big_mb * 1_000_000))

    async def get(self, url: str) -> tuple[int, str, bytes]:
        return 200, "application/json", self._small

    async def stream(self, url: str) -> Streamed:
        repeat = 4 if url.endswith("/big4") else 1
        view = memoryview(self._big)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(repeat):
                for offset in range(0, len(view), CHUNK_SIZE):
                    yield bytes(view[offset : offset + CHUNK_SIZE])

        async def close() -> None:
            return None

        headers = {"content-type": "application/gzip", "content-length": str(repeat * len(view))}
        return Streamed(200, headers, chunks(), close)

    async def aclose(self) -> None:
        return None


def make_client(name: str, default_limits: bool, big_mb: float) -> UpstreamClient:
    if name == STATIC:
        return StaticClient(big_mb)
    if name == "aiohttp":
        return AiohttpClient(default_limits)
    if name in ("httpx", "httpx2"):
        return HttpxFamilyClient(name, default_limits)
    raise ValueError(f"unknown client {name!r}")


def build_proxy_app(
    client_name: str, upstream: str, default_limits: bool, big_mb: float, on_started: Callable[[], None]
) -> Starlette:
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    client: UpstreamClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        client = make_client(client_name, default_limits, big_mb)  # created inside the server's event loop
        on_started()
        try:
            yield
        finally:
            await client.aclose()

    async def small(request: Request) -> Response:
        assert client is not None
        status, content_type, body = await client.get(upstream + "/small")
        return Response(body, status_code=status, media_type=content_type)

    async def big(request: Request) -> Response:
        assert client is not None
        answer = await client.stream(upstream + request.url.path)
        return StreamingResponse(
            answer.chunks, status_code=answer.status, headers=answer.headers, background=BackgroundTask(answer.close)
        )

    return Starlette(routes=[Route("/small", small), Route("/big", big), Route("/big4", big)], lifespan=lifespan)


def serve_proxy(args: argparse.Namespace) -> None:
    import uvicorn

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    sock = listen_loopback()
    config: uvicorn.Config | None = None

    def on_started() -> None:
        assert config is not None
        loop = type(asyncio.get_running_loop())
        announce(
            {
                "port": sock.getsockname()[1],
                "pid": os.getpid(),
                "loop": f"{loop.__module__}.{loop.__qualname__}",
                "http": getattr(config.http_protocol_class, "__name__", str(config.http_protocol_class)),
            }
        )

    app = build_proxy_app(args.client, args.upstream, args.default_limits, args.big_mb, on_started)
    config = uvicorn.Config(
        app,
        loop=args.loop,
        http=args.http,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    start_watchdog(lambda: setattr(server, "should_exit", True))
    server.run(sockets=[sock])


# --------------------------------------------------------------------------------------------------
# The driver: starts the children, measures, prints


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    info: dict[str, Any]
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def pid(self) -> int:
        return self.process.pid


def read_ready_line(process: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    """Read the child's READY line, giving up at `deadline` or when the child dies."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    data = b""
    while b"\n" not in data:
        if time.monotonic() > deadline:
            raise BenchError("timed out waiting for the child to start")
        if process.poll() is not None:
            raise BenchError(f"the child exited with status {process.returncode} before it was ready")
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        if not chunk:
            time.sleep(0.02)
        data += chunk
    line = data.split(b"\n", 1)[0].decode()
    if not line.startswith("READY "):
        raise BenchError(f"unexpected first line from the child: {line[:200]!r}")
    info: dict[str, Any] = json.loads(line.removeprefix("READY "))
    return info


def stop_child(child: Child) -> None:
    process = child.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=CHILD_STOP_TIMEOUT_S)
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def running_child(name: str, argv: Sequence[str], workdir: Path) -> Iterator[Child]:
    """Run this script in a child role; always stop it when the block ends."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
    child = Child(name, process, {}, log_path)
    try:
        try:
            child.info = read_ready_line(process, time.monotonic() + CHILD_START_TIMEOUT_S)
        except BenchError as error:
            raise BenchError(f"{name}: {error}\n{tail(log_path)}") from None
        yield child
    finally:
        stop_child(child)


def http_get(port: int, path: str, sink: bytearray | None = None) -> tuple[int, int, str]:
    """GET http://127.0.0.1:port/path with the standard library; returns (status, bytes, sha256)."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=DOWNLOAD_TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        digest = hashlib.sha256()
        buffer = sink if sink is not None else bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        total = 0
        while n := response.readinto(view):
            digest.update(view[:n])
            total += n
        return response.status, total, digest.hexdigest()
    finally:
        connection.close()


def check_small(port: int, upstream: dict[str, Any], what: str) -> None:
    """The proxy must answer exactly what the upstream sends, or the numbers mean nothing.
    (/big is checked on every timed download.)"""
    status, size, digest = http_get(port, "/small")
    if (status, size, digest) != (200, upstream["small_bytes"], upstream["small_sha256"]):
        raise BenchError(f"{what}: GET /small answered {status} with {size} bytes (sha256 {digest[:12]}...)")


@dataclass
class BigResult(Throughput):
    seconds: list[float]
    size: int
    rss_before_kib: int | None = None  # proxy RSS just before the first /big
    rss_peak_kib: int | None = None  # peak proxy RSS during the N /big downloads
    rss_extra_4x_kib: int | None = None  # how much higher the peak went while streaming a body 4x as large
    rss_method: str = ""


def download(port: int, path: str, upstream: dict[str, Any], sink: bytearray) -> float:
    """Seconds to GET one large file; it must be byte for byte the upstream's."""
    key = path.removeprefix("/")
    started = time.perf_counter()
    status, size, digest = http_get(port, path, sink)
    elapsed = time.perf_counter() - started
    if (status, size, digest) != (200, upstream[f"{key}_bytes"], upstream[f"{key}_sha256"]):
        raise BenchError(f"GET {path} answered {status} with {size} bytes (sha256 {digest[:12]}...), not the file")
    return elapsed


def time_downloads(port: int, pid: int | None, count: int, upstream: dict[str, Any]) -> BigResult:
    """N sequential /big downloads; for a proxy, with its peak RSS, then once more with a 4x body."""
    sink = bytearray(CHUNK_SIZE)
    result = BigResult(seconds=[], size=upstream["big_bytes"])
    if pid is None:
        result.seconds = [download(port, "/big", upstream, sink) for _ in range(count)]
        return result
    with PeakRss(pid) as rss:
        result.seconds = [download(port, "/big", upstream, sink) for _ in range(count)]
    with PeakRss(pid) as rss4:
        download(port, "/big4", upstream, sink)
    result.rss_before_kib, result.rss_peak_kib, result.rss_method = rss.before_kib, rss.peak_kib, rss.method
    result.rss_extra_4x_kib = max(0, rss4.peak_kib - rss.peak_kib)
    return result


@dataclass
class Measurement:
    target: str
    round: int
    small: WrkRun
    cpu_us_per_request: float | None
    big: BigResult
    server: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    clients: list[str]
    duration: int
    warmup: int
    threads: int
    connections: int
    big_count: int
    big_mb: float
    rounds: int
    static: bool
    pin: bool
    default_limits: bool
    http: str
    loop: str


def measure(
    target: str, round_no: int, port: int, pid: int | None, settings: Settings, lua: Path, upstream: dict[str, Any]
) -> Measurement:
    check_small(port, upstream, target)
    url, threads, connections = f"http://{LOOPBACK}:{port}/small", settings.threads, settings.connections
    if settings.warmup:
        run_wrk(url, lua, settings.warmup, threads, connections, new_session=True)
    cpu_before = cpu_seconds(pid) if pid else 0.0
    small = run_wrk(url, lua, settings.duration, threads, connections, new_session=True)
    cpu_per_request = (cpu_seconds(pid) - cpu_before) / small.requests * 1e6 if pid and small.requests else None
    big = time_downloads(port, pid, settings.big_count, upstream)
    return Measurement(target, round_no, small, cpu_per_request, big)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "?"


def check_prerequisites(clients: Sequence[str], explicit: bool) -> tuple[list[str], list[str], list[str]]:
    """Returns (problems, notes, clients to run)."""
    problems: list[str] = []
    notes: list[str] = []
    install = f"{Path(sys.executable).parent / 'uv'} pip install -p {sys.executable}"
    if not Path("/proc/self/status").exists():
        problems.append("this benchmark reads /proc: run it on Linux")
    if shutil.which("wrk") is None:
        problems.append("wrk (the load generator) is not on PATH: apt-get update && apt-get install -y wrk")
    for module in REQUIRED_MODULES:
        if importlib.util.find_spec(module) is None:
            problems.append(f"Python package {module} is missing: {install} {module}")
    runnable: list[str] = []
    for client in clients:
        if client == "httpx" and importlib.util.find_spec("sniffio") is None:
            notes.append(
                "sniffio is not installed (anyio 4.16 no longer pulls it in), so httpcore 1.x retries a failing"
                " `import sniffio` several times per request: httpx is measured as a fresh install gets it;"
                " put sniffio on PYTHONPATH to measure it without that cost (bench/README.md)"
            )
        if client == "httpx2":
            if importlib.util.find_spec("httpx2") is None:
                message = f"httpx2 is not installed ({install} httpx2)"
                (problems if explicit else notes).append(message + ("" if explicit else ": skipped"))
                continue
            httpx2 = importlib.import_module("httpx2")
            needed = ("AsyncClient", "Limits")
            client_api = ("get", "send", "build_request", "aclose")
            if not all(hasattr(httpx2, n) for n in needed) or not all(
                hasattr(httpx2.AsyncClient, n) for n in client_api
            ):
                notes.append("httpx2's API differs from httpx's (no AsyncClient/Limits/send/...): skipped")
                continue
            notes.append(f"httpx2 {importlib.metadata.version('httpx2')}: same async API as httpx, benchmarked")
        runnable.append(client)
    return problems, notes, runnable


def fmt_ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 else "-"


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(measurements: Sequence[Measurement], settings: Settings, server_info: Mapping[str, str]) -> str:
    targets = [*REFERENCES, *settings.clients]
    by_target = {t: [m for m in measurements if m.target == t] for t in targets}
    by_target = {t: ms for t, ms in by_target.items() if ms}
    rps = {t: median_of([m.small.rps for m in ms]) for t, ms in by_target.items()}
    mbps = {t: median_of([m.big.mb_per_s for m in ms]) for t, ms in by_target.items()}
    clients = [t for t in by_target if t not in REFERENCES]
    best_rps = max((rps[t] for t in clients), default=0.0)
    best_mbps = max((mbps[t] for t in clients), default=0.0)
    direct_rps, direct_mbps = rps.get(DIRECT, 0.0), mbps.get(DIRECT, 0.0)
    many = settings.rounds > 1
    lines = [
        f"/small: wrk {settings.threads} threads, {settings.connections} connections, {settings.duration} s"
        f" (after {settings.warmup} s warm-up){'; median of ' + str(settings.rounds) + ' rounds' if many else ''}",
        "",
        "| target | req/s | p50 ms | p99 ms | errors | vs best client | vs direct | proxy CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, ms in by_target.items():
        cpu = [m.cpu_us_per_request for m in ms if m.cpu_us_per_request is not None]
        lines.append(
            f"| {target} | {rps[target]:,.0f} | {median_of([m.small.p50_ms for m in ms]):.2f}"
            f" | {median_of([m.small.p99_ms for m in ms]):.2f} | {sum(m.small.errors for m in ms)}"
            f" | {fmt_ratio(rps[target], best_rps) if target not in REFERENCES else '-'}"
            f" | {fmt_ratio(rps[target], direct_rps)} | {f'{median_of(cpu):.0f}' if cpu else '-'} |"
        )
    size = next(iter(by_target.values()))[0].big.size
    lines += [
        "",
        f"/big: {settings.big_count} sequential downloads of {size / 1e6:.1f} MB per target and round, then one"
        f" of {4 * size / 1e6:.0f} MB (size and SHA-256 of each checked). Proxy RSS: just before the first /big,"
        f" peak during the /big downloads, and how much higher it peaked for the {4 * size / 1e6:.0f} MB body"
        " (a proxy that buffers needs 3 x the file more or worse; one that streams, at most a bounded one-off"
        f" buffer: 'constant memory' means under {max(size, CONSTANT_MEMORY_SLACK) / 2**20:.1f} MiB)",
        "",
        "| target | median s | MB/s | vs best client | vs direct | RSS before MiB | peak MiB | +peak for 4x MiB"
        " | constant memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    leaky: list[str] = []
    for target, ms in by_target.items():
        befores = [m.big.rss_before_kib for m in ms if m.big.rss_before_kib is not None]
        peaks = [m.big.rss_peak_kib for m in ms if m.big.rss_peak_kib is not None]
        extras = [m.big.rss_extra_4x_kib for m in ms if m.big.rss_extra_4x_kib is not None]
        if befores and peaks and extras:
            constant = max(extras) * 1024 < max(size, CONSTANT_MEMORY_SLACK)
            if not constant:
                leaky.append(target)
            verdict = "yes" if constant else "NO"
            rss = f"{max(befores) / 1024:.1f} | {max(peaks) / 1024:.1f} | {max(extras) / 1024:.2f} | {verdict}"
        else:
            rss = "- | - | - | -"
        lines.append(
            f"| {target} | {median_of([m.big.median_s for m in ms]):.3f} | {mbps[target]:,.0f}"
            f" | {fmt_ratio(mbps[target], best_mbps) if target not in REFERENCES else '-'}"
            f" | {fmt_ratio(mbps[target], direct_mbps)} | {rss} |"
        )
    lines.append("")
    if clients:
        ranked = sorted(clients, key=lambda t: rps[t], reverse=True)
        lead = (rps[ranked[0]] / rps[ranked[1]] - 1) * 100 if len(ranked) > 1 and rps[ranked[1]] > 0 else 0.0
        lines.append(
            f"Fastest on /small: {ranked[0]}"
            + (f", {lead:.0f}% more req/s than {ranked[1]}" if len(ranked) > 1 else "")
            + (" (under 5%: within run-to-run noise, run again)" if len(ranked) > 1 and lead < 5 else "")
        )
    for target in leaky:
        lines.append(f"WARNING: {target}'s memory grew with the body size during /big4: it buffers, not streams")
    if server_info:
        lines.append(f"Proxy server: uvicorn, 1 worker, loop {server_info.get('loop')}, http {server_info.get('http')}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    choices = ", ".join(ALL_CLIENTS)
    parser.add_argument("--clients", default=",".join(ALL_CLIENTS), help=f"comma-separated, of: {choices}")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per measurement (1-120)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measurement (0-30)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (1-16)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (1-1000)")
    parser.add_argument("--big-count", type=int, default=10, help="sequential /big downloads per target (1-50)")
    parser.add_argument("--big-mb", type=float, default=5.0, help="size of the /big gzip file in MB (0.1-100)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, order rotated; medians (1-5)")
    parser.add_argument(
        "--no-static", dest="static", action="store_false", help="skip the reference proxy that answers from memory"
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the proxy to its own CPU")
    parser.add_argument(
        "--default-limits", action="store_true", help=f"use each client's default pool, not {POOL_SIZE} keep-alive"
    )
    parser.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"), help="uvicorn --http")
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="uvicorn --loop")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    bounds = {
        "duration": (1, 120),
        "warmup": (0, 30),
        "threads": (1, 16),
        "connections": (1, 1000),
        "big_count": (1, 50),
        "big_mb": (0.1, 100),
        "rounds": (1, 5),
    }
    check_bounds(parser, args, bounds)
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = sorted(set(args.clients) - set(ALL_CLIENTS))
    if unknown or not args.clients:
        parser.error(f"unknown clients {unknown}; choose from {', '.join(ALL_CLIENTS)}")
    return args


def run(args: argparse.Namespace, out: IO[str]) -> int:
    explicit = args.clients != list(ALL_CLIENTS)
    problems, notes, clients = check_prerequisites(args.clients, explicit)
    if problems:
        print("Missing prerequisites:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    settings = Settings(
        clients=clients,
        duration=args.duration,
        warmup=args.warmup,
        threads=args.threads,
        connections=args.connections,
        big_count=args.big_count,
        big_mb=args.big_mb,
        rounds=args.rounds,
        static=args.static,
        pin=args.pin,
        default_limits=args.default_limits,
        http=args.http,
        loop=args.loop,
    )
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu: int | None = None
    if settings.pin and len(cpus) >= 2:
        proxy_cpu = cpus[0]
        os.sched_setaffinity(0, set(cpus[1:]))  # we, the upstream and wrk stay off the proxy's CPU
        placement = f"proxy pinned to CPU {proxy_cpu}; upstream, wrk and this driver on CPUs {cpus[1:]}"
    else:
        placement = f"no pinning ({len(cpus)} CPUs shared by proxy, upstream, wrk and driver)"

    started = dt.datetime.now(dt.UTC)
    found = versions(VERSIONED_PACKAGES)
    print(f"# upstream client benchmark, {started:%Y-%m-%d %H:%M} UTC", file=out)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {placement}", file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), file=out)
    pool = "library defaults" if settings.default_limits else f"{POOL_SIZE} connections kept alive {KEEPALIVE_S:.0f} s"
    print(f"client pool: {pool}; timeout {CLIENT_TIMEOUT_S:.0f} s; chunks {CHUNK_SIZE // 1024} KiB", file=out)
    for note in notes:
        print("note: " + note, file=out)
    print(file=out, flush=True)

    measurements: list[Measurement] = []
    server_info: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upstream-client-") as tmp:
        workdir = Path(tmp)
        lua = workdir / "report.lua"
        lua.write_text(WRK_REPORT_LUA)
        with running_child("upstream", ["_upstream", f"--big-mb={settings.big_mb}"], workdir) as upstream:
            base = f"http://{LOOPBACK}:{upstream.port}"
            targets = [DIRECT, *([STATIC] if settings.static else []), *settings.clients]
            for round_no in range(settings.rounds):
                shift = round_no % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    print(f"round {round_no + 1}/{settings.rounds}: {target} ...", file=out, flush=True)
                    if target == DIRECT:
                        measurements.append(
                            measure(target, round_no, upstream.port, None, settings, lua, upstream.info)
                        )
                        continue
                    argv = ["_proxy", f"--client={target}", f"--upstream={base}", f"--big-mb={settings.big_mb}"]
                    argv += [f"--http={settings.http}"]
                    argv += [f"--loop={settings.loop}", *(["--default-limits"] if settings.default_limits else [])]
                    argv += [f"--cpu={proxy_cpu}"] if proxy_cpu is not None else []
                    with running_child(f"proxy-{target}", argv, workdir) as proxy:
                        server_info = {"loop": proxy.info["loop"], "http": proxy.info["http"]}
                        measurement = measure(target, round_no, proxy.port, proxy.pid, settings, lua, upstream.info)
                        measurement.server = server_info
                        measurements.append(measurement)
    print(file=out)
    print(report(measurements, settings, server_info), file=out)
    print(f"\n(took {(dt.datetime.now(dt.UTC) - started).total_seconds():.0f} s)", file=out)
    if args.json:
        document = {
            "started": started.isoformat(),
            "argv": sys.argv,
            "versions": found,
            "placement": placement,
            "settings": asdict(settings),
            "measurements": [asdict(m) for m in measurements],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


def child_main(role: str, argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"upstream_client.py {role}")
    if role == "_upstream":
        parser.add_argument("--big-mb", type=float, required=True)
        serve_upstream(parser.parse_args(argv))
    else:
        parser.add_argument("--client", required=True, choices=(*ALL_CLIENTS, STATIC))
        parser.add_argument("--big-mb", type=float, required=True)
        parser.add_argument("--upstream", required=True)
        parser.add_argument("--http", default="auto")
        parser.add_argument("--loop", default="auto")
        parser.add_argument("--default-limits", action="store_true")
        parser.add_argument("--cpu", type=int)
        serve_proxy(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_upstream", "_proxy"):
        child_main(argv[0], argv[1:])
        return 0
    args = parse_args(argv)
    return run_guarded(lambda: run(args, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
