"""Run several ASGI apps (REST, MCP) on their own ports in one process and one event loop.

Sockets are bound up front so a busy port is reported clearly before anything
starts, and so port 0 (any free port) works for tests. Ctrl-C stops every app.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
import socket
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from .errors import ConfigError

DRAIN_SECONDS = 10  # after SIGTERM or Ctrl-C, requests in flight get this long to finish
# uvicorn's HTTP/1.1 parser: httptools (C) when installed, h11 (pure Python, several times slower) otherwise.
HTTP_PARSER = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (libuv: fewer microseconds per request and per chunk than
    asyncio's own), for `asyncio.Runner(loop_factory=...)`; None: asyncio's default."""
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


@dataclass
class Listener:
    name: str
    app: ASGIApp
    host: str
    port: int
    path: str = "/"
    sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # run_listeners handles signals for all servers at once


def bind(listener: Listener, flag: str) -> None:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    # Say IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) on accepted connections only
    # when the socket's proto is TCP. With proto 0, every keep-alive answer waited ~40 ms for the
    # client's delayed ACK (bench/service.py: 22 -> 907 sequential calls/s with this fix).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listener.host, listener.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {listener.host}:{listener.port} for {listener.name}: {exc.strerror}; "
            f"choose another port with {flag}"
        ) from None
    sock.set_inheritable(True)
    listener.sock = sock
    listener.port = sock.getsockname()[1]


async def run_listeners(listeners: Sequence[Listener], on_started: Callable[[], None] = lambda: None) -> None:
    servers = []
    for listener in listeners:
        assert listener.sock is not None, "bind() first"
        config = uvicorn.Config(
            listener.app,
            log_level="warning",
            access_log=False,
            lifespan="auto",
            http=HTTP_PARSER,
            server_header=False,  # nothing to gain from telling
            timeout_graceful_shutdown=DRAIN_SECONDS,  # a stalled download cannot hold a stop forever
        )
        servers.append((_Server(config), listener.sock))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server, _ in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
        while not all(server.started for server, _ in servers):
            if any(task.done() for task in tasks):
                stop()
                break
            await asyncio.sleep(0.02)
        else:
            on_started()
        await asyncio.gather(*tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
