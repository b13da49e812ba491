"""The REST adapter end to end: the real CLI, real HTTP, and a real GoatCounter behind it."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections import Counter
from pathlib import Path

import httpx
import pytest

from goatcounter_exports.testbed import LocalGoatCounter

from .conftest import SEEDED_PATHS, service_env
from .support import SERVE, RecordingProxy, Service, free_port, goatcounter_binary, poll_export, running, silent_server

CSV_HEADER = (
    "2Path,Title,Event,UserAgent,Browser,System,Session,Bot,Referrer,Referrer scheme,Screen size,Location,"
    "FirstVisit,Date"
)


def read_rows(data: bytes) -> tuple[list[str], list[dict[str, str]]]:
    text = data.decode("utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    rows = [dict(zip(header, row, strict=True)) for row in reader]
    return header, rows


@pytest.fixture(scope="module")
def finished_export(service: Service) -> dict[str, object]:
    with httpx.Client(timeout=30) as client:
        created = client.post(f"{service.rest}/v1/export", json={})
        assert created.status_code == 202, created.text
        export = created.json()
        assert export["id"] >= 1 and export["finished_at"] is None
        return poll_export(client, service.rest, int(export["id"]))


def test_export_roundtrip_rows_equal_seeded_pageviews(service: Service, finished_export: dict[str, object]) -> None:
    with httpx.Client(timeout=30) as client:
        response = client.get(f"{service.rest}/v1/export/{finished_export['id']}/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;") and disposition.rstrip('"').endswith(".csv.gz")
    assert int(response.headers["content-length"]) == len(response.content)
    # The bytes are GoatCounter's file, untouched: their SHA-256 is the export's hash.
    assert finished_export["hash"] == "sha256-" + hashlib.sha256(response.content).hexdigest()
    header, rows = read_rows(gzip.decompress(response.content))
    assert ",".join(header) == CSV_HEADER
    assert Counter(row["2Path"] for row in rows) == Counter(SEEDED_PATHS)
    assert finished_export["num_rows"] == len(SEEDED_PATHS)


def test_download_with_accept_csv_is_decompressed_on_the_fly(
    service: Service, finished_export: dict[str, object]
) -> None:
    with httpx.Client(timeout=30) as client:
        response = client.get(
            f"{service.rest}/v1/export/{finished_export['id']}/download", headers={"Accept": "text/csv"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].rstrip('"').endswith(".csv")
    header, rows = read_rows(response.content)
    assert header[0] == "2Path"
    assert Counter(row["2Path"] for row in rows) == Counter(SEEDED_PATHS)


def test_get_export_passes_the_export_object_through(service: Service, finished_export: dict[str, object]) -> None:
    with httpx.Client(timeout=30) as client:
        response = client.get(f"{service.rest}/v1/export/{finished_export['id']}")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == finished_export["id"]
    assert body["last_hit_id"] >= len(SEEDED_PATHS)
    # GoatCounter's rate-limit headers pass through; a finished export already seen is answered without asking it
    assert "x-rate-limit-limit" in response.headers or response.headers.get("x-cache") == "hit"


def test_unknown_export_id_is_404_json(service: Service) -> None:
    response = httpx.get(f"{service.rest}/v1/export/99999", timeout=30)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "not found"}


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/export/abc", "id"),
        ("/v1/export/0", "id"),
        ("/v1/export/-4", "id"),
        ("/v1/export/2147483648", "id"),
        ("/v1/export/1.5/download", "id"),
    ],
)
def test_bad_id_is_400_without_upstream_call(proxied: tuple[Service, RecordingProxy], path: str, field: str) -> None:
    service, proxy = proxied
    response = httpx.get(service.rest + path, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert proxy.requests == []


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[1, 2]", "application/json"),
        (b'"text"', "application/json"),
        (b"{not json", "application/json"),
        (b'{"start_from_hit_id": "ten"}', "application/json"),
        (b'{"start_from_hit_id": -1}', "application/json"),
        (b'{"unknown_field": 1}', "application/json"),
        (b'{"format": "json", "start_from_hit_id": 3}', "application/json"),
        (b'{"format": "json"}', "application/json"),  # v2.7.0 has no JSON exports
        (b'{"pad": "' + b"x" * 70_000 + b'"}', "application/json"),
    ],
)
def test_bad_create_body_is_refused_without_spending_the_export_budget(
    proxied: tuple[Service, RecordingProxy], body: bytes, content_type: str
) -> None:
    service, proxy = proxied
    response = httpx.post(f"{service.rest}/v1/export", content=body, headers={"Content-Type": content_type}, timeout=30)
    assert response.status_code in (400, 413), response.text
    assert "error" in response.json()
    assert proxy.paths("POST") == []


def test_create_on_v270_sends_no_format_field(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    """v2.7.0 refuses a `format` field (and still charges the hourly budget): the runtime leaves it out."""
    with RecordingProxy(goatcounter.url) as proxy:
        env = service_env(goatcounter, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env) as service:
            response = httpx.post(f"{service.rest}/v1/export", json={"format": "csv"}, timeout=30)
    assert response.status_code == 202, response.text
    posts = [(p, b) for m, p, b in proxy.requests if m == "POST"]
    assert posts == [("/api/v0/export", b"{}")]
    # The version was learnt first, from /status, which costs no export budget (serve asks it at start).
    paths = proxy.paths()
    assert paths[0] == "/status" and paths.count("/api/v0/export") == 1


def test_bad_token_is_401_passed_through(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path, key="not-a-real-token")
    with running(SERVE, env) as service:
        response = httpx.get(f"{service.rest}/v1/export/1", timeout=30)
    assert response.status_code == 401
    assert response.json() == {"error": "unknown token"}
    assert "not-a-real-token" not in service.output()


def test_token_without_export_permission_is_403(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path, key=goatcounter.noexport_key)
    with running(SERVE, env) as service:
        response = httpx.get(f"{service.rest}/v1/export/1", timeout=30)
    assert response.status_code == 403
    assert "export" in response.json()["error"]


def test_download_before_finished_is_202(tmp_path: Path) -> None:
    """An export of more than one 5000-row batch pauses between batches: asked at once, it is not ready."""
    big = LocalGoatCounter(goatcounter_binary(), tmp_path / "big")
    big.start()
    try:
        big.seed([f"/bulk-{i}" for i in range(10_200)])  # three batches: two 0.5 s pauses to catch it running
        check_not_ready_then_ready(big, tmp_path)
    finally:
        big.stop()


def check_not_ready_then_ready(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path)
    with running(SERVE, env) as service, httpx.Client(timeout=30) as client:
        created = client.post(f"{service.rest}/v1/export", json={})
        assert created.status_code == 202
        early = client.get(f"{service.rest}/v1/export/{created.json()['id']}/download")
        assert early.status_code == 202
        assert early.json() == {"error": "still being generated"}
        export = poll_export(client, service.rest, int(created.json()["id"]))
        assert int(str(export["num_rows"])) >= 10_200


def test_upstream_stopped_is_502_naming_the_host_not_the_key(tmp_path: Path) -> None:
    port = free_port()
    secret = "s3cret-key-for-test"
    env = {
        **service_env_without_bed(tmp_path, secret),
        "GOATCOUNTER_URL": f"http://127.0.0.1:{port}",
    }
    with running(SERVE, env) as service:
        response = httpx.get(f"{service.rest}/v1/export/1", timeout=30)
        output = service.output()
    assert response.status_code == 502
    assert f"127.0.0.1:{port}" in response.json()["error"]
    assert secret not in response.text and secret not in output


def test_upstream_timeout_is_504(tmp_path: Path) -> None:
    secret = "s3cret-key-for-timeout"
    with silent_server() as url:
        env = {
            **service_env_without_bed(tmp_path, secret),
            "GOATCOUNTER_URL": url,
            "GOATCOUNTER_EXPORTS_READ_TIMEOUT": "0.5",
        }
        with running(SERVE, env) as service:
            response = httpx.get(f"{service.rest}/v1/export/1", timeout=30)
            output = service.output()
    assert response.status_code == 504
    assert url.removeprefix("http://") in response.json()["error"]
    assert secret not in response.text and secret not in output


def service_env_without_bed(state: Path, key: str) -> dict[str, str]:
    from .support import clean_env

    return clean_env(GOATCOUNTER_API_KEY=key, GOATCOUNTER_EXPORTS_STATE_DIR=str(state))


def test_openapi_document_is_valid_and_tells_the_truth(service: Service) -> None:
    from openapi_spec_validator import validate

    document = httpx.get(f"{service.rest}/openapi.json", timeout=30).json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {"/v1/export", "/v1/export/{id}", "/v1/export/{id}/download"}
    download = document["paths"]["/v1/export/{id}/download"]["get"]
    assert set(download["responses"]["200"]["content"]) == {"application/gzip", "text/csv"}
    assert {"202", "400", "401", "403", "404", "429", "502", "504"} <= set(download["responses"])
    (parameter,) = download["parameters"]
    assert parameter["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
    create = document["paths"]["/v1/export"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False and "start_from_hit_id" in body["properties"]
    assert "Export" in document["components"]["schemas"] and "Error" in document["components"]["schemas"]


def test_idempotency_key_gives_the_same_export_not_a_second_one(service: Service) -> None:
    with httpx.Client(timeout=30) as client:
        key = {"Idempotency-Key": "nightly-2026-11-26"}
        first = client.post(f"{service.rest}/v1/export", json={}, headers=key)
        retry = client.post(f"{service.rest}/v1/export", json={}, headers=key)
        other = client.post(f"{service.rest}/v1/export", json={}, headers={"Idempotency-Key": "another"})
    assert first.status_code == retry.status_code == other.status_code == 202
    assert retry.json()["id"] == first.json()["id"]
    assert retry.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.json()["id"] != first.json()["id"]
