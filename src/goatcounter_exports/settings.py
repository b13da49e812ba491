"""One typed settings object, built once from CLI flags and an environment mapping.

This is the only module that looks at the process environment (through the
mapping the CLI hands it); everything else receives a `Settings`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_HOST = "127.0.0.1"


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


def default_state_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".local" / "state")
    return Path(base) / "goatcounter-exports"


@dataclass(frozen=True)
class Settings:
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)  # bound secrets are read from here only
    host: str = DEFAULT_HOST
    rest_port: int | None = None
    mcp_port: int | None = None
    base_uris: Mapping[str, str] = field(default_factory=dict)  # consumed namespace -> base URI
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_body_bytes: int = 64 * 1024
    allowed_hosts: tuple[str, ...] = ()
    state_dir: Path = Path(".")
    database_path: Path | None = None  # the synced pageviews; default: in state_dir

    @property
    def database(self) -> Path:
        return self.database_path or self.state_dir / "pageviews.sqlite3"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {
            "environ": env,
            "state_dir": Path(env["GOATCOUNTER_EXPORTS_STATE_DIR"])
            if env.get("GOATCOUNTER_EXPORTS_STATE_DIR")
            else default_state_dir(env),
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
            values["allowed_hosts"] = tuple(h.strip() for h in env["GOATCOUNTER_EXPORTS_ALLOWED_HOSTS"].split(","))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def base_uri_override(self, namespace: str) -> str | None:
        """An explicit base URI for a namespace: from flags first, then `<NAMESPACE>_URL`."""
        if namespace in self.base_uris:
            return self.base_uris[namespace]
        variable = namespace_variable(namespace)
        if self.environ.get(variable):
            return check_url(self.environ[variable], variable)
        return None
