"""One typed settings object, built once at start-up from flags and the environment.

`Settings.from_environ` is the only reader of environment variables: the CLI hands it
`os.environ` and its flags, and everything else receives the typed result. It reads
only the variables it knows, plus the ones the capability binds (its secrets).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
SITE_URL_VARIABLE = "GOATCOUNTER_URL"
CRASH_POINTS = ("download", "before-commit", "after-commit")


def namespace_variable(namespace: str) -> str:
    """The generic base-URI override for a consumed namespace: `goatcounter-exports` -> `GOATCOUNTER_EXPORTS_URL`."""
    return re.sub(r"[^A-Za-z0-9]", "_", namespace).upper() + "_URL"


def check_url(url: str, variable: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{variable} must be an http(s) URL such as https://mysite.goatcounter.com, got {url!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{variable} must not carry credentials; the key comes from the spec's binds")
    return url.rstrip("/")


def check_token(token: str, source: str) -> str:
    """An inbound token: long enough to resist guessing, and sendable in a header."""
    if any(ord(c) < 33 or ord(c) == 127 for c in token):
        raise ConfigError(f"{source} must not contain spaces or control characters")
    if len(token) < 16:
        raise ConfigError(f"{source} is too short: use at least 16 characters (e.g. `openssl rand -hex 24`)")
    return token


def default_state_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "goatcounter-exports"


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """Where scripts/install-goatcounter puts GoatCounter binaries (shared by every clone)."""
    if explicit := environ.get("GOATCOUNTER_EXPORTS_CACHE"):
        return Path(explicit)
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "goatcounter-exports"


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    rest_port: int | None = None
    mcp_port: int | None = None
    allowed_hosts: tuple[str, ...] = ()
    upstream_urls: Mapping[str, str] = field(default_factory=dict)  # consumed namespace -> base URI
    site_url: str | None = None  # GOATCOUNTER_URL: the GoatCounter site, when the spec consumes one
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)  # bound variable -> value
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_body_bytes: int = 64 * 1024
    state_dir: Path = Path(".")
    database_path: Path | None = None  # the synced pageviews; default: in state_dir
    cache_dir: Path = Path(".")
    crash_at: str | None = None  # tests only: where `sync` kills itself
    auth_token: str | None = field(default=None, repr=False)  # what REST and MCP clients must present
    insecure_no_auth: bool = False  # serve a non-loopback address without inbound authentication

    @property
    def database(self) -> Path:
        return self.database_path or self.state_dir / "pageviews.sqlite3"

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        namespaces: Iterable[str] = (),
        bound: Iterable[str] = (),
        **flags: Any,
    ) -> Settings:
        """Flags (None means "not given") over the environment over the defaults.

        `namespaces` are the consumed namespaces, each of which may be pointed elsewhere with
        `<NAMESPACE>_URL`; `bound` are the variables the capability binds (its secrets).
        """
        env = environ
        values: dict[str, Any] = {
            "state_dir": Path(env["GOATCOUNTER_EXPORTS_STATE_DIR"])
            if env.get("GOATCOUNTER_EXPORTS_STATE_DIR")
            else default_state_dir(env),
            "cache_dir": default_cache_dir(env),
            "secrets": {name: env[name] for name in bound if env.get(name)},
        }
        for name, variable, convert in (
            ("connect_timeout", "GOATCOUNTER_EXPORTS_CONNECT_TIMEOUT", float),
            ("read_timeout", "GOATCOUNTER_EXPORTS_READ_TIMEOUT", float),
            ("rest_port", "GOATCOUNTER_EXPORTS_REST_PORT", int),
            ("mcp_port", "GOATCOUNTER_EXPORTS_MCP_PORT", int),
        ):
            if env.get(variable):
                try:
                    values[name] = convert(env[variable])
                except ValueError:
                    raise ConfigError(f"{variable} must be a number, got {env[variable]!r}") from None
        if env.get("GOATCOUNTER_EXPORTS_DB"):
            values["database_path"] = Path(env["GOATCOUNTER_EXPORTS_DB"])
        if env.get("GOATCOUNTER_EXPORTS_ALLOWED_HOSTS"):
            values["allowed_hosts"] = tuple(
                h.strip() for h in env["GOATCOUNTER_EXPORTS_ALLOWED_HOSTS"].split(",") if h.strip()
            )
        if env.get("GOATCOUNTER_EXPORTS_AUTH_TOKEN"):
            values["auth_token"] = check_token(env["GOATCOUNTER_EXPORTS_AUTH_TOKEN"], "GOATCOUNTER_EXPORTS_AUTH_TOKEN")
        if env.get(SITE_URL_VARIABLE):
            values["site_url"] = check_url(env[SITE_URL_VARIABLE], SITE_URL_VARIABLE)
        crash_at = env.get("GOATCOUNTER_EXPORTS_CRASH_AT")
        if crash_at:
            if crash_at not in CRASH_POINTS:
                raise ConfigError(f"GOATCOUNTER_EXPORTS_CRASH_AT must be one of {', '.join(CRASH_POINTS)}")
            values["crash_at"] = crash_at
        urls = {
            namespace: check_url(env[namespace_variable(namespace)], namespace_variable(namespace))
            for namespace in namespaces
            if env.get(namespace_variable(namespace))
        }
        values["upstream_urls"] = {**urls, **(flags.pop("upstream_urls", None) or {})}
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)

    def with_site(self, site_url: str, secrets: Mapping[str, str]) -> Settings:
        """These settings pointed at another site with other secrets (the demo's local GoatCounter)."""
        return replace(self, site_url=check_url(site_url, SITE_URL_VARIABLE), secrets=dict(secrets))
