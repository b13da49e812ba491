"""One typed settings object, built once at start-up: flags, then the environment, then a config file.

`Settings.from_environ` is the only reader of environment variables: the CLI hands it
`os.environ`, its flags and the config file's contents, and everything else receives the
typed result. `OPTIONS` lists every setting once, with its flag, variable, config key and
meaning: the CLI's help, `goatcounter-exports config` and docs/configuration.md come from it.
Secrets (the GoatCounter key, the inbound token) never come from the config file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
SITE_URL_VARIABLE = "GOATCOUNTER_URL"
CONFIG_VARIABLE = "GOATCOUNTER_EXPORTS_CONFIG"
CRASH_POINTS = ("download", "before-commit", "after-commit")
Source = Literal["flag", "environment", "config file", "default"]


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


def default_config_file(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / "goatcounter-exports" / "config.toml"


def _number(kind: Callable[[Any], Any]) -> Callable[[Any, str], Any]:
    def parse(value: Any, source: str) -> Any:
        try:
            if isinstance(value, bool):
                raise ValueError(value)
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source} must be a number, got {value!r}") from None

    return parse


def _port(value: Any, source: str) -> int:
    port = _number(int)(value, source)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{source} must be a port number from 0 (any free port) to 65535, got {value!r}")
    return int(port)


def _path(value: Any, source: str) -> Path:
    return Path(str(value)).expanduser()


def _hosts(value: Any, source: str) -> tuple[str, ...]:
    items = list(value) if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(h).strip() for h in items if str(h).strip())


def _choice(*allowed: str) -> Callable[[Any, str], str]:
    def parse(value: Any, source: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{source} must be one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    return parse


def _postgres_url(value: Any, source: str) -> str:
    if urlsplit(str(value)).scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{source} must be a postgresql:// URL, got a {urlsplit(str(value)).scheme or 'plain'} value")
    return str(value)


def _database(value: Any, source: str) -> Path | str:
    """A SQLite file's path, or a postgresql:// URL (kept as text: a Path would fold its `//`)."""
    text = str(value)
    return text if urlsplit(text).scheme in ("postgres", "postgresql") else _path(text, source)


def _text(value: Any, source: str) -> str:
    return str(value)


@dataclass(frozen=True)
class Option:
    """One setting: its field, where it may come from, and what it means (for help and docs)."""

    name: str
    help: str
    default: str
    parse: Callable[[Any, str], Any] = _text
    flag: str | None = None
    variable: str | None = None
    key: str | None = None  # in the config file; None for secrets and test-only settings


OPTIONS: tuple[Option, ...] = (
    Option("site_url", "your GoatCounter site (`/api/v0` is added when it has no path)", "(none: required)",
           lambda v, s: check_url(str(v), s), None, SITE_URL_VARIABLE, "url"),
    Option("host", "address REST and MCP listen on", DEFAULT_HOST, _text, "--host", "GOATCOUNTER_EXPORTS_HOST", "host"),
    Option("rest_port", "REST port (0: any free port)", "the spec's, 8080", _port, "--rest-port",
           "GOATCOUNTER_EXPORTS_REST_PORT", "rest_port"),
    Option("mcp_port", "MCP port (0: any free port)", "the spec's, 9090", _port, "--mcp-port",
           "GOATCOUNTER_EXPORTS_MCP_PORT", "mcp_port"),
    Option("allowed_hosts", "extra Host names REST and MCP answer to (comma-separated)", "(none)", _hosts,
           "--allowed-host", "GOATCOUNTER_EXPORTS_ALLOWED_HOSTS", "allowed_hosts"),
    Option("auth_token", "token REST and MCP clients must send (`Authorization: Bearer ...`); never in the file",
           "(none: loopback only)", lambda v, s: check_token(str(v), s), "--auth-token",
           "GOATCOUNTER_EXPORTS_AUTH_TOKEN", None),
    Option("connect_timeout", "seconds to connect to GoatCounter", "5", _number(float), None,
           "GOATCOUNTER_EXPORTS_CONNECT_TIMEOUT", "connect_timeout"),
    Option("read_timeout", "seconds to wait for GoatCounter's answer", "30", _number(float), None,
           "GOATCOUNTER_EXPORTS_READ_TIMEOUT", "read_timeout"),
    Option("state_dir", "where the state store (export budget, idempotency keys) and verified copies live",
           "~/.local/state/goatcounter-exports", _path, None, "GOATCOUNTER_EXPORTS_STATE_DIR", "state_dir"),
    Option("state_url", "a PostgreSQL state store shared by replicas (postgresql://...); a password is better in "
           "PGPASSWORD or ~/.pgpass", "(none: SQLite in the state directory)", _postgres_url, "--state",
           "GOATCOUNTER_EXPORTS_STATE_URL", "state"),
    Option("database_path", "the synced database: a SQLite file, or a postgresql:// URL (`sync` only; a password is "
           "better in PGPASSWORD or ~/.pgpass)", "pageviews.sqlite3 in the state directory", _database, "--db",
           "GOATCOUNTER_EXPORTS_DB", "database"),
    Option("cache_dir", "where scripts/install-goatcounter puts GoatCounter (for `demo`)",
           "~/.cache/goatcounter-exports", _path, None, "GOATCOUNTER_EXPORTS_CACHE", "cache_dir"),
    Option("log_format", "text, or json (one object a line, with the request id)", "text", _choice("text", "json"),
           "--log-format", "GOATCOUNTER_EXPORTS_LOG_FORMAT", "log_format"),
    Option("log_level", "debug, info, warning or error", "warning", _choice("debug", "info", "warning", "error"),
           "--log-level", "GOATCOUNTER_EXPORTS_LOG_LEVEL", "log_level"),
    Option("crash_at", "tests only: where `sync` kills itself (download, before-commit, after-commit)", "(none)",
           _choice(*CRASH_POINTS), None, "GOATCOUNTER_EXPORTS_CRASH_AT", None),
)  # fmt: skip
BY_NAME = {option.name: option for option in OPTIONS}
CONFIG_KEYS = {option.key: option for option in OPTIONS if option.key}


SECRET_KEYS = ("api_key", "key", "token", "auth_token", "password")


@dataclass(frozen=True)
class Site:
    """One site of the config file's `[[sites]]`, for `sync --all`: its URL, and the variable holding its key."""

    name: str
    url: str
    key_variable: str


def read_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    """The config file as TOML data; {} when there is none and none was asked for."""
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        if required:
            raise ConfigError(f"the config file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None


def parse_sites(data: Mapping[str, Any], path: Path) -> tuple[Site, ...]:
    """`[[sites]]` entries: `url`, `key_env` (the variable that holds the key: keys are never in the file), and
    an optional `name` (default: the URL's host)."""
    entries = data.get("sites", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: sites must be a list of tables ([[sites]])")
    sites = []
    for index, entry in enumerate(entries, 1):
        where = f"{path}: sites #{index}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        secret = next((k for k in entry if k in SECRET_KEYS), None)
        if secret:
            raise ConfigError(
                f"{where}: {secret!r} is a secret and is never read from a file; name its variable in key_env"
            )
        unknown = set(entry) - {"name", "url", "key_env"}
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))} (known: name, url, key_env)")
        if "url" not in entry or "key_env" not in entry:
            raise ConfigError(f"{where} needs url and key_env (the variable that holds its key)")
        url = check_url(str(entry["url"]), f"{where} url")
        variable = str(entry["key_env"])
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
            raise ConfigError(f"{where}: key_env must name an environment variable, got {variable!r}")
        sites.append(Site(str(entry.get("name") or urlsplit(url).netloc), url, variable))
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two sites have the same name; give them names of their own")
    return tuple(sites)


def load_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    """The config file's settings by field name (its `[[sites]]` under "sites"); {} when there is none."""
    data = read_config_file(path, required=required)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECRET_KEYS:
            raise ConfigError(f"{path}: {key!r} is a secret and is never read from a file; use its variable")
        if key == "sites":
            values["sites"] = parse_sites(data, path)
            continue
        if key not in CONFIG_KEYS:
            known = ", ".join(sorted(CONFIG_KEYS))
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
        option = CONFIG_KEYS[key]
        values[option.name] = option.parse(value, f"{path}: {key}")
    return values


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
    database_path: Path | None = None  # the synced copy in SQLite; default: in state_dir
    database_url: str | None = field(default=None, repr=False)  # or in PostgreSQL (may hold a password)
    cache_dir: Path = Path(".")
    crash_at: str | None = None  # tests only: where `sync` kills itself
    auth_token: str | None = field(default=None, repr=False)  # what REST and MCP clients must present
    state_url: str | None = field(default=None, repr=False)  # a PostgreSQL state store (may hold a password)
    insecure_no_auth: bool = False  # serve a non-loopback address without inbound authentication
    log_format: str = "text"
    log_level: str = "warning"
    sites: tuple[Site, ...] = ()  # the config file's [[sites]], for `sync --all`
    site_keys: Mapping[str, str] = field(default_factory=dict, repr=False)  # site name -> its key, if set
    config_file: Path | None = None  # the config file read, if any
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False)  # where each setting came from

    @property
    def database(self) -> Path:
        """The SQLite copy (what browse, pageview-stats and the metrics read)."""
        return self.database_path or self.state_dir / "pageviews.sqlite3"

    @property
    def warehouse(self) -> Path | str:
        """Where `sync` writes: the PostgreSQL URL when one is set, else the SQLite file."""
        return self.database_url or self.database

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        config_file: Path | None = None,
        namespaces: Iterable[str] = (),
        bound: Iterable[str] = (),
        **flags: Any,
    ) -> Settings:
        """Flags (None means "not given") over the environment over the config file over the defaults.

        The config file is `config_file`, else $GOATCOUNTER_EXPORTS_CONFIG, else the default path when
        it exists. `namespaces` are the consumed namespaces, each of which may be pointed elsewhere with
        `<NAMESPACE>_URL`; `bound` are the variables the capability binds (its secrets).
        """
        env = environ
        named = config_file or (Path(env[CONFIG_VARIABLE]) if env.get(CONFIG_VARIABLE) else None)
        path = named or default_config_file(env)
        from_file = load_config_file(path, required=named is not None)
        values: dict[str, Any] = {
            "state_dir": default_state_dir(env),
            "cache_dir": default_cache_dir(env),
            "secrets": {name: env[name] for name in bound if env.get(name)},
            "config_file": path if (named or from_file) else None,
        }
        sources: dict[str, Source] = {option.name: "default" for option in OPTIONS}
        for name, value in from_file.items():
            values[name], sources[name] = value, "config file"
        values["site_keys"] = {s.name: env[s.key_variable] for s in values.get("sites", ()) if env.get(s.key_variable)}
        for option in OPTIONS:
            if option.variable and env.get(option.variable):
                values[option.name] = option.parse(env[option.variable], option.variable)
                sources[option.name] = "environment"
        urls = {
            namespace: check_url(env[namespace_variable(namespace)], namespace_variable(namespace))
            for namespace in namespaces
            if env.get(namespace_variable(namespace))
        }
        values["upstream_urls"] = {**urls, **(flags.pop("upstream_urls", None) or {})}
        for name, value in flags.items():
            if value is None:
                continue
            known = BY_NAME.get(name)
            values[name] = known.parse(value, known.flag or name) if known else value
            if known:
                sources[name] = "flag"
        if isinstance(values.get("database_path"), str):  # a postgresql:// URL
            values["database_url"] = values.pop("database_path")
        return cls(**values, sources=sources)

    def with_site(self, site_url: str, secrets: Mapping[str, str]) -> Settings:
        """These settings pointed at another site with other secrets (the demo's local GoatCounter)."""
        return replace(self, site_url=check_url(site_url, SITE_URL_VARIABLE), secrets=dict(secrets))

    def shown(self) -> list[tuple[str, str, str]]:
        """(setting, value, source) for every option, secrets masked: what `goatcounter-exports config` prints."""
        rows: list[tuple[str, str, str]] = []
        for option in OPTIONS:
            value: Any = getattr(self, option.name)
            if option.name == "database_path":
                value = _masked(self.database_url) if self.database_url else self.database
            if option.name == "auth_token" and value:
                value = f"(set, {len(value)} characters)"
            if option.name == "state_url" and value:
                value = _masked(value)
            shown = option.default if value is None or value == () else str(value)
            source = self.sources.get(option.name, "default")
            rows.append((option.variable or option.flag or option.name, shown, source))
        for name, secret in self.secrets.items():
            rows.append((name, f"(set, {len(secret)} characters)", "environment"))
        return rows


def _masked(url: str) -> str:
    """A URL with its password, if any, shown as ***."""
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url


def reference_markdown() -> str:
    """The table of every setting, as docs/configuration.md shows it (a test keeps the two equal)."""
    lines = ["| setting | flag | variable | config key | default | meaning |", "|---|---|---|---|---|---|"]
    for option in OPTIONS:
        cells = [option.name, option.flag or "", option.variable or "", option.key or "", option.default, option.help]
        lines.append("| " + " | ".join(f"`{c}`" if c and i in (1, 2, 3) else c for i, c in enumerate(cells)) + " |")
    return "\n".join(lines) + "\n"
