"""The replay server answers like the recording of GoatCounter main it serves (tests/fixtures/main)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from .replay import (
    EXPORT_KEY,
    FIXTURES,
    NOT_RECORDED,
    PLACEHOLDERS,
    SITEREAD_KEY,
    ReplayGoatCounter,
    ReplayRequest,
    load_cassette,
    load_truth,
)

pytestmark = pytest.mark.fast

TRUTH = load_truth()
PHASE1 = int(TRUTH["phase1"]["export_id"])
PHASE2 = int(TRUTH["phase2"]["export_id"])


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = {name.lower(): value for name, value in response.getheaders()}
        self.body = response.read()

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
def replay() -> Iterator[ReplayGoatCounter]:
    with ReplayGoatCounter(FIXTURES) as server:
        yield server


@pytest.fixture
def conn(replay: ReplayGoatCounter) -> Iterator[http.client.HTTPConnection]:
    """One keep-alive connection to the replay server, as a pooled client would hold it."""
    address = urlsplit(replay.url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=10)
    try:
        yield connection
    finally:
        connection.close()


def call(
    conn: http.client.HTTPConnection, method: str, path: str, *, key: str | None = None, body: bytes | None = None
) -> Answer:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=headers)
    return Answer(conn.getresponse())


def test_a_never_used_token_answers_404_then_200_and_200_after(
    replay: ReplayGoatCounter, conn: http.client.HTTPConnection
) -> None:
    first = call(conn, "GET", "/api/v0/me", key=EXPORT_KEY)
    assert (first.status, first.json()) == (404, {"error": "not found"})
    assert first.headers["content-type"] == "text/plain; charset=utf-8"
    for _ in range(2):  # the last recorded answer is repeated
        again = call(conn, "GET", "/api/v0/me", key=EXPORT_KEY)
        assert again.status == 200
        assert again.json()["token"]["permissions"] == 6
    # Each token has its own sequence.
    assert call(conn, "GET", "/api/v0/me", key=SITEREAD_KEY).status == 404
    assert call(conn, "GET", "/api/v0/me", key=SITEREAD_KEY).json()["token"]["permissions"] == 14
    assert replay.unmatched == []
    assert [r.path for r in replay.requests] == ["/api/v0/me"] * 5


def test_polls_are_answered_in_recorded_order(conn: http.client.HTTPConnection) -> None:
    answers = [call(conn, "GET", f"/api/v0/export/{PHASE1}", key=EXPORT_KEY).json() for _ in range(5)]
    finished = [bool(a["finished_at"]) for a in answers]
    assert finished[-1] and finished == sorted(finished)  # running (as recorded), then finished for good
    assert answers[-1]["hash"] == TRUTH["phase1"]["export_hash"]
    assert answers[-1]["path"].startswith("/var/goatcounter/tmp/goatcounter-export-")


def test_the_zip_is_the_recorded_export_byte_for_byte(
    replay: ReplayGoatCounter, conn: http.client.HTTPConnection
) -> None:
    for export_id in (PHASE1, PHASE2):
        download = call(conn, "GET", f"/api/v0/export/{export_id}/download", key=EXPORT_KEY)
        assert download.status == 200
        assert download.headers["content-type"] == "application/gzip"
        assert download.headers["transfer-encoding"] == "chunked"  # as main sent it
        assert download.body[:4] == b"PK\x03\x04"
        assert "sha256-" + hashlib.sha256(download.body).hexdigest() == replay.export(export_id)["hash"]


def test_csv_download_has_a_content_length_like_the_recording(
    replay: ReplayGoatCounter, conn: http.client.HTTPConnection
) -> None:
    csv_id = int(TRUTH["csv"]["export_ids"][0])
    download = call(conn, "GET", f"/api/v0/export/{csv_id}/download", key=EXPORT_KEY)
    assert download.status == 200
    assert download.headers["content-length"] == "20"
    assert "transfer-encoding" not in download.headers
    assert gzip.decompress(download.body) == b""
    assert "sha256-" + hashlib.sha256(download.body).hexdigest() == replay.export(csv_id)["hash"]


def test_key_order_and_spacing_of_a_json_body_do_not_matter(
    replay: ReplayGoatCounter, conn: http.client.HTTPConnection
) -> None:
    start_from_day = TRUTH["phase2"]["start_from_day"]
    assert start_from_day == f"{TRUTH['D']}T00:00:00Z"
    body = b'{ "start_from_day" : "%s",  "format": "json" }' % start_from_day.encode()
    created = call(conn, "POST", "/api/v0/export", key=EXPORT_KEY, body=body)
    assert created.status == 202
    assert created.json()["id"] == PHASE2
    assert created.json()["start_from_day"] == start_from_day
    assert replay.requests == [
        ReplayRequest("POST", "/api/v0/export", {"format": "json", "start_from_day": start_from_day})
    ]
    assert replay.unmatched == []


def test_an_unrecorded_request_answers_599_and_is_remembered(
    replay: ReplayGoatCounter, conn: http.client.HTTPConnection
) -> None:
    refused = call(conn, "POST", "/api/v0/export", key=EXPORT_KEY, body=b'{"format":"xml"}')
    assert refused.status == NOT_RECORDED
    assert refused.json() == {"error": 'not recorded: POST /api/v0/export {"format":"xml"}'}
    wrong_key = call(conn, "GET", "/api/v0/me", key=SITEREAD_KEY.replace("siteread", "stats"))
    assert wrong_key.status == NOT_RECORDED  # the stats key was never used in the cassette
    assert call(conn, "GET", "/status").status == 200  # the connection is still usable
    assert replay.unmatched == [
        ReplayRequest("POST", "/api/v0/export", {"format": "xml"}),
        ReplayRequest("GET", "/api/v0/me", None),
    ]
    assert len(replay.requests) == 3


def test_an_unknown_token_gets_mains_401_on_any_api_path(conn: http.client.HTTPConnection) -> None:
    for path in ("/api/v0/export/1", f"/api/v0/export/{PHASE2}/download", "/api/v0/me"):
        refused = call(conn, "GET", path, key="some-other-key")
        assert refused.status == 401
        assert refused.json() == {"error": "unknown token"}
        assert refused.headers["www-authenticate"] == "Basic realm=GoatCounter"


def test_a_download_can_be_overridden_for_fault_tests(
    replay: ReplayGoatCounter, conn: http.client.HTTPConnection
) -> None:
    original = replay.recorded_file(PHASE1)
    replay.override_download(PHASE1, original[: len(original) // 2])
    truncated = call(conn, "GET", f"/api/v0/export/{PHASE1}/download", key=EXPORT_KEY)
    assert truncated.status == 200
    assert truncated.body == original[: len(original) // 2]
    untouched = call(conn, "GET", f"/api/v0/export/{PHASE2}/download", key=EXPORT_KEY)
    assert untouched.body == replay.recorded_file(PHASE2)


def test_the_cassette_holds_placeholders_only() -> None:
    cassette = load_cassette()
    tokens = {i["request"]["token"] for i in cassette["interactions"]}
    assert tokens <= {*PLACEHOLDERS, None, "nope"}
    text = (FIXTURES / "cassette.json").read_text()
    assert "/tmp/" not in text.replace("/var/goatcounter/tmp/", "")
    assert cassette["goatcounter"]["version"].startswith(cassette["goatcounter"]["commit"] + "_")


def test_status_ignores_the_token_like_main(conn: http.client.HTTPConnection) -> None:
    for key in (None, EXPORT_KEY, "some-other-key"):
        status = call(conn, "GET", "/status", key=key)
        assert status.status == 200
        assert status.json()["version"] == TRUTH["goatcounter"]["version"]
