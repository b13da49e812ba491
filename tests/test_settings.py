"""Typed settings, resolved once; the binds checked at start; the one map from errors to what users see."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from goatcounter_exports import errors
from goatcounter_exports.app import build_app
from goatcounter_exports.errors import ConfigError, ExportDeleted
from goatcounter_exports.goatcounter.exportfile import refusal
from goatcounter_exports.goatcounter.exports import Export
from goatcounter_exports.settings import Settings
from goatcounter_exports.spec import load_default
from goatcounter_exports.upstream import UpstreamResponse

pytestmark = pytest.mark.fast

KEY = "GOATCOUNTER_API_KEY"


def test_settings_read_only_the_variables_they_know_and_the_binds() -> None:
    environ = {
        KEY: "k-123",
        "GOATCOUNTER_URL": "https://mysite.goatcounter.com/",
        "GOATCOUNTER_EXPORTS_URL": "http://127.0.0.1:9/api/v0",
        "UNRELATED_SECRET": "x",
        "HOME": "/h",
    }
    settings = Settings.from_environ(environ, namespaces=["goatcounter-exports"], bound=[KEY], rest_port=0)
    assert settings.secrets == {KEY: "k-123"}
    assert settings.site_url == "https://mysite.goatcounter.com"
    assert settings.upstream_urls == {"goatcounter-exports": "http://127.0.0.1:9/api/v0"}
    assert settings.state_dir == Path("/h/.local/state/goatcounter-exports")
    assert settings.rest_port == 0
    assert "k-123" not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("GOATCOUNTER_URL", "mysite.goatcounter.com", "must be an http(s) URL"),
        ("GOATCOUNTER_URL", "https://user:pw@mysite.goatcounter.com", "must not carry credentials"),
        ("GOATCOUNTER_EXPORTS_READ_TIMEOUT", "soon", "must be a number"),
        ("GOATCOUNTER_EXPORTS_CRASH_AT", "nowhere", "must be one of"),
    ],
)
def test_malformed_settings_are_refused_at_start(variable: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_environ({variable: value})


@pytest.mark.parametrize(
    ("secrets", "words"),
    [
        ({}, "GOATCOUNTER_API_KEY is not set: the capability binds it as env.GOATCOUNTER_API_KEY"),
        ({KEY: "abc\n"}, "GOATCOUNTER_API_KEY contains a control character"),
    ],
)
def test_the_binds_are_resolved_when_the_app_is_built(secrets: dict[str, str], words: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        build_app(load_default(), Settings(site_url="https://x.goatcounter.com", secrets=secrets, state_dir=tmp_path))
    assert words in str(raised.value) and "abc" not in str(raised.value)


def test_a_key_without_a_site_is_an_error_not_goatcounter_com_itself(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GOATCOUNTER_URL is not set"):
        build_app(load_default(), Settings(secrets={KEY: "k" * 20}, state_dir=tmp_path))


def test_the_config_file_sits_under_the_environment_and_the_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('url = "https://file.goatcounter.com"\nrest_port = 8181\nmcp_port = 9191\nlog_format = "json"\n')
    environ = {"GOATCOUNTER_EXPORTS_MCP_PORT": "9292", "HOME": str(tmp_path)}
    settings = Settings.from_environ(environ, config_file=config, rest_port=None, log_format=None, mcp_port=None)
    assert (settings.site_url, settings.rest_port, settings.mcp_port) == ("https://file.goatcounter.com", 8181, 9292)
    assert settings.sources["rest_port"] == "config file" and settings.sources["mcp_port"] == "environment"
    assert Settings.from_environ(environ, config_file=config, rest_port=8383).rest_port == 8383
    config.write_text('api_key = "secret-in-a-file"\n')
    with pytest.raises(ConfigError, match="never read from a file"):
        Settings.from_environ(environ, config_file=config)
    config.write_text("rest_prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'rest_prot'"):
        Settings.from_environ(environ, config_file=config)


def test_every_error_has_one_exit_code_and_one_http_status() -> None:
    cases = [
        (errors.InputError("x"), 2, 400),
        (errors.ConfigError("x"), 2, 500),
        (errors.ApiError.of(404, "not found"), 4, 404),
        (errors.ApiError.of(429, "slow down", retry_after=3), 3, 429),
        (errors.UpstreamTimeout("x", host="h"), 4, 504),
        (errors.UpstreamUnreachable("x", host="h"), 4, 502),
        (errors.WaitTimeout("x"), 5, 504),
        (errors.IntegrityError("x"), 6, 502),
        (errors.ExportDeleted("x"), 4, 410),
        (errors.StateError("x"), 1, 503),
    ]
    assert [(errors.exit_code(e), errors.http_status(e)) for e, _, _ in cases] == [(c, s) for _, c, s in cases]
    assert isinstance(cases[3][0], errors.RateLimited)
    assert errors.exit_code(KeyboardInterrupt()) == 130


@pytest.mark.parametrize(
    ("status", "finished", "deleted"),
    [
        (400, "2026-11-26T09:00:00Z", True),  # GoatCounter's own words: "... this export file has been deleted"
        (500, "2020-01-01T09:00:00Z", True),  # after its daily clean-up the download answers 500
        (500, None, False),  # a 500 of an export made within the day is another failure, and says so
    ],
)
def test_a_deleted_export_file_is_told_apart_from_other_refusals(
    status: int, finished: str | None, deleted: bool
) -> None:
    message = "exports are kept for 24 hours; this export file has been deleted" if status == 400 else "oops"
    response = UpstreamResponse(
        status, {"Content-Type": "text/plain"}, "gc", body=json.dumps({"error": message}).encode()
    )
    finished_at = finished or datetime.now(UTC).isoformat()
    error = asyncio.run(refusal(Export({"id": 3, "finished_at": finished_at}), response))
    assert isinstance(error, ExportDeleted) is deleted
    assert errors.http_status(error) == (410 if deleted else 500)
