"""Replay recordings of a real GoatCounter main over a real socket, for CI (which cannot build main).

    with ReplayGoatCounter(FIXTURES) as replay:      # tests/fixtures/main, made by tests/record_main.py
        ...point the service at replay.url with key "recorded-export-key"...
        assert replay.unmatched == []
        assert [r for r in replay.requests if r.method == "POST"] == [...]

A ThreadingHTTPServer on 127.0.0.1 (HTTP/1.1, keep-alive), answering each request with what main
answered to the same request when it was recorded: the status, the headers that matter (Content-Type,
Content-Disposition, Retry-After, X-Rate-Limit-*, Www-Authenticate), the body byte for byte, framed as
recorded (Content-Length, or chunked like main's ZIP downloads).

A request matches a recording by method, path (the query compared as parsed pairs, so their order does
not matter), body (JSON compared as parsed values, so key order and spacing do not matter; other bodies
byte for byte; no body is its own value) and bearer token: one of the placeholders the recording uses
(`recorded-export-key`, `recorded-siteread-key`, `recorded-stats-key`), none, or any other (an unknown
token, which main answers 401 on every API path: that recorded answer is served for it). Outside
/api/ (GET /status, /api.json) main reads no token, so a request there with any token gets the answer
recorded without one.

A request recorded several times (the polls of an export, the 404-then-200 of a never-used token on
main) gets the recorded answers in order, and the last one again for every later request. A request
never recorded answers 599 `{"error": "not recorded: <method> <path> <body>"}` and is kept in
`.unmatched`; every request is kept in `.requests` as (method, path, parsed body).

Cassette format (cassette.json, beside it the binary bodies):

    {"format": 1, "goatcounter": {...}, "recorded_at": "...", "interactions": [
      {"request": {"method": "GET", "path": "/api/v0/me", "token": "recorded-export-key", "body": null},
       "response": {"status": 404, "headers": {"Content-Type": "..."}, "chunked": false,
                    "body": "{\\"error\\":\\"not found\\"}"}},
      ... a binary answer has "body_file": "export-1.zip" and "body_sha256" instead of "body" ...]}

A request's "body" is the parsed JSON (null when none), or "body_raw" holds a non-JSON body as text.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qsl, urlsplit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "main"
CASSETTE_NAME = "cassette.json"
TRUTH_NAME = "truth.json"
CASSETTE_FORMAT = 1

EXPORT_KEY = "recorded-export-key"  # perms export,count
SITEREAD_KEY = "recorded-siteread-key"  # perms export,count,site_read
STATS_KEY = "recorded-stats-key"  # perms export,count,site_read,stats
PLACEHOLDERS = (EXPORT_KEY, SITEREAD_KEY, STATS_KEY)
UNKNOWN_TOKEN = "<unknown token>"  # how a bearer token that is not a placeholder is matched

# The response headers a recording keeps (besides the framing: Content-Length or chunked).
KEPT_HEADERS = (
    "Content-Type",
    "Content-Disposition",
    "Content-Length",
    "Retry-After",
    "X-Rate-Limit-Limit",
    "X-Rate-Limit-Remaining",
    "X-Rate-Limit-Reset",
    "Www-Authenticate",
)
NOT_RECORDED = 599
_DOWNLOAD = re.compile(r"/api/v0/export/(\d+)/download")
_CHUNK = 16 * 1024

MatchKey = tuple[str, str, tuple[tuple[str, str], ...], tuple[str, str], str | None]


class ReplayRequest(NamedTuple):
    """A request the replay server received: the body parsed as JSON, None when empty, else the bytes."""

    method: str
    path: str
    body: Any


@dataclass(frozen=True)
class RecordedResponse:
    status: int
    headers: tuple[tuple[str, str], ...]  # Content-Length and Transfer-Encoding left out: framing is computed
    body: bytes
    chunked: bool


def load_cassette(directory: Path | str = FIXTURES) -> dict[str, Any]:
    """The cassette of `directory`, checked for its format."""
    data = json.loads((Path(directory) / CASSETTE_NAME).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != CASSETTE_FORMAT:
        raise ValueError(f"{directory}/{CASSETTE_NAME}: not a cassette of format {CASSETTE_FORMAT}")
    return data


def load_truth(directory: Path | str = FIXTURES) -> dict[str, Any]:
    """truth.json: GoatCounter's own counts at each phase of the recording (see tests/record_main.py)."""
    data: dict[str, Any] = json.loads((Path(directory) / TRUTH_NAME).read_text(encoding="utf-8"))
    return data


def token_class(token: str | None) -> str | None:
    """The token as matching sees it: a placeholder, None (no Authorization), or UNKNOWN_TOKEN."""
    if token is None or token in PLACEHOLDERS:
        return token
    return UNKNOWN_TOKEN


def body_key(body: bytes) -> tuple[str, str]:
    """A body as matching compares it: parsed JSON (key order and spacing ignored), else the bytes."""
    if not body:
        return ("none", "")
    try:
        value = json.loads(body)
    except ValueError:
        return ("raw", body.decode("latin-1"))
    return ("json", json.dumps(value, sort_keys=True, separators=(",", ":")))


def match_key(method: str, target: str, body: bytes, token: str | None) -> MatchKey:
    split = urlsplit(target)
    query = tuple(sorted(parse_qsl(split.query, keep_blank_values=True)))
    return (method.upper(), split.path, query, body_key(body), token_class(token))


def recorded_body(request: Mapping[str, Any]) -> bytes:
    """The bytes of a recorded request's body."""
    if request.get("body_raw") is not None:
        return str(request["body_raw"]).encode()
    if request.get("body") is None:
        return b""
    return json.dumps(request["body"]).encode()


class ReplayGoatCounter:
    """A recorded GoatCounter main, served on 127.0.0.1:<free port>; a context manager (see the module doc)."""

    def __init__(self, cassette_dir: Path | str = FIXTURES) -> None:
        self.directory = Path(cassette_dir)
        self.cassette = load_cassette(self.directory)
        self.requests: list[ReplayRequest] = []
        self.unmatched: list[ReplayRequest] = []
        self._answers: dict[MatchKey, list[RecordedResponse]] = {}
        self._served: dict[MatchKey, int] = {}
        self._overrides: dict[int, bytes] = {}
        self._unknown_token: RecordedResponse | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for interaction in self.interactions:
            request, response = interaction["request"], interaction["response"]
            key = match_key(request["method"], request["path"], recorded_body(request), request.get("token"))
            answer = self._response(response)
            self._answers.setdefault(key, []).append(answer)
            if key[4] == UNKNOWN_TOKEN and answer.status == 401 and self._unknown_token is None:
                self._unknown_token = answer

    # ------------------------------------------------------------------ what tests use

    @property
    def interactions(self) -> list[dict[str, Any]]:
        interactions: list[dict[str, Any]] = self.cassette["interactions"]
        return interactions

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("ReplayGoatCounter is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def override_download(self, export_id: int, data: bytes) -> None:
        """Serve `data` instead of the recorded file for GET /api/v0/export/{export_id}/download (fault tests)."""
        with self._lock:
            self._overrides[int(export_id)] = bytes(data)

    def export(self, export_id: int) -> dict[str, Any]:
        """The export object main answered last for GET /api/v0/export/{export_id} (the finished export)."""
        found: dict[str, Any] | None = None
        for interaction in self.interactions:
            request, response = interaction["request"], interaction["response"]
            wanted = request["method"] == "GET" and request["path"] == f"/api/v0/export/{export_id}"
            if wanted and response["status"] == 200:
                found = json.loads(response["body"])
        if found is None:
            raise KeyError(f"no recorded GET /api/v0/export/{export_id}")
        return found

    def recorded_file(self, export_id: int) -> bytes:
        """The bytes main answered to GET /api/v0/export/{export_id}/download."""
        for interaction in self.interactions:
            if interaction["request"]["path"] == f"/api/v0/export/{export_id}/download":
                return self._response(interaction["response"]).body
        raise KeyError(f"no recorded download of export {export_id}")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("ReplayGoatCounter is already started")
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="replay-goatcounter", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _response(self, response: Mapping[str, Any]) -> RecordedResponse:
        if response.get("body_file") is not None:
            body = (self.directory / str(response["body_file"])).read_bytes()
            want = response.get("body_sha256")
            if want is not None and hashlib.sha256(body).hexdigest() != want:
                raise ValueError(f"{response['body_file']}: SHA-256 differs from the cassette's body_sha256")
        else:
            body = str(response.get("body") or "").encode()
        headers = tuple(
            (str(name), str(value))
            for name, value in dict(response.get("headers") or {}).items()
            if name.lower() not in ("content-length", "transfer-encoding")
        )
        return RecordedResponse(int(response["status"]), headers, body, bool(response.get("chunked")))

    def answer(self, method: str, target: str, body: bytes, token: str | None) -> RecordedResponse:
        """What the server answers (and remembers) for one request."""
        request = ReplayRequest(method, target, _parsed(body))
        key = match_key(method, target, body, token)
        with self._lock:
            self.requests.append(request)
            answers = self._answers.get(key)
            if answers is None and not key[1].startswith("/api/"):
                # /status and /api.json: main reads no token there, so any token gets the no-auth answer.
                answers = self._answers.get((*key[:4], None))
                key = (*key[:4], None)
            unknown = key[4] == UNKNOWN_TOKEN and key[1].startswith("/api/")
            if answers is None and unknown and self._unknown_token is not None:
                return self._unknown_token
            if answers is None:
                self.unmatched.append(request)
                shown = body.decode("utf-8", errors="replace")
                error = json.dumps({"error": f"not recorded: {method} {target} {shown}".rstrip()})
                return RecordedResponse(
                    NOT_RECORDED, (("Content-Type", "application/json"),), error.encode(), chunked=False
                )
            served = self._served.get(key, 0)
            self._served[key] = served + 1
            answer = answers[min(served, len(answers) - 1)]
            download = _DOWNLOAD.fullmatch(key[1])
            if download is not None and answer.status == 200 and int(download.group(1)) in self._overrides:
                override = self._overrides[int(download.group(1))]
                answer = RecordedResponse(answer.status, answer.headers, override, answer.chunked)
            return answer


def _parsed(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return authorization  # never recorded: an unknown token
    return token.strip()


def _handler(replay: ReplayGoatCounter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls
        server_version = "replay-goatcounter"
        sys_version = ""

        def log_message(self, format: str, *args: object) -> None:
            return

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                parts: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def _handle(self) -> None:
            body = self._read_body()
            answer = replay.answer(self.command, self.path, body, _bearer(self.headers.get("Authorization")))
            reason = "Not Recorded" if answer.status == NOT_RECORDED else None
            self.send_response(answer.status, reason)
            for name, value in answer.headers:
                self.send_header(name, value)
            if answer.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(answer.body), _CHUNK):
                    piece = answer.body[start : start + _CHUNK]
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            self.wfile.flush()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    return Handler
