"""A static stand-in for GoatCounter v2.7.0 that serves finished exports, and nginx as a reverse proxy baseline.

The upstream answers only what `goatcounter-exports` asks on the export path, from files made by `_data.py`:

    GET  /status                        {"version": "v2.7.0"}            (the create body's style is learnt here)
    POST /api/v0/export                 202, export EXPORT_ID's object    (already finished: nothing to wait for)
    GET  /api/v0/export/{id}            the export object (application/json)
    GET  /api/v0/export/{id}/download   the .csv.gz file (application/gzip, with Content-Length)
    anything else                       404 {"error": "not found"}

`nginx` serves it when nginx is installed (the issue's setting: a static nginx); otherwise `PythonUpstream`, a
small threaded server of the standard library, does (the CI smoke form, where nginx is not installed). Both
listen on 127.0.0.1 only, on a free port. `NginxProxy` is nginx's `proxy_pass` in front of an upstream: the
baseline a plain reverse proxy sets. Every process is stopped when its `with` block ends, however it ends.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from _data import EXPORT_ID, Dataset
from _measure import stop_group

LOOPBACK = "127.0.0.1"
STATUS = json.dumps({"version": "v2.7.0"})
NOT_FOUND = json.dumps({"error": "not found"})
START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_listening(
    port: int, process: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"the server exited at startup ({process.returncode}):\n{text}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listened on {LOOPBACK}:{port} within {timeout:.0f} s")


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


NGINX_COMMON = """
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {access};
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    types {{ }}
    server {{
        listen {host}:{port} reuseport;
{locations}
    }}
}}
"""

UPSTREAM_LOCATIONS = """
        location = /status {{ default_type application/json; return 200 '{status}'; }}
        location = /api/v0/export {{ default_type application/json; return 202 '{created}'; }}
        location ~ ^/api/v0/export/(\\d+)$ {{ default_type application/json; alias {data}/export-$1.json; }}
        location ~ ^/api/v0/export/(\\d+)/download$ {{
            default_type application/gzip;
            add_header Content-Disposition 'attachment; filename="goatcounter-export-bench-$1.csv.gz"';
            alias {data}/export-$1.csv.gz;
        }}
        location / {{ default_type application/json; return 404 '{not_found}'; }}
"""

PROXY_LOCATIONS = """
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_max_temp_file_size 0;  # buffer in memory only: the workers may not write the temporary folder
        }}
"""


class Nginx:
    """One nginx master with one worker, started from a config written to `workdir`."""

    def __init__(self, workdir: Path, name: str, locations: str, *, upstream_block: str = "", log_access: bool) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_log = self.dir / "access.log"
        config = NGINX_COMMON.format(
            dir=self.dir,
            access=f"{self.access_log}" if log_access else "off",
            host=LOOPBACK,
            port=self.port,
            locations=locations,
        )
        if upstream_block:
            config = config.replace("    server {", upstream_block + "    server {", 1)
        self.config = self.dir / "nginx.conf"
        self.config.write_text(config)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, cpus: set[int] | None = None) -> None:
        log = self.dir / "stderr.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [nginx_binary(), "-e", str(self.dir / "error.log"), "-c", str(self.config), "-p", str(self.dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        wait_listening(self.port, self.process, log)

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def requests(self, path_suffix: str) -> int:
        """How many requests the access log holds whose path ends with `path_suffix`."""
        if not self.access_log.exists():
            return 0
        count = 0
        for line in self.access_log.read_text(errors="replace").splitlines():
            parts = line.split('"')
            if len(parts) > 1 and parts[1].split(" ")[1:2] and parts[1].split(" ")[1].endswith(path_suffix):
                count += 1
        return count

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, signal.SIGQUIT, timeout=10)  # nginx: SIGQUIT is its graceful stop


def _created(dataset: Dataset) -> str:
    return json.dumps(dataset.export_object(EXPORT_ID), separators=(",", ":"))


@contextlib.contextmanager
def nginx_upstream(dataset: Dataset, workdir: Path, cpus: set[int] | None = None) -> Iterator[Nginx]:
    locations = UPSTREAM_LOCATIONS.format(
        status=STATUS, created=_created(dataset), data=dataset.folder, not_found=NOT_FOUND
    )
    server = Nginx(workdir, "upstream", locations, log_access=True)
    try:
        server.start(cpus)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def nginx_proxy(upstream_port: int, workdir: Path, cpus: set[int] | None = None) -> Iterator[Nginx]:
    block = f"    upstream backend {{ server {LOOPBACK}:{upstream_port}; keepalive 64; }}\n"
    server = Nginx(workdir, "proxy", PROXY_LOCATIONS.format(), upstream_block=block, log_access=False)
    try:
        server.start(cpus)
        yield server
    finally:
        server.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    dataset: Dataset
    downloads: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, media: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path.split("?")[0] == "/api/v0/export":
            self._send(202, _created(self.dataset).encode())
        else:
            self._send(404, NOT_FOUND.encode())

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if path == "/status":
            self._send(200, STATUS.encode())
            return
        if parts[:3] == ["api", "v0", "export"] and len(parts) in (4, 5) and parts[3].isdigit():
            export_id = int(parts[3])
            if len(parts) == 4 and self.dataset.object_path(export_id).exists():
                self._send(200, self.dataset.object_path(export_id).read_bytes())
                return
            if len(parts) == 5 and parts[4] == "download" and self.dataset.file_path(export_id).exists():
                self.downloads.append(path)
                file = self.dataset.file_path(export_id)
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(file.stat().st_size))
                self.end_headers()
                with file.open("rb") as source:
                    shutil.copyfileobj(source, self.wfile, 256 * 1024)
                return
        self._send(404, NOT_FOUND.encode())


class PythonUpstream:
    """The same routes from the standard library's threaded HTTP server, for machines without nginx."""

    def __init__(self, dataset: Dataset) -> None:
        self.downloads: list[str] = []
        handler = type("Handler", (_Handler,), {"dataset": dataset, "downloads": self.downloads})
        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="static-upstream", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def requests(self, path_suffix: str) -> int:
        return sum(1 for path in self.downloads if path.endswith(path_suffix))

    def __enter__(self) -> PythonUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
