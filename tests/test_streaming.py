"""The download is streamed through, never buffered: proven with an upstream that holds back the end of
a large file until the client has already received its beginning (GoatCounter cannot be made to pause
mid-file, so this one upstream is a stand-in, on a real socket), and by the service's memory. The same
stand-in serves a file that does not match its export's hash, which GoatCounter cannot be made to do
while a download is running."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from .support import SERVE, Service, clean_env, running

ROW = '/a-fairly-long-path/that/repeats,Some title,0,, , ,session,0,,o,"0,0,1",,1,2026-11-26T09:03:33Z\n'
ROWS = 400_000  # about 36 MB of CSV
CSV = ("2Path,Title,Event,UserAgent,Browser,System,Session,Bot,Referrer,Referrer scheme,Screen size,"
       "Location,FirstVisit,Date\n" + ROW * ROWS).encode()  # fmt: skip
PAYLOAD = gzip.compress(CSV, compresslevel=1)
# Small enough to arrive in one read: what has arrived must flow on, not wait for the next read.
HOLD_AFTER = 16 * 1024


PAYLOAD_HASH = "sha256-" + hashlib.sha256(PAYLOAD).hexdigest()


class SlowFile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release = threading.Event()
    held = threading.Event()
    released_in_time = False  # whether the client let the rest go, having received the beginning
    export_hash = PAYLOAD_HASH

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        if self.path == "/api/v0/export/1":  # the export object, finished, as GoatCounter gives it
            export = {"id": 1, "finished_at": "2026-11-26T09:03:33Z", "num_rows": ROWS, "hash": SlowFile.export_hash}
            body = json.dumps(export).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if not self.path.endswith("/download"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Disposition", 'attachment; filename="goatcounter-export-x.csv.gz"')
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD[:HOLD_AFTER])
        self.wfile.flush()
        SlowFile.held.set()
        # The rest only once the client has seen the beginning (or, failing that, after a while).
        SlowFile.released_in_time = SlowFile.release.wait(20)
        self.wfile.write(PAYLOAD[HOLD_AFTER:])


@pytest.fixture
def slow_upstream() -> Iterator[str]:
    SlowFile.release.clear()
    SlowFile.held.clear()
    SlowFile.released_in_time = False
    SlowFile.export_hash = PAYLOAD_HASH
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowFile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        SlowFile.release.set()
        server.shutdown()
        server.server_close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak resident size
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def stream_through(service: Service, accept: str) -> tuple[int, int, int]:
    """Download; returns (bytes received before the upstream let go, total bytes, peak RSS growth KiB)."""
    before = rss_kib(service.process.pid)
    early = total = 0
    with httpx.stream(
        "GET", f"{service.rest}/v1/export/1/download", headers={"Accept": accept}, timeout=60
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():  # as it arrives (a size would wait to fill it)
            total += len(chunk)
            if not SlowFile.release.is_set():
                early = total
                if total >= HOLD_AFTER // 2:
                    SlowFile.release.set()
    return early, total, rss_kib(service.process.pid) - before


@pytest.mark.parametrize(("accept", "size"), [("application/gzip", len(PAYLOAD)), ("text/csv", len(CSV))])
def test_download_streams_in_constant_memory(slow_upstream: str, tmp_path: Path, accept: str, size: int) -> None:
    env = clean_env(
        GOATCOUNTER_URL=slow_upstream,
        GOATCOUNTER_API_KEY="k",
        GOATCOUNTER_EXPORTS_STATE_DIR=str(tmp_path),
    )
    with running(SERVE, env) as service:
        early, total, growth = stream_through(service, accept)
    assert total == size
    assert early > 0  # bytes reached the client while the upstream was still holding the rest back
    assert SlowFile.released_in_time  # ... soon enough to let the rest go, not after the upstream gave up waiting
    assert growth < 16 * 1024, f"peak memory grew by {growth} KiB for a {size // 1024} KiB body"


@pytest.mark.parametrize("accept", ["application/gzip", "text/csv"])
def test_a_file_that_does_not_match_its_hash_is_cut_short_never_delivered_whole(
    slow_upstream: str, tmp_path: Path, accept: str
) -> None:
    SlowFile.export_hash = "sha256-" + hashlib.sha256(b"another file").hexdigest()
    SlowFile.release.set()
    env = clean_env(GOATCOUNTER_URL=slow_upstream, GOATCOUNTER_API_KEY="k", GOATCOUNTER_EXPORTS_STATE_DIR=str(tmp_path))
    received = 0
    with running(SERVE, env) as service:
        url = f"{service.rest}/v1/export/1/download"
        # The connection ends before the body does.
        with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url, headers={"Accept": accept}) as answer:
            assert answer.status_code == 200
            for chunk in answer.iter_raw(64 * 1024):
                received += len(chunk)
        output = service.output()
    assert 0 < received < (len(PAYLOAD) if accept == "application/gzip" else len(CSV))
    assert "does not match" in output  # and the operator is told why
