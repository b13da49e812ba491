"""The `goatcounter-exports` command. Flags, the environment and the config file meet here, once, in `Settings`."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from . import __version__
from .adapters.ops import configure_logging
from .app import App, build_app, loop_factory, open_warehouse
from .app import check_ports as ports_free
from .browse import run_browse
from .demo import run_demo
from .doctor import checks
from .errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ApiError,
    ConfigError,
    GoatcounterExportsError,
    IntegrityError,
    RateLimited,
    exit_code,
)
from .goatcounter.exports import ExportRequest, Format
from .goatcounter.sync import sync as run_sync
from .goatcounter.warehouse import remove_empty
from .goatcounter.workflow import write_atomically
from .progress import reporter
from .settings import BY_NAME, CONFIG_VARIABLE, Settings, check_url, default_config_file
from .sites import SiteOutcome, overall_exit_code, sync_all
from .spec import Spec, load_default, load_path
from .spec.lint import lint_text, load_schema
from .spec.loader import default_spec_text

T = TypeVar("T")

EXIT_CODES = """Exit codes: 0 success; 1 failure (lint errors, a failed check, a file that cannot be written);
2 bad usage or configuration; 3 rate-limited; 4 upstream error; 5 the export did not finish in time;
6 integrity failure (hash mismatch, unknown format version, damaged file)."""


def epilog(examples: str, *settings: str, extra: str = "") -> str:
    """A command's help after its options: examples, the variables it reads, exit codes (click keeps \\b blocks)."""
    variables = [BY_NAME[name] for name in settings]
    lines = [f"  {o.variable:<38} {o.help} (default: {o.default})" for o in variables if o.variable]
    if extra:
        lines.append(extra)
    text = "\b\nExamples:\n" + examples.rstrip() + "\n"
    if lines:
        text += "\n\b\nEnvironment (flags win over it; it wins over the config file):\n" + "\n".join(lines) + "\n"
    return text + "\n\b\n" + EXIT_CODES


SITE = "  GOATCOUNTER_URL, GOATCOUNTER_API_KEY   your site, and a key with the 'export' permission"


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def describe(error: GoatcounterExportsError) -> str:
    """One line for a person: what went wrong, in the words of the exit code it comes with."""
    if isinstance(error, RateLimited):
        wait = f" Try again in {error.retry_after:.0f} seconds." if error.retry_after else ""
        return f"rate limited: {error.message}.{wait}"
    if isinstance(error, ApiError):
        return f"GoatCounter answered {error.status}: {error.message}"
    if isinstance(error, IntegrityError):
        return f"integrity check failed: {error}; nothing was written"
    return str(error)


def guarded(action: Callable[[], T]) -> T:
    """Run a command's work; every error of ours becomes one `error:` line and its exit code."""
    try:
        return action()
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", EXIT_INTERRUPTED)
    except GoatcounterExportsError as exc:
        fail(describe(exc), exit_code(exc))


def run_async(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    def run() -> None:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:  # uvloop when installed
            runner.run(work())

    guarded(run)


def load_spec(path: str | None) -> Spec:
    return guarded(lambda: load_path(path) if path else load_default())


def parse_upstreams(values: tuple[str, ...]) -> dict[str, str]:
    result = {}
    for value in values:
        namespace, sep, url = value.partition("=")
        if not sep:
            fail(f"--upstream takes NAMESPACE=URL, got {value!r}")
        try:
            result[namespace] = check_url(url, f"--upstream {namespace}")
        except ConfigError as exc:
            fail(str(exc))
    return result


def make_settings(spec: Spec, **flags: Any) -> Settings:
    """The only place the process environment is read."""
    config = click.get_current_context().find_root().params.get("config_file")
    namespaces = [c.namespace for c in spec.capability.consumes]
    settings = guarded(
        lambda: Settings.from_environ(
            os.environ, config_file=config, namespaces=namespaces, bound=spec.bound_variables, **flags
        )
    )
    configure_logging(settings.log_format, settings.log_level)
    return settings


def make_app(spec_path: str | None, **flags: Any) -> App:
    spec = load_spec(spec_path)
    settings = make_settings(spec, **flags)
    return guarded(lambda: build_app(spec, settings))


spec_option = click.option("--spec", "spec_path", type=click.Path(dir_okay=False), help="Capability document to serve.")
upstream_option = click.option(
    "--upstream", multiple=True, metavar="NAMESPACE=URL", help="Base URI for a consumed namespace (repeatable)."
)
host_option = click.option("--host", help="Address to listen on (default 127.0.0.1).")
rest_port_option = click.option("--rest-port", type=int, help="REST port (default: the spec's, 8080; 0: any free).")
mcp_port_option = click.option("--mcp-port", type=int, help="MCP port (default: the spec's, 9090; 0: any free).")
log_options = (
    click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON objects."),
    click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Least severe shown."),
)
state_option = click.option(
    "--state",
    "state_url",
    metavar="URL",
    help="A PostgreSQL state store shared by replicas (postgresql://...; default: SQLite in the state directory).",
)
timeout_option = click.option(
    "--timeout", type=click.FloatRange(0.1), default=600, show_default=True, help="Seconds to wait for the export."
)


def with_logs(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(log_options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="goatcounter-exports")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"TOML config file (default: ${CONFIG_VARIABLE}, else ~/.config/goatcounter-exports/config.toml if there).",
)
def main(config_file: Path | None) -> None:
    """GoatCounter's export API as a REST API and an MCP server, and an exact local copy of your data.

    Settings come from flags, then the environment, then the config file; `goatcounter-exports config`
    shows what is in effect and where each value came from. Start with `goatcounter-exports doctor`.
    """


@main.command(
    epilog=epilog(
        "  GOATCOUNTER_URL=https://mysite.goatcounter.com GOATCOUNTER_API_KEY=... goatcounter-exports serve\n"
        "  GOATCOUNTER_EXPORTS_AUTH_TOKEN=$(openssl rand -hex 24) goatcounter-exports serve --host 0.0.0.0",
        "host",
        "rest_port",
        "mcp_port",
        "allowed_hosts",
        "auth_token",
        "connect_timeout",
        "read_timeout",
        "state_dir",
        "log_format",
        "log_level",
        extra=SITE,
    )
)
@spec_option
@upstream_option
@host_option
@rest_port_option
@mcp_port_option
@click.option(
    "--allowed-host", "allowed_hosts", multiple=True, metavar="NAME", help="Extra Host name REST and MCP accept."
)
@click.option(
    "--auth-token",
    metavar="TOKEN",
    help="Token REST and MCP clients must send (Authorization: Bearer TOKEN). Prefer GOATCOUNTER_EXPORTS_AUTH_TOKEN: "
    "a flag shows in the process list.",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Serve a non-loopback --host without authentication (only behind something that authenticates).",
)
@state_option
@with_logs
def serve(
    state_url: str | None,
    spec_path: str | None,
    upstream: tuple[str, ...],
    host: str | None,
    rest_port: int | None,
    mcp_port: int | None,
    allowed_hosts: tuple[str, ...],
    auth_token: str | None,
    insecure_no_auth: bool,
    log_format: str | None,
    log_level: str | None,
) -> None:
    """Serve REST (with /healthz, /readyz, /metrics) and MCP (streamable HTTP at /mcp)."""
    app = make_app(
        spec_path,
        host=host,
        rest_port=rest_port,
        mcp_port=mcp_port,
        upstream_urls=parse_upstreams(upstream),
        allowed_hosts=allowed_hosts or None,
        auth_token=auth_token,
        insecure_no_auth=insecure_no_auth or None,
        log_format=log_format,
        log_level=log_level,
        state_url=state_url,
    )

    async def preflight() -> None:
        """The cheap checks, each failure one warning line: the service starts anyway (see /readyz)."""
        for check in await checks(app, ports=False, cheap=True):
            if check.outcome is False:
                click.echo(f"warning: {check.name}: {check.detail} -> {check.fix}", err=True)

    run_async(lambda: app.serve_forever(announce=click.echo, preflight=preflight))


@main.command(
    epilog=epilog(
        "  goatcounter-exports doctor\n  goatcounter-exports doctor --rest-port 0 --mcp-port 0",
        "rest_port",
        "mcp_port",
        "state_dir",
        extra=SITE,
    )
)
@spec_option
@host_option
@rest_port_option
@mcp_port_option
def doctor(spec_path: str | None, host: str | None, rest_port: int | None, mcp_port: int | None) -> None:
    """Check configuration, GoatCounter, the key, the site's settings, the budget and the ports.

    Never spends the export budget. Exits 1 when a check fails.
    """
    spec = load_spec(spec_path)
    try:
        settings = Settings.from_environ(
            os.environ,
            config_file=click.get_current_context().find_root().params.get("config_file"),
            namespaces=[c.namespace for c in spec.capability.consumes],
            bound=spec.bound_variables,
            host=host,
            rest_port=rest_port,
            mcp_port=mcp_port,
        )
        app = build_app(spec, settings)
    except ConfigError as exc:
        click.echo(f"FAIL configuration: {exc}")
        sys.exit(EXIT_FAILURE)

    async def run() -> None:
        async with app:
            found = await checks(app)
        for check in found:
            click.echo(check.line())
        if any(check.outcome is False for check in found):
            sys.exit(EXIT_FAILURE)

    run_async(run)


@main.command(epilog=epilog("  goatcounter-exports config\n  goatcounter-exports --config team.toml config"))
@spec_option
def config(spec_path: str | None) -> None:
    """Print the configuration in effect, where each value came from, and secrets masked."""
    spec = load_spec(spec_path)
    settings = make_settings(spec)
    file = settings.config_file or f"(none; {default_config_file(os.environ)} would be read)"
    click.echo(f"config file: {file}")
    rows = settings.shown()
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value}  [{source}]")


@main.command(epilog=epilog("  goatcounter-exports lint\n  goatcounter-exports lint mine.yaml --schema schema.json"))
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@click.option("--schema", type=click.Path(dir_okay=False, exists=True), help="JSON Schema (default: bundled alpha2).")
def lint(spec_file: str | None, schema: str | None) -> None:
    """Check a capability document against the official schema and the runtime's rules."""
    if spec_file:
        try:
            text, source = Path(spec_file).read_text("utf-8"), spec_file
        except OSError as exc:
            fail(f"cannot read {spec_file}: {exc.strerror}")
    else:
        text, source = default_spec_text(), "<builtin>/goatcounter-exports.yaml"
    findings = lint_text(text, source, load_schema(schema))
    for finding in findings:
        click.echo(f"{source}: {finding}")
    errors = sum(1 for f in findings if f.level == "error")
    if findings and not errors and text == default_spec_text():
        click.echo(
            "note: these warnings are the seed's known deviations from the official schema (typed consumed inputs, "
            "a REST description, outputs without properties); the runtime serves it as docs/architecture.md says."
        )
    click.echo(f"{source}: {errors} error(s), {len(findings) - errors} warning(s)")
    sys.exit(EXIT_FAILURE if errors else EXIT_OK)


@main.command(
    epilog=epilog(
        '  {"mcpServers": {"goatcounter": {"command": "/abs/path/.venv/bin/goatcounter-exports", "args": ["mcp"],\n'
        '     "env": {"GOATCOUNTER_URL": "https://mysite.goatcounter.com", "GOATCOUNTER_API_KEY": "..."}}}}',
        "state_dir",
        "database_path",
        extra=SITE,
    )
)
@spec_option
@upstream_option
@click.option("--stdio", is_flag=True, default=True, hidden=True, help="Serve MCP over stdin/stdout (the default).")
@state_option
def mcp(spec_path: str | None, upstream: tuple[str, ...], stdio: bool, state_url: str | None) -> None:
    """Serve the MCP tools over stdio, for desktop clients and IDEs that launch a command."""
    app = make_app(spec_path, upstream_urls=parse_upstreams(upstream), state_url=state_url)
    run_async(app.serve_stdio)


@main.command(
    epilog=epilog(
        "  goatcounter-exports demo\n  goatcounter-exports demo --rest-port 0 --mcp-port 0 --pageviews 2000",
        "cache_dir",
    )
)
@spec_option
@host_option
@rest_port_option
@mcp_port_option
@click.option(
    "--pageviews",
    type=click.IntRange(1, 100_000),
    default=300,
    show_default=True,
    help="Sample pageviews to seed the local GoatCounter with.",
)
@click.option("--check-ports", is_flag=True, help="Only check that the ports are free, and exit.")
def demo(
    spec_path: str | None,
    host: str | None,
    rest_port: int | None,
    mcp_port: int | None,
    pageviews: int,
    check_ports: bool,
) -> None:
    """Start a local GoatCounter with sample pageviews and serve REST and MCP against it."""
    spec = load_spec(spec_path)
    settings = make_settings(spec, host=host, rest_port=rest_port, mcp_port=mcp_port)  # its own site and key
    if check_ports:
        guarded(lambda: ports_free(spec, settings))
        return
    guarded(lambda: run_demo(spec, settings, click.echo, pageviews))


@main.command(
    epilog=epilog(
        "  goatcounter-exports export -o pageviews.csv\n"
        "  goatcounter-exports export -o new.csv.gz --gzip --since-hit-id 1234\n"
        "  goatcounter-exports export --format json -o site.zip --since-day 2026-11-01",
        "state_dir",
        "connect_timeout",
        "read_timeout",
        extra=SITE,
    )
)
@spec_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["csv", "json"]),
    default="csv",
    show_default=True,
    help="csv: individual pageviews; json: the dashboard's statistics, a ZIP (GoatCounter newer than v2.7.0).",
)
@click.option("--since-hit-id", type=click.IntRange(0), default=0, help="CSV: only pageviews after this hit id.")
@click.option("--since-day", type=click.DateTime(["%Y-%m-%d"]), help="JSON: only statistics from this day (UTC) on.")
@click.option("--gzip", "keep_gzip", is_flag=True, help="CSV: keep GoatCounter's .csv.gz as it is.")
@timeout_option
@state_option
def export(
    state_url: str | None,
    spec_path: str | None,
    output: Path | None,
    export_format: Format,
    since_hit_id: int,
    since_day: datetime | None,
    keep_gzip: bool,
    timeout: float,
) -> None:
    """Create (or reuse) an export, wait for it, download it, verify it, and write it atomically.

    The file is written like any other (your umask decides who may read it). A CSV's first column is named
    `2Path`: GoatCounter puts the CSV format version, 2, in front of its first column's name.
    """
    if export_format == "json" and (since_hit_id or keep_gzip):
        fail("--since-hit-id and --gzip are for CSV exports; a JSON export takes --since-day")
    if export_format == "csv" and since_day is not None:
        fail("--since-day is for JSON exports (--format json)")
    request = ExportRequest(export_format, since_hit_id, since_day.date() if since_day else None)
    app = make_app(spec_path, state_url=state_url)
    report = reporter()
    job = guarded(lambda: app.export_job(report))

    async def run() -> None:
        async with app:
            await job.choose_format(export_format)  # refuses a CSV export a site would leave empty
            export, reused = await job.create_or_reuse(request)
            first_day = request.start_from_day or "the start"
            what = f"hits after {since_hit_id}" if export_format == "csv" else f"statistics from {first_day}"
            report.line(f"{'Reusing' if reused else 'Created'} export {export.id} ({what})")
            with report.live():
                export = await job.wait(export, timeout)
                suffix = ".zip" if export_format == "json" else ".csv.gz" if keep_gzip else ".csv"
                target = output or Path(f"goatcounter-export-{export.id}{suffix}")
                async with job.reader.open(export, report) as file:
                    await write_atomically(file, target, decompress=export_format == "csv" and not keep_gzip)
            if export_format == "json":
                report.line(f"Wrote {target}: a ZIP of GoatCounter's statistics, SHA-256 verified.")
            else:
                cursor = f"Next: --since-hit-id {export.last_hit_id}"
                report.line(f"Wrote {target}: {export.num_rows} rows, SHA-256 verified. {cursor}")
            note = await job.empty_note(export)
            if note:
                report.line(f"note: {note}")

    run_async(run)


@main.command(
    epilog=epilog(
        "  goatcounter-exports sync\n"
        "  goatcounter-exports sync --db site.sqlite3 --format json --quiet\n"
        "  15 * * * * GOATCOUNTER_URL=... GOATCOUNTER_API_KEY=... /abs/path/.venv/bin/goatcounter-exports sync -q",
        "database_path",
        "state_dir",
        "connect_timeout",
        "read_timeout",
        extra=SITE,
    )
)
@spec_option
@click.option("--db", "database", metavar="PATH|URL", help="Database to fill: a SQLite file, or a postgresql:// URL.")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["auto", "csv", "json"]),
    default="auto",
    show_default=True,
    help="csv: individual pageviews; json: the dashboard's statistics; auto: json where GoatCounter has it.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success but notes to act on (for cron).")
@click.option(
    "--all",
    "all_sites",
    is_flag=True,
    help="Sync every site of the config file's [[sites]] (url, key_env) into the same database; a line for each.",
)
@timeout_option
@state_option
def sync(
    spec_path: str | None,
    database: str | None,
    export_format: str,
    quiet: bool,
    all_sites: bool,
    timeout: float,
    state_url: str | None,
) -> None:
    """Copy new data into a local SQLite database; run again and again, e.g. from cron."""
    wanted: Format | None = None if export_format == "auto" else export_format  # type: ignore[assignment]
    if all_sites:
        sync_every_site(spec_path, database, wanted, quiet, timeout, state_url)
        return
    app = make_app(spec_path, database_path=database, state_url=state_url)
    report = reporter(quiet=quiet)
    job = guarded(lambda: app.export_job(report))
    target = app.settings.warehouse
    existed = isinstance(target, str) or target.exists()

    async def run() -> None:
        warehouse = open_warehouse(target)
        try:
            async with app:
                with report.live():
                    result = await run_sync(
                        job, warehouse, export_format=wanted, wait_seconds=timeout, crash_at=app.settings.crash_at
                    )
        finally:
            warehouse.close()
            if not existed and isinstance(target, Path):
                remove_empty(target)  # a failed first run leaves nothing that looks synced
        report.line(result.line(warehouse.name))
        if result.note:
            click.echo(f"note: {result.note}", err=True)

    run_async(run)


def sync_every_site(
    spec_path: str | None, database: str | None, wanted: Format | None, quiet: bool, timeout: float, state: str | None
) -> None:
    spec = load_spec(spec_path)
    settings = make_settings(spec, database_path=database, state_url=state)
    if not settings.sites:
        fail("--all needs sites in the config file: [[sites]] with url and key_env (see docs/scaling.md)")
    target = settings.warehouse
    outcomes: list[SiteOutcome] = []

    async def run() -> None:
        warehouse = open_warehouse(target)
        try:
            outcomes.extend(await sync_all(spec, settings, warehouse, export_format=wanted, wait_seconds=timeout))
        finally:
            warehouse.close()

    run_async(run)
    for outcome in outcomes:
        if outcome.exit_code or not quiet:
            click.echo(outcome.line, err=bool(outcome.exit_code))
    sys.exit(overall_exit_code(outcomes))


@main.command(
    epilog=epilog(
        "  goatcounter-exports browse\n  goatcounter-exports browse --db site.sqlite3 --port 0 --no-open",
        "database_path",
        "state_dir",
    )
)
@click.option("--db", "database", type=click.Path(dir_okay=False, path_type=Path), help="The synced SQLite database.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (no login: keep loopback).")
@click.option("--port", type=int, default=8001, show_default=True, help="Port (0: any free).")
@click.option("--no-open", is_flag=True, help="Do not open a web browser.")
def browse(database: Path | None, host: str, port: int, no_open: bool) -> None:
    """Look at the synced copy in Datasette (the `browse` extra): top pages, referrers, ..., a daily chart."""
    settings = make_settings(load_spec(None), database_path=database)
    if settings.database_url is not None:
        fail("browse serves a SQLite copy; a PostgreSQL copy is read with its own tools (psql, Metabase, ...)")
    guarded(lambda: run_browse(settings.database, host=host, port=port, open_browser=not no_open))
