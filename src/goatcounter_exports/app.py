"""The composition root: the one place that builds the pieces and wires them together.

`build_app(spec, settings)` is used by every command, the demo and the tests:

    app = build_app(load_default(), settings)
    async with app:                                  # opens the upstream client; closes it and the store
        rest = app.rest_app()                        # Starlette ASGI app
        server = app.mcp_server()                    # the SDK's low-level MCP server

GoatCounter's knowledge is attached to each consumed namespace that is GoatCounter: the
runtime gets its request `Extension`, the adapters get its hooks and tools. A spec that
consumes something else is served by the generic parts alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.routing import Route
from starlette.types import ASGIApp

from .adapters.guard import Guard, InboundAuth
from .adapters.openapi import OpenApiHooks
from .adapters.ops import Metrics, Observe, ops_routes
from .adapters.rest import RestHooks, create_rest_app
from .adapters.tools import SpecTools, ToolProvider
from .errors import ConfigError, GoatcounterExportsError, SpecError
from .goatcounter.budget import ExportBudget
from .goatcounter.exportfile import ExportReader
from .goatcounter.exports import ExportOps, export_shape
from .goatcounter.metrics import StateCollector
from .goatcounter.openapi import GoatCounterOpenApi
from .goatcounter.profile import GoatCounterProfile, is_goatcounter, site_api_url
from .goatcounter.rest import GoatCounterRest
from .goatcounter.site import SiteProbe
from .goatcounter.store import STATE_FILE, StateStore, Store
from .goatcounter.versions import CreateBodyStyle
from .goatcounter.warehouse import SqliteWarehouse, Warehouse
from .goatcounter.workflow import ExportJob
from .progress import Progress, no_progress
from .runtime import Extension, Runtime
from .server import Listener, bind, loop_factory, run_listeners
from .settings import Settings
from .spec import Spec
from .spec.models import Authentication
from .upstream import UpstreamClient

if TYPE_CHECKING:
    from mcp.server.lowlevel import Server
    from mcp.server.transport_security import TransportSecuritySettings

__all__ = ["loop_factory"]  # for cli.py, which may not import server.py itself

MCP_PATH = "/mcp"
READY_SECONDS = 3.0
PUBLIC_PATHS = ("/", "/healthz", "/readyz")  # answered without authentication: they show nothing secret
EXPORTS_DIR = "exports"  # verified local copies of finished exports, in the state directory
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")
SESSION_IDLE_SECONDS = 10 * 60  # an MCP session nobody has used for this long is closed
MAX_SESSIONS = 1000  # open MCP sessions at once; each costs tens of KB


def allowed_hosts(host: str, extra_hosts: tuple[str, ...]) -> list[str]:
    """The Host names this server answers to (`name` and `name:*`): loopback, the bind address, and extras."""
    names = [*LOOPBACK_HOSTS, *extra_hosts]
    if host not in ("0.0.0.0", "::", *LOOPBACK_BINDS):
        names.append(f"[{host}]" if ":" in host else host)
    return [*names, *(f"{name}:*" for name in names)]


def transport_security(host: str, extra_hosts: tuple[str, ...]) -> TransportSecuritySettings:
    """Host/Origin checks against DNS rebinding: on for loopback and, unlike the SDK default, elsewhere too."""
    from mcp.server.transport_security import TransportSecuritySettings  # the MCP SDK, only when MCP is served

    hosts = allowed_hosts(host, extra_hosts)
    origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


@dataclass
class GoatCounterParts:
    """What one GoatCounter namespace brings: its reader and each adapter's hooks."""

    namespace: str
    reader: ExportReader
    openapi: GoatCounterOpenApi
    store: Store
    create_body: CreateBodyStyle
    site: SiteProbe

    def job(self, progress: Progress = no_progress) -> ExportJob:
        return ExportJob(self.reader, self.store, self.create_body, self.site, progress)

    @property
    def rest(self) -> GoatCounterRest:
        return GoatCounterRest(self.reader, self.job().empty_note)


@dataclass
class App:
    spec: Spec
    settings: Settings
    runtime: Runtime
    store: Store
    metrics: Metrics
    goatcounter: dict[str, GoatCounterParts] = field(default_factory=dict)

    async def __aenter__(self) -> App:
        await self.runtime.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.runtime.__aexit__(*exc)
        finally:
            await self.store.close()

    # -- adapters --------------------------------------------------------------------------

    def rest_app(self, namespace: str | None = None) -> ASGIApp:
        """The REST adapter behind its guard (Host, Origin, and inbound authentication when configured)."""
        hooks: dict[str, RestHooks] = {ns: parts.rest for ns, parts in self.goatcounter.items()}
        openapi: dict[str, OpenApiHooks] = {ns: parts.openapi for ns, parts in self.goatcounter.items()}
        app = create_rest_app(
            self.runtime,
            namespace,
            hooks=hooks,
            openapi_hooks=openapi,
            max_body_bytes=self.settings.max_body_bytes,
            extra_routes=ops_routes(self.metrics, self.readiness),
        )
        observed = Observe(app, self.metrics, "rest", app.routes)
        expose = next((e for e in self.spec.rest_exposes if namespace in (None, e.namespace)), None)
        return self._guarded(observed, expose.authentication if expose else None, "/", PUBLIC_PATHS)

    def mcp_server(self, namespace: str | None = None) -> Server[Any]:
        from .adapters.mcp import create_mcp_server  # the MCP SDK takes ~1 s to import: only when MCP is served
        from .goatcounter.tools import GoatCounterTools

        expose = next((e for e in self.spec.mcp_exposes if namespace in (None, e.namespace)), None)
        bindings = self.runtime.bindings("mcp", expose.namespace) if expose else []
        providers: list[ToolProvider] = []
        for parts in self.goatcounter.values():
            mine = [b for b in bindings if b.target.consumes.namespace == parts.namespace]
            providers.append(GoatCounterTools(self.runtime, mine, parts.reader, parts.job, self.settings.warehouse))
        providers.append(SpecTools(self.runtime, bindings))
        return create_mcp_server(
            providers,
            name=expose.namespace if expose else "goatcounter-exports",
            title=self.spec.info.label or None,
            instructions=expose.description if expose and expose.description else None,
        )

    def mcp_http_app(self, namespace: str | None = None) -> ASGIApp:
        """Streamable HTTP at /mcp behind the same guard; sessions bounded in number and closed when idle."""
        settings = self.settings
        app = self.mcp_server(namespace).streamable_http_app(
            streamable_http_path=MCP_PATH,
            transport_security=transport_security(settings.host, settings.allowed_hosts),
            host=settings.host,
            session_idle_timeout=SESSION_IDLE_SECONDS,
            max_sessions=MAX_SESSIONS,
        )
        observed = Observe(app, self.metrics, "mcp", [Route(MCP_PATH, app)])
        expose = next((e for e in self.spec.mcp_exposes if namespace in (None, e.namespace)), None)
        return self._guarded(observed, expose.authentication if expose else None, MCP_PATH)

    def inbound_auth(self, declared: Authentication | None) -> InboundAuth | None:
        """What clients must present: the expose's own `authentication` (its secrets from the binds), else
        `--auth-token` as a bearer token, else nothing."""
        if declared is not None:
            render = self.runtime.render_secret
            if declared.type == "bearer":
                return InboundAuth("bearer", render(declared.token or ""))
            if declared.type == "apikey":
                return InboundAuth(
                    "apikey", render(declared.value or ""), declared.key or "X-Api-Key", declared.placement
                )
            pair = f"{render(declared.username or '')}:{render(declared.password or '')}"
            return InboundAuth("basic", pair)
        return InboundAuth("bearer", self.settings.auth_token) if self.settings.auth_token else None

    def _guarded(
        self, app: ASGIApp, declared: Authentication | None, resource: str, public: tuple[str, ...] = ()
    ) -> ASGIApp:
        hosts = allowed_hosts(self.settings.host, self.settings.allowed_hosts)
        return Guard(app, allowed_hosts=hosts, auth=self.inbound_auth(declared), resource=resource, public=public)

    async def readiness(self) -> str | None:
        """None when every GoatCounter consumed answers and accepts the key; else why not, in one line.
        Quick, as probes want: an answer slower than READY_SECONDS is a "not ready"."""
        try:
            return await asyncio.wait_for(self._readiness(), READY_SECONDS)
        except TimeoutError:
            return f"GoatCounter did not answer within {READY_SECONDS:.0f} s"

    async def _readiness(self) -> str | None:
        for namespace in self.goatcounter:
            request = self.runtime.request_to(namespace, "GET", "/me", {"Content-Type": "application/json"})
            try:
                status, _ = await self.runtime.client.fetch_json(request)
                if status == 404:  # main's cold-key quirk answers a key's first request with 404
                    status, _ = await self.runtime.client.fetch_json(request)
            except GoatcounterExportsError as exc:
                return str(exc)
            if status in (401, 403):
                return f"GoatCounter refused the key ({status}): check GOATCOUNTER_API_KEY"
            if status != 200:
                return f"GoatCounter answered {status} to GET /api/v0/me: is GOATCOUNTER_URL the site's address?"
        return None

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address to anyone who can reach it, unless told to."""
        settings = self.settings
        if settings.host in LOOPBACK_BINDS or settings.insecure_no_auth:
            return
        declared = [e.authentication for e in self.spec.rest_exposes[:1]]
        declared += [e.authentication for e in self.spec.mcp_exposes[:1] if e.transport == "http"]
        if any(self.inbound_auth(auth) is None for auth in declared):
            raise ConfigError(
                f"listening on {settings.host} without authentication would let anyone who can reach the port spend "
                "the export budget and read every export; set --auth-token (or GOATCOUNTER_EXPORTS_AUTH_TOKEN), "
                "or pass --insecure-no-auth if something in front of this server authenticates"
            )

    def listeners(self) -> list[Listener]:
        """One listener per exposed adapter the spec declares, on the ports settings or the spec give."""
        result = []
        for name, namespace, host, port in planned_listeners(self.spec, self.settings):
            if name == "REST":
                result.append(Listener(name, self.rest_app(namespace), host, port, "/"))
            else:
                result.append(Listener(name, self.mcp_http_app(namespace), host, port, MCP_PATH))
        return result

    # -- GoatCounter workflows ---------------------------------------------------------------

    def export_job(self, progress: Progress = no_progress) -> ExportJob:
        """The export job on the (first) GoatCounter the capability consumes."""
        if not self.goatcounter:
            raise SpecError("the capability consumes no GoatCounter API, so it has no export job")
        return next(iter(self.goatcounter.values())).job(progress)

    # -- serving -----------------------------------------------------------------------------

    async def serve_forever(
        self,
        announce: Callable[[str], None] = print,
        then: Callable[[list[Listener]], None] = lambda listeners: None,
        preflight: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Serve every adapter until Ctrl-C. Announces `REST  <url>` / `MCP   <url>` once all listen."""
        self.check_exposure()
        found = self.listeners()
        bind_all(found)

        def started() -> None:
            for listener in found:
                announce(f"{listener.name:<5} {listener.url}")
            then(found)

        async with self:
            if preflight is not None:
                await preflight()
            await run_listeners(found, started)

    async def serve_stdio(self) -> None:
        """The MCP tools over stdin/stdout, for desktop clients that launch a command."""
        from mcp.server.stdio import stdio_server

        server = self.mcp_server()
        async with self, stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())


def planned_listeners(spec: Spec, settings: Settings) -> list[tuple[str, str, str, int]]:
    """(adapter, expose namespace, host, port) of what `serve` listens on: the ports settings or the spec give."""
    planned = []
    for expose in spec.rest_exposes[:1]:
        port = settings.rest_port if settings.rest_port is not None else expose.port
        planned.append(("REST", expose.namespace, settings.host, port))
    for mcp_expose in spec.mcp_exposes[:1]:
        if mcp_expose.transport != "http" and settings.mcp_port is None:
            continue
        port = settings.mcp_port if settings.mcp_port is not None else (mcp_expose.port or 9090)
        planned.append(("MCP", mcp_expose.namespace, settings.host, port))
    return planned


def check_ports(spec: Spec, settings: Settings) -> None:
    """Say now, in one line, which of the ports `serve` would need are busy (before anything slow starts)."""
    probes = [Listener(name, None, host, port) for name, _, host, port in planned_listeners(spec, settings)]  # type: ignore[arg-type]
    bind_all(probes)
    for probe in probes:
        if probe.sock is not None:
            probe.sock.close()


def bind_all(listeners: list[Listener]) -> None:
    """Bind every listener's socket, and say in one line which ports are busy, all of them at once."""
    busy = []
    for listener in listeners:
        try:
            bind(listener, "--rest-port" if listener.name == "REST" else "--mcp-port")
        except ConfigError:
            busy.append(listener)
    if busy:
        for listener in listeners:
            if listener.sock is not None:
                listener.sock.close()
        where = " and ".join(f"{b.host}:{b.port} ({b.name})" for b in busy)
        flags = " and ".join("--rest-port" if b.name == "REST" else "--mcp-port" for b in busy)
        raise ConfigError(f"cannot listen on {where}: address already in use; choose others with {flags} (0: any free)")


def base_uris(spec: Spec, settings: Settings) -> dict[str, str]:
    """Each consumed namespace's base URI when not the spec's: a flag or `<NS>_URL` first, then, for
    GoatCounter, the site of GOATCOUNTER_URL. A GoatCounter whose spec names no site of its own
    (goatcounter.com itself, as the seed does) needs GOATCOUNTER_URL."""
    result = dict(settings.upstream_urls)
    for consumes in spec.capability.consumes:
        if consumes.namespace in result or not is_goatcounter(consumes):
            continue
        if settings.site_url:
            result[consumes.namespace] = site_api_url(settings.site_url)
        elif urlsplit(consumes.base_uri).hostname == "goatcounter.com":
            raise ConfigError(
                "GOATCOUNTER_URL is not set: set it to your site's address, e.g. "
                "`export GOATCOUNTER_URL=https://mysite.goatcounter.com` (goatcounter.com itself is no site)"
            )
    return result


def build_app(spec: Spec, settings: Settings, *, client: UpstreamClient | None = None) -> App:
    """Every piece, built once. Raises ConfigError for a bound variable that is missing or unusable."""
    client = client or UpstreamClient(connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout)
    store: Store = (
        _postgres_store(settings.state_url) if settings.state_url else StateStore(settings.state_dir / STATE_FILE)
    )
    metrics = Metrics()
    state = StateCollector(store, settings.warehouse)
    metrics.registry.register(state)
    metrics.before_scrape.append(state.refresh)
    gc_namespaces = [c.namespace for c in spec.capability.consumes if is_goatcounter(c)]
    create_body, site = CreateBodyStyle(), SiteProbe()  # what each server and site told, learnt once
    profile = GoatCounterProfile(ExportBudget(store), create_body, site)
    extensions: dict[str, list[Extension]] = {namespace: [profile] for namespace in gc_namespaces}

    def observe(operation: str, status: int, seconds: float) -> None:
        metrics.observe_upstream(operation, status, seconds)
        target = runtime.resolution.targets.get(operation)
        if status == 202 and target is not None and export_shape(target) == "create":
            metrics.exports_created.inc()

    runtime = Runtime(
        spec,
        client=client,
        secrets=settings.secrets,
        base_uris=base_uris(spec, settings),
        extensions=extensions,
        observer=observe,
    )
    app = App(spec, settings, runtime, store, metrics)
    for namespace in gc_namespaces:
        try:
            ops = ExportOps.find(runtime, namespace)
        except SpecError:
            continue  # a GoatCounter API without the export operations: served generically
        reader = ExportReader(runtime, ops, settings.state_dir / EXPORTS_DIR)
        parts = GoatCounterParts(namespace, reader, GoatCounterOpenApi(), store, create_body, site)
        app.goatcounter[namespace] = parts
    return app


def open_warehouse(target: Path | str) -> Warehouse:
    """The SQLite file at a path, or the PostgreSQL database of a postgresql:// URL (psycopg imported only then)."""
    if isinstance(target, str):
        from .goatcounter.warehouse_postgres import PostgresWarehouse

        return PostgresWarehouse(target)
    return SqliteWarehouse(target)


def _postgres_store(url: str) -> Store:
    """The PostgreSQL state store, imported only when asked for (psycopg costs ~0.3 s and ~10 MB to import)."""
    from .goatcounter.store_postgres import PostgresStateStore

    return PostgresStateStore(url)
