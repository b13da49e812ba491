"""Test helpers: run the real CLI as a subprocess, and stand-in sockets for faults GoatCounter cannot produce."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from goatcounter_exports.settings import default_cache_dir
from goatcounter_exports.testbed import BINARY_NAME, find_binary

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "goatcounter_exports"
# The bundled capability (the seed, byte for byte) and official schema are the test inputs: the suite
# needs nothing outside the repository. test_spec.py pins both by their SHA-256.
SEED = PACKAGE / "capabilities" / "goatcounter-exports.yaml"
SCHEMA = PACKAGE / "spec" / "naftiko-schema-1.0.0-alpha2.json"
CLI = [sys.executable, "-m", "goatcounter_exports"]
SERVE = ["serve", "--rest-port", "0", "--mcp-port", "0"]  # any free ports: tests run beside a real service


def goatcounter_binary(name: str = BINARY_NAME) -> Path:
    """The GoatCounter that scripts/install-goatcounter installed (`main` builds MAIN_BINARY_NAME)."""
    return find_binary(cache_dir=default_cache_dir(os.environ), name=name)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment a user would have: ours, minus anything GoatCounter-related, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOATCOUNTER", "XDG_STATE"))}
    env.update(extra)
    return env


@dataclass
class Service:
    """A running `goatcounter-exports` process and the URLs it announced."""

    process: subprocess.Popen[str]
    urls: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def rest(self) -> str:
        return self.urls["REST"].rstrip("/")

    @property
    def mcp(self) -> str:
        return self.urls["MCP"]

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.reader is not None:
            self.reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.output()


def start_service(
    args: list[str], env: Mapping[str, str], want: tuple[str, ...] = ("REST", "MCP"), timeout: float = 30
) -> Service:
    """Start the CLI and wait until it announces each adapter in `want` (e.g. "REST  http://...")."""
    process = subprocess.Popen(
        [*CLI, *args], env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    service = Service(process)
    announced = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            service.lines.append(line.rstrip("\n"))
            match = re.match(r"^(REST|MCP)\s+(http://\S+)", line)
            if match:
                service.urls[match.group(1)] = match.group(2)
            if all(name in service.urls for name in want):
                announced.set()
        announced.set()

    service.reader = threading.Thread(target=pump, daemon=True)
    service.reader.start()
    if not announced.wait(timeout) or not all(name in service.urls for name in want):
        service.stop()
        raise AssertionError(f"service did not start; output:\n{service.output()}")
    return service


@contextmanager
def running(args: list[str], env: Mapping[str, str], want: tuple[str, ...] = ("REST", "MCP")) -> Iterator[Service]:
    service = start_service(args, env, want)
    try:
        yield service
    finally:
        service.stop()


def run_cli(
    args: list[str], env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=dict(env or clean_env()), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def silent_server() -> Iterator[str]:
    """A real socket that accepts connections and never answers: an upstream that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


def call_tool(url: str, name: str, arguments: dict[str, Any]) -> Any:
    """One tool call with the SDK's client over streamable HTTP."""

    from mcp import Client

    async def scenario() -> Any:
        async with Client(url) as client:
            return await client.call_tool(name, arguments)

    return asyncio.run(scenario())


def wait_for(predicate: object, timeout: float = 30, interval: float = 0.1, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def poll_export(client: httpx.Client, base: str, export_id: int, timeout: float = 60) -> dict[str, object]:
    """Poll GET /v1/export/{id} until finished_at is set (or error), like a client would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"{base}/v1/export/{export_id}")
        assert response.status_code == 200, response.text
        export: dict[str, object] = response.json()
        if export.get("error"):
            raise AssertionError(f"export failed: {export['error']}")
        if export.get("finished_at"):
            return export
        time.sleep(0.3)
    raise AssertionError(f"export {export_id} did not finish in {timeout}s")


async def poll_export_async(client: httpx.AsyncClient, export_id: int) -> dict[str, Any]:
    """`poll_export` for an in-process client whose base URL is the REST app (gives up after 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await client.get(f"/v1/export/{export_id}")
        assert response.status_code == 200, response.text
        export: dict[str, Any] = response.json()
        if export.get("error"):
            raise AssertionError(f"export failed: {export['error']}")
        if export.get("finished_at"):
            return export
        await asyncio.sleep(0.3)
    raise AssertionError(f"export {export_id} did not finish in 60s")


class RecordingProxy:
    """A reverse proxy on a real socket that records each request before passing it to the real upstream.

    Tests put it between the service and GoatCounter to prove what was (or was not) sent upstream.
    """

    def __init__(self, upstream: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.requests: list[tuple[str, str, bytes]] = []
        target = urlsplit(upstream)
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _forward(self) -> None:
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append((self.command, self.path, body))
                conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port or 80, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for name, value in answer.getheaders():
                        if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up waiting (a timeout test)
                finally:
                    conn.close()

            do_GET = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method in (None, m)]
