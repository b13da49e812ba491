"""A Toxiproxy-like TCP proxy for fault-injection tests: real sockets, real faults, in front of a real upstream.

    with FaultProxy(goatcounter.base) as proxy:       # 127.0.0.1:<free port> -> the upstream
        env = service_env(goatcounter, tmp, GOATCOUNTER_URL=proxy.url)
        proxy.set(latency_up=0.3, latency_down=0.3)   # switch toxics at any time, from the test's thread
        proxy.set(cut_after=1000, match="/download")  # only requests whose "METHOD target" matches
        proxy.clear()                                 # no toxics
        proxy.forwarded("POST")                       # the requests that reached the upstream

The proxy runs its own asyncio loop in a thread, so synchronous tests (and the subprocesses they start)
can use it. It passes bytes through untouched, but reads the head of each HTTP/1.1 request on a
connection (keep-alive: many requests per connection; bodies are skipped by their Content-Length) so
that toxics can apply to single requests and requests can be counted. A request with a chunked body
makes the rest of its connection opaque (passed through, no longer parsed): no client used here sends one.
Clients are assumed not to pipeline (none does): the bytes an upstream sends after a request are its answer.

Toxics (`Toxics`; a count of -1, `EVERY`, means every time; the counts go down as they are used):
- `latency_up`, `latency_down`: seconds added to every byte in that direction (a delay line: the link
  gets slower to answer, not slower per chunk);
- `bandwidth`: bytes per second of the answers (upstream to client), per connection;
- `stall`: a matching request is read, never forwarded, never answered (nor is anything after it);
- `reset_connections`: the next N new connections are reset (RST: SO_LINGER 0, then close) on accept;
- `reset_requests`: the next N matching requests are answered by a reset, without being forwarded;
- `reset_responses`: the next N matching requests are forwarded, and their answer replaced by a reset
  (the upstream did the work; the client cannot know);
- `close_responses`: the same, with a plain close (FIN) in place of the answer: a server that went away;
- `cut_after`: the answer to a matching request is closed (FIN) after this many bytes of its body;
- `match`: a regular expression searched in "METHOD target" (e.g. "^POST ", "/download$"), for the
  request toxics above (stall, reset_requests, reset_responses, close_responses, cut_after); None
  matches every request.

`reset_open()` resets every open connection at once (faults on existing keep-alive connections). When the
upstream refuses a connection (it is down), the client's connection is reset too (counted in `refused`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, fields, replace
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

EVERY = -1  # a toxic count that never runs out
READ_SIZE = 64 * 1024
HEAD_LIMIT = 64 * 1024  # a request head longer than this is not parsed: the connection becomes opaque
QUEUED_CHUNKS = 64  # chunks held in one direction's delay line: beyond this, reading waits (back-pressure)
CONNECT_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class Toxics:
    """The faults in force; see the module's docstring."""

    latency_up: float = 0.0
    latency_down: float = 0.0
    bandwidth: int | None = None
    stall: bool = False
    reset_connections: int = 0
    reset_requests: int = 0
    reset_responses: int = 0
    close_responses: int = 0
    cut_after: int | None = None
    match: str | None = None

    def matches(self, method: str, target: str) -> bool:
        return self.match is None or re.search(self.match, f"{method} {target}") is not None


@dataclass(frozen=True)
class Request:
    """One request head the proxy saw on a connection (`connection` counts from 1)."""

    connection: int
    method: str
    target: str
    fate: str  # "forwarded", "stalled", "reset"


class _Answer:
    """What the proxy does with the answer to the request last forwarded on a connection."""

    def __init__(self, *, reset: bool = False, close: bool = False, cut_after: int | None = None) -> None:
        self.reset = reset
        self.close = close
        self.cut_after = cut_after
        self._head = b""  # the answer's bytes until its head ends (only kept while looking for the end)
        self._head_length: int | None = None
        self._seen = 0

    def clip(self, data: bytes) -> tuple[bytes, bool]:
        """The part of `data` to pass on, and whether the answer is to be cut after it."""
        if self.cut_after is None:
            return data, False
        if self._head_length is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end >= 0:
                self._head_length = end + 4  # `_head` holds the answer from its first byte
                self._head = b""
        self._seen += len(data)
        if self._head_length is None:
            return data, False
        limit = self._head_length + self.cut_after
        if self._seen < limit:
            return data, False
        return data[: len(data) - (self._seen - limit)], True


def _parse_head(head: bytes) -> tuple[str, str, int, bool]:
    """(method, target, body length, chunked) of a request head (its bytes up to the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rpartition(" ")[0] or rest
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length" and value.isdigit():
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    return method, target, length, chunked


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (RST) rather than a FIN: SO_LINGER on, zero seconds, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, once opened, its upstream connection."""

    def __init__(self, number: int, client: asyncio.StreamWriter) -> None:
        self.number = number
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.answer = _Answer()
        self.finished = asyncio.Event()
        self.was_reset = False
        self.stalled = False  # a request on it is stalled: nothing more is answered, not even a close
        self.send_at = 0.0  # when the answer's next byte may leave, under a bandwidth limit

    def reset(self) -> None:
        """RST the client; drop the upstream connection."""
        if not self.was_reset:
            self.was_reset = True
            _rst(self.client)
            if self.upstream is not None:
                self.upstream.transport.abort()
        self.finished.set()


class FaultProxy:
    """A TCP proxy on 127.0.0.1:<free port> in front of `upstream` (a URL or "host:port"), with toxics.

    A context manager: the loop thread starts on enter and everything it opened is closed on exit.
    Counters (read them from the test's thread): `connections` accepted, `requests` seen (`Request`s),
    `resets`, `closes` and `cuts` made, `refused` (connections the upstream refused).
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream if "://" in upstream else f"tcp://{upstream}")
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream {upstream!r} has no host and port")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.port = 0
        self.connections = 0
        self.requests: list[Request] = []
        self.resets = 0
        self.cuts = 0
        self.closes = 0
        self.refused = 0
        self._toxics = Toxics()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the test's side

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def toxics(self) -> Toxics:
        with self._lock:
            return self._toxics

    def set(self, **changes: Any) -> None:
        """Change the named toxics (fields of `Toxics`); the others stay as they are."""
        known = {f.name for f in fields(Toxics)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown toxics: {', '.join(sorted(unknown))}")
        with self._lock:
            self._toxics = replace(self._toxics, **changes)

    def clear(self) -> None:
        """No toxics: a plain proxy again."""
        with self._lock:
            self._toxics = Toxics()

    def forwarded(self, method: str | None = None, contains: str = "") -> list[Request]:
        """The requests passed to the upstream (optionally of one method, with `contains` in the target)."""
        return [
            r
            for r in list(self.requests)
            if r.fate == "forwarded" and method in (None, r.method) and contains in r.target
        ]

    def reset_open(self) -> int:
        """Reset every open connection now; returns how many."""

        async def reset_all() -> int:
            links = list(self._links)
            for link in links:
                link.reset()
            await asyncio.sleep(0.05)  # the sockets close on the loop's next turns
            return len(links)

        return self._call(reset_all())

    def __enter__(self) -> Self:
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._call(self._stop(), timeout=STOP_TIMEOUT * 2)
        finally:
            self._stop_loop()

    def _call(self, work: Coroutine[Any, Any, T], timeout: float = STOP_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    # ------------------------------------------------------------------ the loop's side

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.finished.set()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=STOP_TIMEOUT)
        if self._server is not None:
            await self._server.wait_closed()

    def _take(self, name: str) -> bool:
        """Use one of a counted toxic (reset_*, close_responses): True when there was one left."""
        with self._lock:
            left: int = getattr(self._toxics, name)
            if left == 0:
                return False
            if left != EVERY:
                changes: dict[str, Any] = {name: left - 1}
                self._toxics = replace(self._toxics, **changes)
            return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        link = _Link(self.connections, writer)
        self._links.add(link)
        try:
            await self._serve(link, reader)
        finally:
            self._links.discard(link)
            for side in (link.client, link.upstream):
                if side is not None and not link.was_reset:
                    side.close()
            for side in (link.client, link.upstream):
                if side is not None:
                    with contextlib.suppress(OSError, TimeoutError):
                        await asyncio.wait_for(side.wait_closed(), STOP_TIMEOUT)
            self._handlers.discard(task)

    async def _serve(self, link: _Link, reader: asyncio.StreamReader) -> None:
        if self._take("reset_connections"):
            self.resets += 1
            link.reset()
            return
        try:
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port), CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError):
            self.refused += 1
            link.reset()  # as the upstream did to us
            return
        link.upstream = upstream
        to_upstream: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS)
        to_client: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS)
        tasks = [
            asyncio.create_task(self._requests(link, reader, to_upstream)),
            asyncio.create_task(self._deliver(link, to_upstream, upstream, answers=False)),
            asyncio.create_task(self._answers(link, up_reader, to_client)),
            asyncio.create_task(self._deliver(link, to_client, link.client, answers=True)),
        ]
        try:
            await link.finished.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _requests(
        self, link: _Link, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        """Client to upstream: find each request's head, apply the request toxics, forward the rest."""
        buffer = b""
        body_left = 0
        opaque = stalled = False
        try:
            while data := await reader.read(READ_SIZE):
                if stalled:
                    continue  # read and dropped: never forwarded, never answered
                if opaque:
                    await self._queue(queue, data, self.toxics.latency_up)
                    continue
                buffer += data
                passed = bytearray()
                while buffer and not (stalled or opaque):
                    if body_left:  # a request body: passed on as it is
                        body, buffer = buffer[:body_left], buffer[body_left:]
                        passed += body
                        body_left -= len(body)
                        continue
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        if len(buffer) > HEAD_LIMIT:
                            opaque, passed, buffer = True, passed + buffer, b""
                        break
                    head, buffer = buffer[: end + 4], buffer[end + 4 :]
                    method, target, body_left, chunked = _parse_head(head)
                    if passed:
                        await self._queue(queue, bytes(passed), self.toxics.latency_up)
                        passed = bytearray()
                    fate = self._decide(link, method, target)
                    if fate == "reset":
                        self.resets += 1
                        link.reset()
                        return
                    if fate == "stalled":
                        stalled = link.stalled = True
                        buffer = b""
                        break
                    passed += head
                    if chunked:
                        opaque, passed, buffer = True, passed + buffer, b""
                if passed:
                    await self._queue(queue, bytes(passed), self.toxics.latency_up)
        except OSError:
            link.reset()
            return
        link.finished.set()  # the client is gone: so is the link

    def _decide(self, link: _Link, method: str, target: str) -> str:
        toxics = self.toxics
        hit = toxics.matches(method, target)
        if hit and toxics.stall:
            fate = "stalled"
        elif hit and self._take("reset_requests"):
            fate = "reset"
        else:
            fate = "forwarded"
            reset = hit and self._take("reset_responses")
            close = hit and not reset and self._take("close_responses")
            link.answer = _Answer(reset=reset, close=close, cut_after=toxics.cut_after if hit else None)
        self.requests.append(Request(link.number, method, target, fate))
        return fate

    async def _answers(
        self, link: _Link, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        """Upstream to client: apply the answer toxics of the request being answered."""
        try:
            while data := await reader.read(READ_SIZE):
                answer = link.answer
                if answer.reset:
                    self.resets += 1
                    link.reset()
                    return
                if answer.close:
                    self.closes += 1
                    break
                data, cut = answer.clip(data)
                if data:
                    await self._queue(queue, data, self.toxics.latency_down)
                if cut:
                    self.cuts += 1
                    break
        except OSError:
            link.reset()
            return
        if link.stalled:
            return  # a stalled client sees nothing, not even the upstream going away
        if link.upstream is not None:
            link.upstream.transport.abort()  # nothing more is wanted from it
        await queue.put(None)  # the upstream closed, or the answer is cut: close the client once it has it all

    async def _queue(self, queue: asyncio.Queue[tuple[float, bytes] | None], data: bytes, latency: float) -> None:
        await queue.put((asyncio.get_running_loop().time() + latency, data))

    async def _deliver(
        self,
        link: _Link,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        *,
        answers: bool,
    ) -> None:
        """Write what the delay line holds, when it is due (and, for answers, at the bandwidth allowed)."""
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                rate = self.toxics.bandwidth if answers else None
                if not rate:
                    writer.write(data)
                    await writer.drain()
                    continue
                piece = max(1, rate // 50)  # 20 ms of data at a time
                for start in range(0, len(data), piece):
                    link.send_at = max(link.send_at, loop.time()) + len(data[start : start + piece]) / rate
                    writer.write(data[start : start + piece])
                    await writer.drain()
                    if link.send_at > loop.time():
                        await asyncio.sleep(link.send_at - loop.time())
        except OSError:
            link.reset()
            return
        link.finished.set()  # an answer ended the connection (a close, or a cut): delivered, then closed
