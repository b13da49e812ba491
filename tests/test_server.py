"""How the service listens."""

from __future__ import annotations

import socket

import pytest

from goatcounter_exports.server import Listener, bind

pytestmark = pytest.mark.fast


def test_listening_socket_is_tcp_so_asyncio_turns_nagle_off() -> None:
    """Regression: a listening socket made with proto 0 left Nagle on for every accepted connection,
    and each keep-alive answer waited ~40 ms for a delayed ACK (see bench/service.py)."""

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    listener = Listener("REST", app, "127.0.0.1", 0)  # type: ignore[arg-type]
    bind(listener, "--rest-port")
    assert listener.sock is not None
    try:
        assert listener.sock.proto == socket.IPPROTO_TCP
        assert listener.port > 0
    finally:
        listener.sock.close()
