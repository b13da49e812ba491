"""Every error this package raises, under one base, and the one map from an error to what users see.

    GoatcounterExportsError         exit 1  HTTP 500
    ├── SpecError                   exit 2  HTTP 500  the capability document cannot be served as written
    ├── ConfigError                 exit 2  HTTP 500  settings are missing or wrong (no key, bad URL)
    ├── InputError                  exit 2  HTTP 400  a caller's input, refused before any upstream call
    ├── UpstreamError               exit 4  HTTP 502  the upstream could not be asked, or answered unusably
    │   ├── UpstreamUnreachable             HTTP 502  connection refused, DNS or TLS failure
    │   ├── UpstreamTimeout                 HTTP 504  connect or read timeout
    │   └── UpstreamProtocolError           HTTP 502  an answer we cannot use (oversized, undecodable)
    ├── ApiError                    exit 4  its own   the upstream refused a request (its message kept)
    │   └── RateLimited             exit 3  HTTP 429  ... because of a rate limit (Retry-After kept)
    ├── ExportError                 exit 4  HTTP 502  a GoatCounter export cannot be had
    │   ├── ExportFailed                              GoatCounter's background job set `error`
    │   ├── ExportDeleted                   HTTP 410  the file is gone (kept 24 hours)
    │   ├── WaitTimeout             exit 5  HTTP 504  the export did not finish before the deadline
    │   └── IntegrityError          exit 6  HTTP 502  hash mismatch, unknown format version, damaged file
    ├── StateError                  exit 1  HTTP 503  the state store cannot be used (locked, read-only)
    ├── OutputError                 exit 1            a file or the synced database cannot be written (disk full)
    └── LocalGoatCounterError       exit 1            the local GoatCounter (tests, demo) failed
        └── GoatCounterNotInstalled

Each adapter maps errors once, through `exit_code` and `http_status` below: REST to a JSON body
and a status, MCP to an `isError` result, the CLI to an exit code. Messages never contain secrets.
"""

from __future__ import annotations

# Exit codes of the command line, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # also click's code for bad flags
EXIT_RATE_LIMITED = 3
EXIT_UPSTREAM = 4
EXIT_TIMEOUT = 5
EXIT_INTEGRITY = 6
EXIT_INTERRUPTED = 130


class GoatcounterExportsError(Exception):
    """Base of every error raised by this package."""

    exit_code = EXIT_FAILURE
    http_status = 500


class SpecError(GoatcounterExportsError):
    """The capability document is invalid or uses a feature the runtime does not implement."""

    exit_code = EXIT_USAGE

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

    exit_code = EXIT_USAGE


class InputError(GoatcounterExportsError):
    """Caller input failed validation; nothing was sent upstream."""

    exit_code = EXIT_USAGE
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class UpstreamError(GoatcounterExportsError):
    """The upstream API could not be reached or gave an unusable answer."""

    exit_code = EXIT_UPSTREAM
    http_status = 502

    def __init__(self, message: str, *, host: str) -> None:
        self.host = host
        super().__init__(message)


class UpstreamUnreachable(UpstreamError):
    pass


class UpstreamDisconnected(UpstreamUnreachable):
    """The connection closed or was reset before an answer: the request may have been sent and acted on."""


class UpstreamTimeout(UpstreamError):
    http_status = 504


class UpstreamProtocolError(UpstreamError):
    pass


class ApiError(GoatcounterExportsError):
    """The upstream refused a request: its status, its message, and how long to wait when rate-limited."""

    exit_code = EXIT_UPSTREAM

    def __init__(self, status: int, message: str, *, retry_after: float | None = None, local: bool = False) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.local = local  # refused here, on the upstream's behalf (a spent budget), with nothing sent
        super().__init__(f"{'refused locally' if local else 'upstream answered'} {status}: {message}")

    @staticmethod
    def of(status: int, message: str, *, retry_after: float | None = None, local: bool = False) -> ApiError:
        """The right class for an upstream refusal: `RateLimited` for a 429."""
        kind = RateLimited if status == 429 else ApiError
        return kind(status, message, retry_after=retry_after, local=local)


class RateLimited(ApiError):
    exit_code = EXIT_RATE_LIMITED


class ExportError(GoatcounterExportsError):
    """A GoatCounter export could not be created, finished, downloaded or read."""

    exit_code = EXIT_UPSTREAM
    http_status = 502


class ExportFailed(ExportError):
    """GoatCounter's background export job failed (the export's `error` field is set)."""


class ExportDeleted(ExportError):
    """The export's file is gone: GoatCounter keeps export files for 24 hours."""

    http_status = 410


class WaitTimeout(ExportError):
    """The export did not finish before the deadline."""

    exit_code = EXIT_TIMEOUT
    http_status = 504


class IntegrityError(ExportError):
    """The file does not match the export's hash, is damaged or truncated, or has an unknown format version."""

    exit_code = EXIT_INTEGRITY


class StateError(GoatcounterExportsError):
    """The local state store (the export budget, idempotency keys) cannot be read or written."""

    http_status = 503


class OutputError(GoatcounterExportsError):
    """A local file (an export written with -o, the synced database) cannot be written; nothing half-done is left."""


class LocalGoatCounterError(GoatcounterExportsError):
    """The local GoatCounter (the test bed, the demo) could not be installed, started or used."""


class GoatCounterNotInstalled(LocalGoatCounterError):
    """No GoatCounter binary was found."""


def exit_code(error: BaseException) -> int:
    """The command line's exit code for an error."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return error.exit_code if isinstance(error, GoatcounterExportsError) else EXIT_FAILURE


def http_status(error: GoatcounterExportsError) -> int:
    """The HTTP status REST answers for an error: an upstream refusal keeps the upstream's own status."""
    return error.status if isinstance(error, ApiError) else error.http_status
