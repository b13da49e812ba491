"""The upstream HTTP client: one pooled aiohttp session per process.

aiohttp was chosen by measurement (bench/upstream_client.py): as the client
behind a Starlette proxy it served several times the requests per second of
httpx on this kind of machine. Everything aiohttp can raise is translated here,
and only here, into `errors.Upstream*`. Messages name the upstream host, never
the URL's query or any header, so a key placed there cannot leak.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from . import __version__
from .errors import (
    ApiError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

log = logging.getLogger(__name__)

# Most bytes a streamed body hands over at once (aiohttp then buffers up to twice this per response): a 1 GB file is
# 4,000 steps of the event loop, not 16,000, and memory stays bounded.
CHUNK_SIZE = 256 * 1024
MAX_BUFFERED_BYTES = 16 * 1024 * 1024
MAX_THROTTLE_WAIT = 2.0  # seconds of Retry-After that a read waits out by itself
RETRIED_STATUSES = (429, 502, 503, 504)  # answers a read asks again about
MAX_RETRIES = 5
RETRY_DEADLINE = 8.0  # seconds a read may spend asking again, in all
FIRST_PAUSE = 0.3


def backoff(attempt: int) -> float:
    """A pause growing from FIRST_PAUSE, with jitter, so that many clients do not ask again in step."""
    base: float = min(FIRST_PAUSE * 2**attempt, MAX_THROTTLE_WAIT)
    return base * random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not a secret


USER_AGENT = f"goatcounter-exports/{__version__}"


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str
    params: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None

    @property
    def host(self) -> str:
        return host_of(self.url)

    def __repr__(self) -> str:  # headers and query may hold secrets
        return f"UpstreamRequest({self.method} {self.host}{urlsplit(self.url).path})"


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delta form; GoatCounter sends whole seconds)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2]


class UpstreamResponse:
    """A response whose body may not have been read yet. Only valid inside `UpstreamClient.stream`.

    `read()` keeps what it read, so an extension can look at a small answer and the adapter
    can still read or stream it afterwards.
    """

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        host: str,
        *,
        raw: aiohttp.ClientResponse | None = None,
        body: bytes | None = None,
        reason: str = "",
        local: bool = False,
    ) -> None:
        self.is_local = local  # made here, not by the upstream
        self.status = status
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        self.host = host
        self.reason = reason
        self._raw = raw
        self._body = body

    def copy(self) -> UpstreamResponse:
        """This answer, read whole, for another caller (only after `read()`)."""
        assert self._body is not None, "read() first"
        return UpstreamResponse(self.status, self.headers, self.host, body=self._body, reason=self.reason)

    @classmethod
    def local(cls, status: int, document: Any, headers: Mapping[str, str], host: str) -> UpstreamResponse:
        """An answer made here rather than upstream (an extension answered the call itself)."""
        body = json.dumps(document, separators=(",", ":")).encode()
        return cls(status, {**headers, "Content-Type": "application/json"}, host, body=body, local=True)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    @property
    def is_json(self) -> bool:
        return self.content_type == "application/json" or self.content_type.endswith("+json")

    @property
    def is_textual(self) -> bool:
        """JSON or text: small enough to buffer, and worth trying as JSON (GoatCounter sends
        JSON as text/plain on some answers). Binary bodies are only ever streamed."""
        return self.is_json or self.content_type.startswith("text/") or not self.content_type

    async def chunks(self, size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        if self._body is not None or self._raw is None:
            if self._body:
                yield self._body
            return
        with translate_errors(self.host):
            async for chunk in self._raw.content.iter_chunked(size):
                yield chunk

    async def read(self, limit: int = MAX_BUFFERED_BYTES) -> bytes:
        if self._body is None:
            buffer = bytearray()
            async for chunk in self.chunks():
                buffer += chunk
                if len(buffer) > limit:
                    raise UpstreamProtocolError(f"answer from {self.host} is larger than {limit} bytes", host=self.host)
            self._body = bytes(buffer)
        return self._body

    async def document(self) -> Any:
        """The JSON document of a textual or error answer (NOT_JSON when there is none); raises ApiError
        (RateLimited for a 429) for an error status, with the upstream's own message."""
        body = await self.read() if self.is_textual or self.status >= 300 else b""
        document = parse_json(body) if body else NOT_JSON
        if self.status >= 400:
            message = error_message(document) or f"{self.status} {self.reason}".strip()
            wait = retry_after(self.headers.get("Retry-After"))
            raise ApiError.of(self.status, message, retry_after=wait, local=self.is_local)
        return document


NOT_JSON: Any = object()


def error_message(document: Any) -> str | None:
    """The message of a JSON error body: `{"error": "..."}`, `{"errors": {field: [...]}}` (GoatCounter's
    two shapes), or the common `message` / `detail`."""
    if not isinstance(document, dict):
        return None
    for key in ("error", "message", "detail"):
        if isinstance(document.get(key), str):
            return str(document[key])
    if "errors" in document:
        return json.dumps(document["errors"])
    return None


def parse_json(body: bytes) -> Any:
    """`body` parsed as JSON, or NOT_JSON. Only called on bodies already known to be textual."""
    if body.lstrip()[:1] not in (b"{", b"["):  # every JSON answer of interest is an object or array
        return NOT_JSON
    try:
        return json.loads(body)
    except ValueError:
        return NOT_JSON


class _Translate:
    """Context manager mapping aiohttp/asyncio failures to our error tree (the one place that does)."""

    def __init__(self, host: str) -> None:
        self.host = host

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, UpstreamError):
            return
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            raise UpstreamTimeout(f"upstream {self.host} did not answer in time", host=self.host) from None
        if isinstance(exc, aiohttp.ClientConnectorError):  # never connected: nothing was sent
            reason = exc.os_error.strerror
            raise UpstreamUnreachable(f"upstream {self.host} is unreachable: {reason}", host=self.host) from None
        if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):  # closed or reset mid-way
            message = f"upstream {self.host} closed the connection before answering"
            raise UpstreamDisconnected(message, host=self.host) from None
        if isinstance(exc, aiohttp.InvalidURL):
            raise UpstreamUnreachable(f"upstream URL for {self.host} is invalid", host=self.host) from None
        if isinstance(exc, aiohttp.ClientError):
            name = type(exc).__name__
            raise UpstreamProtocolError(f"upstream {self.host} failed: {name}", host=self.host) from None


def translate_errors(host: str) -> _Translate:
    return _Translate(host)


class UpstreamClient:
    """Pooled async client. Use as `async with UpstreamClient(...) as client`."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_connections: int = 64,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # GETs in flight, by everything that makes them identical: a second one waits for the first's answer.
        self._flights: dict[tuple[object, ...], asyncio.Future[UpstreamResponse | None]] = {}

    async def __aenter__(self) -> UpstreamClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=self._max_connections),
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
                auto_decompress=True,
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @asynccontextmanager
    async def stream(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        """Send `request`; yield the response with its body unread; always release the connection.

        Identical GETs in flight at once share one upstream request: the first one's textual answer (JSON,
        read whole) is handed to the others too. A binary answer (a file) is streamed to the first only; the
        others then ask for themselves.
        """
        if request.method != "GET":
            async with self._send(request) as response:
                yield response
            return
        key = (request.url, request.params, tuple(sorted(request.headers.items())))
        flight = self._flights.get(key)
        if flight is not None:
            shared = await asyncio.shield(flight)
            if shared is not None:
                yield shared.copy()
                return
            async with self._send(request) as response:
                yield response
            return
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            async with self._send(request) as response:
                shared = None
                if response.is_textual:
                    await response.read()
                    shared = response.copy()
                flight.set_result(shared)
                self._flights.pop(key, None)
                yield response
        finally:
            if not flight.done():
                flight.set_result(None)  # failed or cancelled: the others ask for themselves
            if self._flights.get(key) is flight:
                del self._flights[key]

    @asynccontextmanager
    async def _send(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        """One request, retried as below when it is a read.

        A read (GET, HEAD) that fails to connect, or is answered 502, 503, 504 or 429 with a short
        Retry-After, is tried again with jittered, growing pauses (never sooner than Retry-After says),
        within RETRY_DEADLINE. A request that changes something (a POST creating an export) is sent once:
        only its caller can know whether sending it again is safe.
        """
        await self.open()
        assert self._session is not None
        idempotent = request.method in ("GET", "HEAD")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_DEADLINE
        attempt = 0
        while True:
            try:
                with translate_errors(request.host):
                    raw = await self._session.request(
                        request.method,
                        request.url,
                        params=list(request.params) or None,
                        headers=dict(request.headers),
                        data=request.body,
                        allow_redirects=False,
                    )
            except UpstreamUnreachable:
                pause = backoff(attempt)
                if not idempotent or loop.time() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                attempt += 1
                continue
            wait = self._pause(raw.status, raw.headers.get("Retry-After"), attempt) if idempotent else None
            if wait is None or loop.time() + wait > deadline:
                break
            raw.release()
            await asyncio.sleep(wait)
            attempt += 1
        try:
            yield UpstreamResponse(raw.status, raw.headers, request.host, raw=raw, reason=raw.reason or "")
        finally:
            raw.release()

    @staticmethod
    def _pause(status: int, retry_after_header: str | None, attempt: int) -> float | None:
        """How long to wait before asking again, or None to hand this answer over as it is."""
        if status not in RETRIED_STATUSES or attempt >= MAX_RETRIES:
            return None
        wait = retry_after(retry_after_header)
        if wait is not None and wait > MAX_THROTTLE_WAIT:
            return None  # a long wait (the hourly budget) is the caller's to see
        # Retry-After is rounded to whole seconds ("0" for 0.4 s left): never ask again at once.
        return max(wait or 0.0, backoff(attempt))

    async def fetch_json(self, request: UpstreamRequest) -> tuple[int, Any]:
        async with self.stream(request) as response:
            return response.status, parse_json(await response.read()) if response.is_textual else NOT_JSON
