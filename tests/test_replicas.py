"""Several replicas of the gateway behind one address share one PostgreSQL state store, and so one budget:
against a real GoatCounter with its DEFAULT export limit (one an hour), through a real PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from goatcounter_exports.testbed import LocalGoatCounter

from .conftest import service_env
from .postgres import Cluster
from .support import CLI, ROOT, SERVE, RecordingProxy, goatcounter_binary, metric_samples, run_cli, running


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as started:
        yield started


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[LocalGoatCounter]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", ratelimit=None) as instance:
        instance.seed(["/a", "/b", "/c"])
        yield instance


def two_replicas(gc: LocalGoatCounter, proxy: RecordingProxy, state_url: str, tmp_path: Path) -> list[dict[str, str]]:
    """The environments of two replicas: each its own local state directory, one PostgreSQL state store."""
    return [
        service_env(gc, tmp_path / f"replica-{n}", GOATCOUNTER_URL=proxy.url, GOATCOUNTER_EXPORTS_STATE_URL=state_url)
        for n in (1, 2)
    ]


def test_concurrent_creates_on_two_replicas_make_one_upstream_post(
    limited: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    state_url = cluster.new_database()
    with RecordingProxy(limited.url) as proxy:
        envs = two_replicas(limited, proxy, state_url, tmp_path)
        with running(SERVE, envs[0]) as one, running(SERVE, envs[1]) as two:

            async def both() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60) as client:
                    calls = [client.post(f"{s.rest}/v1/export", json={}) for s in (one, two)]
                    return list(await asyncio.gather(*calls))

            answers = asyncio.run(both())
            # Both replicas show the budget the one create taught the shared store (not a file of their own).
            pages = [metric_samples(httpx.get(f"{s.rest}/metrics").text) for s in (one, two)]
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [202, 429], [a.text for a in answers]
    created = next(a for a in answers if a.status_code == 202).json()
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["recent_export_id"] == created["id"]  # the other replica's export, to reuse
    assert "Nothing was sent to GoatCounter" in refused.json()["error"]
    assert proxy.paths("POST") == ["/api/v0/export"]  # one create reached GoatCounter, whatever the replicas
    with psycopg.connect(state_url) as db:
        learnt = db.execute("select host, remaining from budgets").fetchall()
    assert learnt, "the create's answer taught the export budget"
    for page in pages:
        shown = {
            (dict(labels)["host"], dict(labels)["scope"]): v
            for (name, labels), v in page.items()
            if name == "goatcounter_exports_budget_remaining"
        }
        assert shown == {(key.partition(" ")[0], key.partition(" ")[2] or "export"): float(n) for key, n in learnt}
        assert shown[(proxy.url.removeprefix("http://"), "export")] == 0  # GoatCounter's default: one export an hour


def test_one_idempotency_key_sent_to_both_replicas_gives_one_export(
    limited: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    state_url = cluster.new_database()
    with RecordingProxy(limited.url) as proxy:
        envs = two_replicas(limited, proxy, state_url, tmp_path)
        with running(SERVE, envs[0]) as one, running(SERVE, envs[1]) as two:
            key = {"Idempotency-Key": "nightly-export-2026-11-26"}
            first = httpx.post(f"{one.rest}/v1/export", json={}, headers=key, timeout=60)
            retry = httpx.post(f"{two.rest}/v1/export", json={}, headers=key, timeout=60)
            other = httpx.post(f"{two.rest}/v1/export", json={"start_from_hit_id": 1}, headers=key, timeout=60)
    assert first.status_code == retry.status_code == 202
    assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422  # the key is bound to its request, on every replica
    assert proxy.paths("POST") == ["/api/v0/export"]


def test_a_replica_that_dies_holding_the_create_slot_blocks_no_one_for_long(
    limited: LocalGoatCounter, cluster: Cluster, tmp_path: Path
) -> None:
    """The slot is a row with an expiry, not a lease forever: a create slot left behind by a killed process
    is taken again once its hold (45 s) is over; nothing waits on a dead connection."""
    state_url = cluster.new_database()
    with running(SERVE, service_env(limited, tmp_path / "one", GOATCOUNTER_EXPORTS_STATE_URL=state_url)) as one:
        assert httpx.get(f"{one.rest}/v1/export/99999").status_code == 404  # the store exists, migrated
    host = limited.url.removeprefix("http://")
    with psycopg.connect(state_url, autocommit=True) as db:
        db.execute("insert into create_slots values (%s, extract(epoch from now()) - 1)", (host,))  # expired
    with running(SERVE, service_env(limited, tmp_path / "two", GOATCOUNTER_EXPORTS_STATE_URL=state_url)) as two:
        created = httpx.post(f"{two.rest}/v1/export", json={}, timeout=60)
    assert created.status_code == 202, created.text


def test_an_older_binary_refuses_a_newer_schema(cluster: Cluster, limited: LocalGoatCounter, tmp_path: Path) -> None:
    state_url = cluster.new_database()
    env = service_env(limited, tmp_path, GOATCOUNTER_EXPORTS_STATE_URL=state_url)
    assert run_cli(["doctor", "--rest-port", "0", "--mcp-port", "0"], env).returncode in (0, 1)  # migrates
    with psycopg.connect(state_url, autocommit=True) as db:
        assert db.execute("select version from schema_version").fetchone() == (3,)
        db.execute("update schema_version set version = 99")
    run = run_cli(["export", "-o", str(tmp_path / "x.csv")], env)
    assert run.returncode == 1
    assert "schema version 99, newer than this goatcounter-exports knows (3)" in run.stderr


def test_the_state_url_names_no_password_in_messages(
    cluster: Cluster, limited: LocalGoatCounter, tmp_path: Path
) -> None:
    url = cluster.url("nosuchdb").replace("@", ":hunter2-not-a-password@")
    run = subprocess.run(
        [*CLI, "export", "-o", str(tmp_path / "x.csv"), "--state", url],
        env=service_env(limited, tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert "state store" in run.stderr and "hunter2" not in run.stderr
