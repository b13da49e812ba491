"""The `goatcounter-exports` command. Flags and the environment meet here, once, in `Settings`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .errors import ConfigError, GoatcounterExportsError, SpecError
from .goatcounter.profile import GoatCounterProfile
from .runtime import Runtime
from .settings import Settings, check_url
from .spec import Spec, load_default, load_path

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # also click's code for bad flags
EXIT_RATE_LIMITED = 3
EXIT_UPSTREAM = 4
EXIT_TIMEOUT = 5
EXIT_INTEGRITY = 6


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def load_spec(path: str | None) -> Spec:
    try:
        return load_path(path) if path else load_default()
    except SpecError as exc:
        fail(str(exc))


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


def build_runtime(spec: Spec, settings: Settings) -> Runtime:
    return Runtime(spec, settings, extensions=[GoatCounterProfile.for_settings(settings)])


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
    "--allowed-host", "allowed_hosts", multiple=True, metavar="NAME", help="Extra Host name MCP accepts (repeatable)."
)
def serve(
    spec_path: str | None,
    upstream: tuple[str, ...],
    host: str,
    rest_port: int | None,
    mcp_port: int | None,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Serve the capability's REST and MCP adapters."""
    spec = load_spec(spec_path)
    settings = make_settings(
        host=host,
        rest_port=rest_port,
        mcp_port=mcp_port,
        base_uris=parse_upstreams(upstream),
        allowed_hosts=allowed_hosts or None,
    )
    runtime = build_runtime(spec, settings)
    guarded(lambda: runtime.check_bound_variables())
    from .app import serve_forever

    guarded(lambda: asyncio.run(serve_forever(runtime, announce=click.echo)))


@main.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@click.option("--schema", type=click.Path(dir_okay=False, exists=True), help="JSON Schema (default: bundled alpha2).")
def lint(spec_file: str | None, schema: str | None) -> None:
    """Check a capability document against the official schema and the runtime's rules."""
    from .spec.lint import lint_text, load_schema
    from .spec.loader import default_spec_text

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
    spec = load_spec(spec_path)
    runtime = build_runtime(spec, make_settings(base_uris=parse_upstreams(upstream)))
    guarded(lambda: runtime.check_bound_variables())
    from .app import serve_stdio

    guarded(lambda: asyncio.run(serve_stdio(runtime)))


@main.command()
@spec_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--rest-port", type=int, help="REST port (default: the spec's, 8080).")
@click.option("--mcp-port", type=int, help="MCP port (default: the spec's, 9090).")
@click.option("--pageviews", type=click.IntRange(1, 100_000), default=300, show_default=True)
def demo(spec_path: str | None, host: str, rest_port: int | None, mcp_port: int | None, pageviews: int) -> None:
    """Start a local GoatCounter with sample pageviews and serve REST and MCP against it."""
    from .demo import run_demo
    from .goatcounter.local import LocalGoatCounterError

    spec = load_spec(spec_path)
    settings = make_settings(host=host, rest_port=rest_port, mcp_port=mcp_port)
    try:
        guarded(lambda: run_demo(spec, settings, click.echo, pageviews))
    except LocalGoatCounterError as exc:
        fail(str(exc), EXIT_FAILURE)


timeout_option = click.option(
    "--timeout", type=click.FloatRange(0.1), default=600, show_default=True, help="Seconds to wait for the export."
)


@main.command()
@spec_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="File to write.")
@click.option("--since-hit-id", type=click.IntRange(0), default=0, help="Only pageviews after this hit id.")
@click.option("--gzip", "keep_gzip", is_flag=True, help="Keep GoatCounter's .csv.gz as it is.")
@timeout_option
def export(spec_path: str | None, output: Path | None, since_hit_id: int, keep_gzip: bool, timeout: float) -> None:
    """Create (or reuse) an export, wait for it, download it, verify it, and write it atomically."""
    from .goatcounter.workflow import write_atomically

    runtime, job, report = workflow_parts(spec_path)

    async def run() -> None:
        async with runtime:
            export, reused = await job.create_or_reuse(since_hit_id)
            report.line(f"{'Reusing' if reused else 'Created'} export {export['id']} (hits after {since_hit_id})")
            with report.live():
                export = await job.wait(export, timeout)
                target = output or Path(f"goatcounter-export-{export['id']}.csv" + (".gz" if keep_gzip else ""))
                await write_atomically(job.file_chunks(export), target, decompress=not keep_gzip)
            report.line(
                f"Wrote {target}: {export['num_rows']} rows, SHA-256 verified. "
                f"Next: --since-hit-id {export['last_hit_id']}"
            )

    run_workflow(run)


@main.command()
@spec_option
@click.option("--db", "database", type=click.Path(dir_okay=False, path_type=Path), help="SQLite database to fill.")
@timeout_option
def sync(spec_path: str | None, database: Path | None, timeout: float) -> None:
    """Copy new pageviews into a local SQLite database; run again and again, e.g. from cron."""
    from .goatcounter.sync import sync as run_sync

    runtime, job, report = workflow_parts(spec_path)
    target = database or runtime.settings.database

    async def run() -> None:
        async with runtime:
            with report.live():
                result = await run_sync(job, target, wait_seconds=timeout, environ=runtime.settings.environ)
        how = "reused" if result.reused else "new"
        report.line(
            f"Synced {result.rows_added} pageviews ({how} export {result.export_id}, hits "
            f"{result.cursor_before} < id <= {result.cursor_after}) into {target}: {result.total_rows} in all."
        )

    run_workflow(run)


def workflow_parts(spec_path: str | None) -> tuple[Runtime, Any, Any]:
    from .goatcounter.profile import STATE_FILE
    from .goatcounter.state import StateStore
    from .goatcounter.workflow import ExportJob
    from .progress import reporter

    spec = load_spec(spec_path)
    settings = make_settings()
    runtime = build_runtime(spec, settings)
    guarded(lambda: runtime.check_bound_variables())
    report = reporter()
    try:
        job = ExportJob.for_runtime(runtime, StateStore(settings.state_dir / STATE_FILE), report)
    except SpecError as exc:
        fail(str(exc))
    return runtime, job, report


def run_workflow(run: Callable[[], Any]) -> None:
    """Run an export workflow; map its failures to the documented exit codes."""
    from .errors import ApiError, ExportError, UpstreamError
    from .goatcounter.workflow import IntegrityError, WaitTimeout

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    except ApiError as exc:
        if exc.status == 429:
            wait = f" Try again in {exc.retry_after:.0f} seconds." if exc.retry_after else ""
            fail(f"rate limited: {exc.message}.{wait}", EXIT_RATE_LIMITED)
        fail(f"GoatCounter answered {exc.status}: {exc.message}", EXIT_UPSTREAM)
    except UpstreamError as exc:
        fail(str(exc), EXIT_UPSTREAM)
    except WaitTimeout as exc:
        fail(str(exc), EXIT_TIMEOUT)
    except IntegrityError as exc:
        fail(f"integrity check failed: {exc}; nothing was written", EXIT_INTEGRITY)
    except ExportError as exc:
        fail(str(exc), EXIT_UPSTREAM)
    except ConfigError as exc:
        fail(str(exc))


def make_settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_environ(**overrides)
    except ConfigError as exc:
        fail(str(exc))


def guarded(action: Callable[[], object]) -> None:
    try:
        action()
    except KeyboardInterrupt:
        sys.exit(130)
    except ConfigError as exc:
        fail(str(exc))
    except GoatcounterExportsError as exc:
        fail(str(exc), EXIT_FAILURE)
