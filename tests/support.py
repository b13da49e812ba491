"""Test helpers: run the real CLI as a subprocess, and stand-in sockets for faults GoatCounter cannot produce."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from goatcounter_exports.settings import default_cache_dir, default_state_dir
from goatcounter_exports.testbed import BINARY_NAME, LocalGoatCounter, find_binary

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
    LEAKS.output(f"the output of {LEAKS.watch_run(args, env)}", service.output)
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
    env = dict(env or clean_env())
    label = LEAKS.watch_run(args, env)
    try:
        done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:  # what it wrote before it was killed is output too
        for name, partial in (("stdout", exc.stdout), ("stderr", exc.stderr)):
            text = partial.decode("utf-8", "surrogateescape") if isinstance(partial, bytes) else partial or ""
            LEAKS.output(f"the {name} of {label}", text)
        raise
    LEAKS.output(f"the stdout of {label}", done.stdout)
    LEAKS.output(f"the stderr of {label}", done.stderr)
    return done


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


# -- the key-leak check --------------------------------------------------------------------------------

SECRET_VARIABLE = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)$")  # an environment variable that carries a secret
SECRET_FLAGS = ("--auth-token",)
FILE_FLAGS = ("-o", "--output", "--db")  # files a command writes: export files, the synced database
MIN_SECRET = 8  # shorter values ("k", a refused "abc\tdef") would be found by chance, and prove nothing
SQLITE_SIBLINGS = ("-wal", "-shm", "-journal")
SCAN_PIECE = 1024 * 1024
GOATCOUNTER_KEYS = ("export_key", "noexport_key", "siteread_key", "stats_key")


def current_test() -> str:
    """The test running now, as pytest names it (`tests/test_x.py::test_y`), or "the session"."""
    return os.environ.get("PYTEST_CURRENT_TEST", "the session").rsplit(" (", 1)[0]


@dataclass(frozen=True)
class Leak:
    owner: str  # whose secret (never the secret itself)
    where: str  # a file, or an output

    def __str__(self) -> str:
        return f"the {self.owner} appears in {self.where}"


@dataclass
class LeakCheck:
    """Every secret the suite hands out, and everything our processes emitted or wrote that could hold one.

    Secrets: each key of each site of every LocalGoatCounter started (conftest.py hooks `start`), and each
    value of a `*_KEY`/`*_TOKEN`/`*_SECRET`/`*_PASSWORD` variable or `--auth-token` a test gives a command.
    Places: the output of every `run_cli` and `Service`, the log records of the test process, and every file
    under the state directories and databases a command or an in-process app was pointed at, and the files
    `-o`/`--db` named. GoatCounter's own working directories are never scanned: its database holds the keys
    by design (and so does the environment a process is given, which is not scanned either).
    `scan()` searches bytes, so a secret in a SQLite page or a gzip member's name is found as well as in text.
    """

    secrets: dict[str, str] = field(default_factory=dict)  # secret -> its owner
    outputs: list[tuple[str, Callable[[], str]]] = field(default_factory=list)
    places: dict[Path, str] = field(default_factory=dict)  # file or directory -> why it is watched
    ignored: set[Path] = field(default_factory=set)
    scanned_files: int = 0

    def secret(self, value: str | None, owner: str) -> None:
        if value and len(value) >= MIN_SECRET and value not in self.secrets:
            self.secrets[value] = owner

    def output(self, where: str, text: str | Callable[[], str]) -> None:
        self.outputs.append((where, text if callable(text) else (lambda: text)))

    def watch(self, path: Path, why: str) -> None:
        self.places.setdefault(Path(path).absolute(), why)

    def ignore(self, path: Path) -> None:
        self.ignored.add(Path(path).absolute())

    def goatcounter(self, instance: LocalGoatCounter) -> None:
        """Every key of every site of a started LocalGoatCounter; its working directory is not ours to scan."""
        self.ignore(instance.workdir)
        for site in instance.sites:
            for name in GOATCOUNTER_KEYS:
                self.secret(
                    getattr(site, name), f"{name} of site {site.vhost} of the GoatCounter in {instance.workdir}"
                )

    def watch_run(self, args: Sequence[str], env: Mapping[str, str]) -> str:
        """Register what a command is given (its secrets) and where it may write; returns how to name it."""
        label = f"`goatcounter-exports {args[0] if args else ''}` run by {current_test()}"
        for name, value in env.items():
            if SECRET_VARIABLE.search(name) and os.environ.get(name) != value:
                self.secret(value, f"{name} given to {label}")
        for flag, value in _flag_values(args):
            if flag in SECRET_FLAGS:
                self.secret(value, f"{flag} given to {label}")
            elif flag in FILE_FLAGS:
                self.watch(ROOT / value, f"{flag} of {label}")
        if env.get("GOATCOUNTER_EXPORTS_STATE_DIR"):
            self.watch(Path(env["GOATCOUNTER_EXPORTS_STATE_DIR"]), f"the state directory of {label}")
        elif env.get("HOME") != os.environ.get("HOME") or env.get("XDG_STATE_HOME"):
            self.watch(default_state_dir(env), f"the default state directory of {label}")  # a HOME of the test's
        if env.get("GOATCOUNTER_EXPORTS_DB"):
            self.watch(Path(env["GOATCOUNTER_EXPORTS_DB"]), f"the database of {label}")
        return label

    def files(self) -> list[Path]:
        """Every file to scan: the watched files (with SQLite's journals), and all under the watched directories."""
        found: set[Path] = set()
        for place in self.places:
            if self._ignored(place):
                continue
            if place.is_dir():
                for folder, dirs, names in os.walk(place):
                    dirs[:] = [d for d in dirs if not self._ignored(Path(folder, d))]
                    found.update(Path(folder, n) for n in names if not os.path.islink(Path(folder, n)))
            else:
                found.update(p for p in (place, *(place.with_name(place.name + s) for s in SQLITE_SIBLINGS)))
        return sorted(p for p in found if p.is_file())

    def scan(self) -> list[Leak]:
        """Where each secret appears; empty when none leaked."""
        needles = {secret.encode(): owner for secret, owner in self.secrets.items()}
        leaks: list[Leak] = []
        for where, read in self.outputs:
            text = read().encode("utf-8", "surrogateescape")
            leaks += [Leak(owner, where) for needle, owner in needles.items() if needle in text]
        files = self.files()
        for path in files:
            leaks += [Leak(owner, str(path)) for owner in _search_file(path, needles)]
        self.scanned_files = len(files)
        return leaks

    def summary(self) -> str:
        keys = sum(1 for owner in self.secrets.values() if " of the GoatCounter in " in owner)
        return (
            f"{len(self.secrets)} secrets ({keys} GoatCounter keys, {len(self.secrets) - keys} values given to "
            f"commands) searched for in {len(self.outputs)} outputs and {self.scanned_files} files under "
            f"{len(self.places)} watched places"
        )

    def _ignored(self, path: Path) -> bool:
        return any(path == ignored or ignored in path.parents for ignored in self.ignored)


class LeakLogHandler(logging.Handler):
    """Hands every log record of the test process (its in-process apps) to a LeakCheck as an output."""

    def __init__(self, check: LeakCheck) -> None:
        super().__init__(logging.NOTSET)
        self.check = check

    def emit(self, record: logging.LogRecord) -> None:
        self.check.output(
            f"a log record ({record.name}) of the test process during {current_test()}", self.format(record)
        )


def _flag_values(args: Sequence[str]) -> Iterator[tuple[str, str]]:
    for index, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            yield flag, value
        elif index + 1 < len(args):
            yield arg, args[index + 1]


def _search_file(path: Path, needles: Mapping[bytes, str]) -> set[str]:
    """The owners of the needles found in a file, read in pieces (a needle may span two of them)."""
    found: set[str] = set()
    overlap = max((len(n) for n in needles), default=1) - 1
    tail = b""
    try:
        with path.open("rb") as stream:
            while piece := stream.read(SCAN_PIECE):
                window = tail + piece
                found.update(owner for needle, owner in needles.items() if needle in window)
                tail = window[-overlap:] if overlap else b""
    except OSError:
        pass  # gone, or unreadable: nothing our processes could read back either
    return found


# Lines the fuzzers (test_fuzz.py) report: how many inputs each target got; conftest.py prints them at the end.
FUZZ_REPORT: list[str] = []

# The suite's one check: conftest.py registers GoatCounter keys and in-process apps in it, run_cli and
# start_service what they run, and fails the session when `scan()` finds anything.
LEAKS = LeakCheck()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus text page as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
