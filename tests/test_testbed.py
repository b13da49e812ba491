"""The test bed itself: a real GoatCounter v2.7.0 started by goatcounter_exports.testbed.

These tests need the binary from scripts/install-goatcounter; without it they fail (never
skip) with an error that names the script.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from goatcounter_exports.errors import GoatCounterNotInstalled
from goatcounter_exports.settings import default_cache_dir
from goatcounter_exports.testbed import BINARY_NAME, GOATCOUNTER_VERSION, INSTALL_SCRIPT, LocalGoatCounter, find_binary

from .support import goatcounter_binary


@pytest.fixture(scope="module")
def fresh_goatcounter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGoatCounter]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path_factory.mktemp("goatcounter")) as gc:
        yield gc


def test_seeded_pageviews_are_stored(fresh_goatcounter: LocalGoatCounter) -> None:
    assert fresh_goatcounter.hit_count() == 0
    fresh_goatcounter.seed(["/one", "/two", "/three", "/four", "/five"])
    assert fresh_goatcounter.hit_count() == 5


def test_status_reports_the_release_version(fresh_goatcounter: LocalGoatCounter) -> None:
    result = fresh_goatcounter.request("GET", "/status")
    assert result.status == 200
    assert result.json()["version"] == GOATCOUNTER_VERSION
    assert fresh_goatcounter.version == GOATCOUNTER_VERSION
    assert fresh_goatcounter.url == f"http://127.0.0.1:{fresh_goatcounter.port}"


def test_tokens_have_the_expected_permissions(fresh_goatcounter: LocalGoatCounter) -> None:
    # GET of an unknown export checks the `export` permission first, and spends no export budget.
    assert fresh_goatcounter.request("GET", "/api/v0/export/99999", key=fresh_goatcounter.export_key).status == 404
    refused = fresh_goatcounter.request("GET", "/api/v0/export/99999", key=fresh_goatcounter.noexport_key)
    assert refused.status == 403
    assert refused.json() == {"error": "requires 'export' permissions"}
    assert fresh_goatcounter.export_key != fresh_goatcounter.noexport_key


def test_secrets_stay_out_of_reprs(fresh_goatcounter: LocalGoatCounter) -> None:
    text = repr(fresh_goatcounter) + repr(fresh_goatcounter.site)
    assert fresh_goatcounter.export_key not in text
    assert fresh_goatcounter.noexport_key not in text
    assert fresh_goatcounter.site.password not in text


def test_default_cache_dir_follows_the_install_script() -> None:
    assert default_cache_dir({"GOATCOUNTER_EXPORTS_CACHE": "/c", "XDG_CACHE_HOME": "/x"}) == Path("/c")
    assert default_cache_dir({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/goatcounter-exports")
    assert default_cache_dir({"HOME": "/h"}) == Path("/h/.cache/goatcounter-exports")


def test_find_binary_names_the_install_script_when_missing(tmp_path: Path) -> None:
    with pytest.raises(GoatCounterNotInstalled, match=INSTALL_SCRIPT):
        find_binary(tmp_path / "no-such-goatcounter", cache_dir=tmp_path)


def test_find_binary_prefers_the_cache(tmp_path: Path) -> None:
    cached = tmp_path / "bin" / BINARY_NAME
    cached.parent.mkdir()
    cached.write_text("#!/bin/sh\n")
    cached.chmod(0o755)
    assert find_binary(cache_dir=tmp_path) == cached
