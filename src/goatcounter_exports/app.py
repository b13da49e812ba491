"""Wire a runtime to its adapters and serve them: the one place that knows all the pieces."""

from __future__ import annotations

from collections.abc import Callable

from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp

from .adapters.mcp import create_mcp_server
from .adapters.rest import create_rest_app
from .runtime import Runtime
from .server import Listener, bind, run_listeners

MCP_PATH = "/mcp"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def transport_security(host: str, extra_hosts: tuple[str, ...]) -> TransportSecuritySettings:
    """Host/Origin checks against DNS rebinding: on for loopback and, unlike the SDK default, elsewhere too."""
    names = [*LOOPBACK_HOSTS, *extra_hosts]
    if host not in ("0.0.0.0", "::", "127.0.0.1", "localhost", "::1"):
        names.append(f"[{host}]" if ":" in host else host)
    hosts = [*names, *(f"{name}:*" for name in names)]
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


def create_mcp_app(runtime: Runtime, namespace: str | None = None) -> ASGIApp:
    server = create_mcp_server(runtime, namespace)
    settings = runtime.settings
    return server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=transport_security(settings.host, settings.allowed_hosts),
        host=settings.host,
    )


def listeners(runtime: Runtime, *, rest: bool = True, mcp: bool = True) -> list[Listener]:
    """One listener per exposed adapter the spec declares, on the ports settings or the spec give."""
    settings = runtime.settings
    result = []
    for expose in runtime.spec.rest_exposes[:1] if rest else ():
        port = settings.rest_port if settings.rest_port is not None else expose.port
        result.append(Listener("REST", create_rest_app(runtime, expose.namespace), settings.host, port, "/"))
    for mcp_expose in runtime.spec.mcp_exposes[:1] if mcp else ():
        if mcp_expose.transport != "http" and settings.mcp_port is None:
            continue
        port = settings.mcp_port if settings.mcp_port is not None else (mcp_expose.port or 9090)
        app = create_mcp_app(runtime, mcp_expose.namespace)
        result.append(Listener("MCP", app, settings.host, port, MCP_PATH))
    return result


async def serve_forever(
    runtime: Runtime,
    announce: Callable[[str], None] = print,
    then: Callable[[list[Listener]], None] = lambda listeners: None,
) -> None:
    """Serve every adapter until Ctrl-C. Announces `REST  <url>` / `MCP   <url>` once all listen."""
    found = listeners(runtime)
    for listener in found:
        bind(listener, "--rest-port" if listener.name == "REST" else "--mcp-port")

    def started() -> None:
        for listener in found:
            announce(f"{listener.name:<5} {listener.url}")
        then(found)

    async with runtime:
        await run_listeners(found, started)


async def serve_stdio(runtime: Runtime) -> None:
    """The MCP tools over stdin/stdout, for desktop clients that launch a command."""
    from mcp.server.stdio import stdio_server

    server = create_mcp_server(runtime)
    async with runtime, stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
