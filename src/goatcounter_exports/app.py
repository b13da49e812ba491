"""Wire a runtime to its adapters and serve them: the one place that knows all the pieces."""

from __future__ import annotations

from collections.abc import Callable

from .adapters.rest import create_rest_app
from .runtime import Runtime
from .server import Listener, bind, run_listeners


def listeners(runtime: Runtime) -> list[Listener]:
    """One listener per exposed adapter the spec declares, on the ports settings or the spec give."""
    settings = runtime.settings
    result = []
    for expose in runtime.spec.rest_exposes[:1]:
        port = settings.rest_port if settings.rest_port is not None else expose.port
        result.append(Listener("REST", create_rest_app(runtime, expose.namespace), settings.host, port, "/"))
    return result


async def serve_forever(runtime: Runtime, announce: Callable[[str], None] = print) -> None:
    found = listeners(runtime)
    for listener in found:
        bind(listener, "--rest-port" if listener.name == "REST" else "--mcp-port")

    def started() -> None:
        for listener in found:
            announce(f"{listener.name:<5} {listener.url}")

    async with runtime:
        await run_listeners(found, started)
