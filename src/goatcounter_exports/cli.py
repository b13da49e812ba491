"""The `goatcounter-exports` command. Flags and the environment meet here, once, in `Settings`."""

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
from .app import App, build_app
from .demo import run_demo
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
from .goatcounter.warehouse import SqliteWarehouse, remove_empty
from .goatcounter.workflow import write_atomically
from .progress import reporter
from .settings import Settings, check_token, check_url
from .spec import Spec, load_default, load_path
from .spec.lint import lint_text, load_schema
from .spec.loader import default_spec_text

T = TypeVar("T")


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
    guarded(lambda: asyncio.run(work()))


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
    namespaces = [c.namespace for c in spec.capability.consumes]
    return guarded(
        lambda: Settings.from_environ(os.environ, namespaces=namespaces, bound=spec.bound_variables, **flags)
    )


def make_app(spec_path: str | None, **flags: Any) -> App:
    spec = load_spec(spec_path)
    settings = make_settings(spec, **flags)
    return guarded(lambda: build_app(spec, settings))


spec_option = click.option("--spec", "spec_path", type=click.Path(dir_okay=False), help="Capability document to serve.")
upstream_option = click.option(
    "--upstream", multiple=True, metavar="NAMESPACE=URL", help="Base URI for a consumed namespace (repeatable)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="goatcounter-exports")
def main() -> None:
    """GoatCounter's export API as a REST API and an MCP server, served from a capability spec."""


@main.command()
@spec_option
@upstream_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--rest-port", type=int, help="REST port (default: the spec's, 8080).")
@click.option("--mcp-port", type=int, help="MCP port (default: the spec's, 9090).")
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
def serve(
    spec_path: str | None,
    upstream: tuple[str, ...],
    host: str,
    rest_port: int | None,
    mcp_port: int | None,
    allowed_hosts: tuple[str, ...],
    auth_token: str | None,
    insecure_no_auth: bool,
) -> None:
    """Serve the capability's REST and MCP adapters."""
    if auth_token is not None:
        token = auth_token
        auth_token = guarded(lambda: check_token(token, "--auth-token"))
    app = make_app(
        spec_path,
        host=host,
        rest_port=rest_port,
        mcp_port=mcp_port,
        upstream_urls=parse_upstreams(upstream),
        allowed_hosts=allowed_hosts or None,
        auth_token=auth_token,
        insecure_no_auth=insecure_no_auth or None,
    )
    run_async(lambda: app.serve_forever(announce=click.echo))


@main.command()
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
    click.echo(f"{source}: {errors} error(s), {len(findings) - errors} warning(s)")
    sys.exit(EXIT_FAILURE if errors else EXIT_OK)


@main.command()
@spec_option
@upstream_option
@click.option("--stdio", is_flag=True, required=True, help="Serve MCP over stdin/stdout (for desktop clients).")
def mcp(spec_path: str | None, upstream: tuple[str, ...], stdio: bool) -> None:
    """Serve the capability's MCP tools over stdio."""
    app = make_app(spec_path, upstream_urls=parse_upstreams(upstream))
    run_async(app.serve_stdio)


@main.command()
@spec_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--rest-port", type=int, help="REST port (default: the spec's, 8080).")
@click.option("--mcp-port", type=int, help="MCP port (default: the spec's, 9090).")
@click.option("--pageviews", type=click.IntRange(1, 100_000), default=300, show_default=True)
def demo(spec_path: str | None, host: str, rest_port: int | None, mcp_port: int | None, pageviews: int) -> None:
    """Start a local GoatCounter with sample pageviews and serve REST and MCP against it."""
    spec = load_spec(spec_path)
    settings = make_settings(spec, host=host, rest_port=rest_port, mcp_port=mcp_port)  # its own site and key
    guarded(lambda: run_demo(spec, settings, click.echo, pageviews))


timeout_option = click.option(
    "--timeout", type=click.FloatRange(0.1), default=600, show_default=True, help="Seconds to wait for the export."
)


@main.command()
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
def export(
    spec_path: str | None,
    output: Path | None,
    export_format: Format,
    since_hit_id: int,
    since_day: datetime | None,
    keep_gzip: bool,
    timeout: float,
) -> None:
    """Create (or reuse) an export, wait for it, download it, verify it, and write it atomically."""
    if export_format == "json" and (since_hit_id or keep_gzip):
        fail("--since-hit-id and --gzip are for CSV exports; a JSON export takes --since-day")
    if export_format == "csv" and since_day is not None:
        fail("--since-day is for JSON exports (--format json)")
    request = ExportRequest(export_format, since_hit_id, since_day.date() if since_day else None)
    app = make_app(spec_path)
    report = reporter()
    job = guarded(lambda: app.export_job(report))

    async def run() -> None:
        async with app:
            await job.choose_format(export_format)  # refuses a CSV export a site would leave empty
            export, reused = await job.create_or_reuse(request)
            what = (
                f"hits after {since_hit_id}"
                if export_format == "csv"
                else f"statistics from {since_day or 'the start'}"
            )
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


@main.command()
@spec_option
@click.option("--db", "database", type=click.Path(dir_okay=False, path_type=Path), help="SQLite database to fill.")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["auto", "csv", "json"]),
    default="auto",
    show_default=True,
    help="csv: individual pageviews; json: the dashboard's statistics; auto: json where GoatCounter has it.",
)
@timeout_option
def sync(spec_path: str | None, database: Path | None, export_format: str, timeout: float) -> None:
    """Copy new data into a local SQLite database; run again and again, e.g. from cron."""
    app = make_app(spec_path)
    report = reporter()
    job = guarded(lambda: app.export_job(report))
    target = database or app.settings.database
    existed = target.exists()
    wanted: Format | None = None if export_format == "auto" else export_format  # type: ignore[assignment]

    async def run() -> None:
        warehouse = SqliteWarehouse(target)
        try:
            async with app:
                with report.live():
                    result = await run_sync(
                        job, warehouse, export_format=wanted, wait_seconds=timeout, crash_at=app.settings.crash_at
                    )
        finally:
            warehouse.close()
            if not existed:
                remove_empty(target)  # a failed first run leaves nothing that looks synced
        report.line(result.line(target))
        if result.note:
            report.line(f"note: {result.note}")

    run_async(run)
