"""Every error this package raises, under one base.

    GoatcounterExportsError
    ├── SpecError               the capability document cannot be served as written
    ├── ConfigError             settings are missing or wrong (no key, bad URL)
    ├── InputError              a caller's input was rejected before any upstream call
    ├── UpstreamError           the upstream could not be asked or answered badly
    │   ├── UpstreamUnreachable     connection refused, DNS failure, TLS failure
    │   ├── UpstreamTimeout         connect or read timeout
    │   └── UpstreamProtocolError   an answer we cannot use (oversized, undecodable)
    ├── ApiError                the upstream answered with an error status (its own message kept)
    └── ExportError             the GoatCounter export workflow failed (see goatcounter.exports)

Adapters map these once each: REST to a JSON body and a status, MCP to an
`isError` result, the CLI to an exit code. Messages never contain secrets.
"""

from __future__ import annotations


class GoatcounterExportsError(Exception):
    """Base of every error raised by this package."""


class SpecError(GoatcounterExportsError):
    """The capability document is invalid or uses a feature the runtime does not implement."""

    def __init__(self, message: str, *, path: str = "", line: int | None = None, source: str = "") -> None:
        self.path = path
        self.line = line
        self.source = source
        where = source
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        prefix = "".join(f"{part}: " for part in (where, path) if part)
        super().__init__(prefix + message)


class ConfigError(GoatcounterExportsError):
    """A required setting is missing or malformed."""


class InputError(GoatcounterExportsError):
    """Caller input failed validation; nothing was sent upstream."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class UpstreamError(GoatcounterExportsError):
    """The upstream API could not be reached or gave an unusable answer."""

    status_code = 502

    def __init__(self, message: str, *, host: str) -> None:
        self.host = host
        super().__init__(message)


class UpstreamUnreachable(UpstreamError):
    status_code = 502


class UpstreamTimeout(UpstreamError):
    status_code = 504


class UpstreamProtocolError(UpstreamError):
    status_code = 502


class ApiError(GoatcounterExportsError):
    """The upstream refused a request: its status, its message, and how long to wait when rate-limited."""

    def __init__(self, status: int, message: str, *, retry_after: float | None = None) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"upstream answered {status}: {message}")


class ExportError(GoatcounterExportsError):
    """The export workflow (create, wait, download, verify) failed."""
