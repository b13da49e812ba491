"""GoatCounter's own rate limits, kept at their defaults (one export an hour per IP), each test on a
dedicated instance so the budget starts full."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from goatcounter_exports.testbed import LocalGoatCounter

from .conftest import service_env
from .support import SERVE, RecordingProxy, call_tool, goatcounter_binary, running


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[LocalGoatCounter]:
    instance = LocalGoatCounter(goatcounter_binary(), tmp_path / "limited", ratelimit=None)
    with instance:
        instance.seed(["/a", "/b"])
        yield instance


def spend_the_hour(goatcounter: LocalGoatCounter) -> None:
    """One create straight to GoatCounter, as another tool behind the same IP would."""
    answer = goatcounter.request("POST", "/api/v0/export", key=goatcounter.export_key, body={})
    assert answer.status == 202


def test_second_create_within_the_hour_is_answered_locally_with_the_recent_export(
    limited: LocalGoatCounter, tmp_path: Path
) -> None:
    with RecordingProxy(limited.url) as proxy:
        env = service_env(limited, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env) as service:
            first = httpx.post(f"{service.rest}/v1/export", json={}, timeout=30)
            second = httpx.post(f"{service.rest}/v1/export", json={"start_from_hit_id": 1}, timeout=30)
    assert first.status_code == 202
    assert first.headers["x-rate-limit-limit"] == "1"  # learnt from GoatCounter, not assumed
    assert second.status_code == 429
    assert 3500 <= int(second.headers["retry-after"]) <= 3600
    assert second.json()["recent_export_id"] == first.json()["id"]
    assert proxy.paths("POST") == ["/api/v0/export"]


def test_budget_is_shared_by_rest_mcp_and_processes_through_the_state_store(
    limited: LocalGoatCounter, tmp_path: Path
) -> None:
    with RecordingProxy(limited.url) as proxy:
        env = service_env(limited, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env) as service:
            assert httpx.post(f"{service.rest}/v1/export", json={}, timeout=30).status_code == 202
        # A new process with the same state directory knows the budget is spent, through MCP too.
        with running(SERVE, env) as service:
            result = call_tool(service.mcp, "create-csv-export", {})
    assert result.is_error  # type: ignore[attr-defined]
    text = result.content[0].text  # type: ignore[attr-defined]
    assert "429" in text and "wait" in text
    assert proxy.paths("POST") == ["/api/v0/export"]


def test_rest_passes_goatcounters_own_429_through_with_its_headers(limited: LocalGoatCounter, tmp_path: Path) -> None:
    spend_the_hour(limited)
    with RecordingProxy(limited.url) as proxy:
        env = service_env(limited, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env) as service:
            refused = httpx.post(f"{service.rest}/v1/export", json={}, timeout=30)
            again = httpx.post(f"{service.rest}/v1/export", json={}, timeout=30)
    assert refused.status_code == 429
    assert 3500 <= int(refused.headers["retry-after"]) <= 3600
    assert refused.headers["x-rate-limit-remaining"] == "0"
    assert "rate limit" in refused.json()["error"]
    assert again.status_code == 429  # now answered locally: the refusal taught us the budget
    assert proxy.paths("POST") == ["/api/v0/export"]


def test_mcp_429_is_an_error_that_says_how_long_to_wait(limited: LocalGoatCounter, tmp_path: Path) -> None:
    spend_the_hour(limited)
    with running(SERVE, service_env(limited, tmp_path)) as service:
        result = call_tool(service.mcp, "create-csv-export", {})
    assert result.is_error  # type: ignore[attr-defined]
    text = result.content[0].text  # type: ignore[attr-defined]
    assert "429" in text and "wait 3" in text and "seconds" in text


def test_reads_wait_out_the_four_a_second_limit(limited: LocalGoatCounter, tmp_path: Path) -> None:
    """GoatCounter allows 4 API reads a second; a burst of reads is slowed down, not refused."""
    with running(SERVE, service_env(limited, tmp_path)) as service, httpx.Client(timeout=30) as client:
        statuses = [client.get(f"{service.rest}/v1/export/424242").status_code for _ in range(10)]
    assert statuses == [404] * 10
    # Without the wait, GoatCounter itself refuses the fifth read within the second:
    direct = [limited.request("GET", "/api/v0/export/424242", key=limited.export_key).status for _ in range(6)]
    assert 429 in direct
