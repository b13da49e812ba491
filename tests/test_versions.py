"""Which create body a server wants: decided from what `/status` and `/api.json` say.

The real v2.7.0 case runs end to end in test_rest.py; main needs Go 1.27 to build, so its version strings
(read from GoatCounter's source: `<12 hex>_<commit time>`) are checked here.
"""

from __future__ import annotations

import pytest

from goatcounter_exports.errors import InputError
from goatcounter_exports.goatcounter.profile import adapt_create_body, site_api_url
from goatcounter_exports.goatcounter.versions import format_from_api_doc, format_from_version

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("v2.7.0", False),
        ("v2.6.1", False),
        ("v2.8.0", True),
        ("7e91d8a9bdbb_2025-12-15T18:20:31Z", False),  # v2.7.0 built from a checkout
        ("2c3b5d1e9f00_2026-04-25T18:35:22Z", True),  # the commit that made `format` required
        ("c957f51c43eb_2026-08-21T09:12:44Z-dev", True),  # main, dirty tree
        ("dev", None),  # `go install ...@v2.7.0`: ask /api.json
    ],
)
def test_format_from_version(version: str, expected: bool | None) -> None:
    assert format_from_version(version) is expected


def test_format_from_api_doc() -> None:
    main = {"definitions": {"handlers.apiExportRequest": {"properties": {"format": {}, "start_from_hit_id": {}}}}}
    old = {"definitions": {"handlers.apiExportRequest": {"properties": {"start_from_hit_id": {}}}}}
    assert format_from_api_doc(main) is True
    assert format_from_api_doc(old) is False
    assert format_from_api_doc("not json") is False


def test_create_body_per_version() -> None:
    assert adapt_create_body({}, "v2.7.0", False) == {}
    assert adapt_create_body({"format": "csv", "start_from_hit_id": 5}, "v2.7.0", False) == {"start_from_hit_id": 5}
    assert adapt_create_body({}, "main", True) == {"format": "csv"}
    assert adapt_create_body({"start_from_hit_id": 5}, "main", True) == {"format": "csv", "start_from_hit_id": 5}
    assert (
        adapt_create_body({"format": "json", "start_from_day": "2026-01-01T00:00:00Z"}, "main", True)["format"]
        == "json"
    )
    with pytest.raises(InputError, match="only csv"):
        adapt_create_body({"format": "json"}, "v2.7.0", False)
    with pytest.raises(InputError, match="start_from_hit_id only applies to csv"):
        adapt_create_body({"format": "json", "start_from_hit_id": 1}, "main", True)


@pytest.mark.parametrize(
    ("site", "api"),
    [
        ("https://mysite.goatcounter.com", "https://mysite.goatcounter.com/api/v0"),
        ("https://mysite.goatcounter.com/", "https://mysite.goatcounter.com/api/v0"),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081/api/v0"),
        ("https://stats.example.org/gc/api/v0", "https://stats.example.org/gc/api/v0"),
    ],
)
def test_site_url_gets_the_api_path(site: str, api: str) -> None:
    assert site_api_url(site) == api
