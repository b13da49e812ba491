"""Real faults between the service and a real GoatCounter v2.7.0: latency, a stall, resets, a bandwidth limit,
a download cut short, and GoatCounter itself stopped and started again during a run.

The faults are made by tests/faultproxy.py, a TCP proxy on a real socket in front of GoatCounter; the service
runs as the real CLI in a subprocess (`serve`, `export`, `sync`) with GOATCOUNTER_URL pointed at the proxy.
"Converges" is checked against GoatCounter's own database: its `hits` in hit order against the synced copy.
docs/reliability.md has the results table.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from goatcounter_exports.testbed import LocalGoatCounter
from goatcounter_exports.upstream import RETRY_DEADLINE

from .conftest import service_env
from .faultproxy import EVERY, FaultProxy
from .support import CLI, ROOT, SERVE, Service, call_tool, free_port, goatcounter_binary, run_cli, running, wait_for

EXIT_UPSTREAM, EXIT_TIMEOUT = 4, 5
ROWS = 10_200  # three batches of GoatCounter's 5000: two pauses of 0.5 s while it writes the file
LATENCY = 0.3
BANDWIDTH = 200_000  # bytes per second


# -- GoatCounter's own numbers ----------------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


def random_paths(count: int, seed: int) -> list[str]:
    """Paths that compress poorly, so that an export file is a few hundred KB (and cut mid-body for sure)."""
    rng = random.Random(seed)  # noqa: S311 - test data, not a secret
    return [f"/r/{rng.randbytes(32).hex()}" for _ in range(count)]


def goatcounter_paths(instance: LocalGoatCounter) -> list[str]:
    """Every stored pageview's path, in hit order, from GoatCounter's database."""
    with sqlite3.connect(instance.db_path) as db:
        query = "select p.path from hits h join paths p using (path_id) where h.site_id = ? order by h.hit_id"
        return [row[0] for row in db.execute(query, (instance.site.site_id,))]


def synced_paths(database: Path) -> list[str]:
    if not database.exists():
        return []
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("select path from pageviews order by seq")]


def synced_cursor(database: Path) -> int | None:
    with sqlite3.connect(database) as db:
        row = db.execute("select last_hit_id from sync_state").fetchone()
    return None if row is None else int(row[0])


def export_rows(instance: LocalGoatCounter) -> int:
    """Exports GoatCounter made, from its database (what a create really cost)."""
    with sqlite3.connect(f"file:{instance.db_path}?mode=ro", uri=True) as db:
        return int(db.execute("select count(*) from exports").fetchone()[0])


def finished_export(instance: LocalGoatCounter, start_from_hit_id: int = 0) -> dict[str, Any]:
    """An export made directly in GoatCounter (no proxy, no service), once it is finished."""
    created = instance.request(
        "POST", "/api/v0/export", key=instance.export_key, body={"start_from_hit_id": start_from_hit_id}
    )
    assert created.status == 202, created.body
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        export: dict[str, Any] = instance.request(
            "GET", f"/api/v0/export/{created.json()['id']}", key=instance.export_key
        ).json()
        if export.get("finished_at"):
            return export
        time.sleep(0.1)
    raise AssertionError("GoatCounter's export did not finish in 60 s")


def one_error_line(stderr: str) -> str:
    """The last line of a failed command: it must be its one `error:` line, without a traceback."""
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr
    return last


# -- fixtures ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A GoatCounter with ROWS pageviews and one finished export of them all."""

    goatcounter: LocalGoatCounter
    export_id: int
    file: bytes  # the export's file, as GoatCounter wrote it
    hash: str
    last_hit_id: int


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path_factory.mktemp("faults") / "gc") as instance:
        instance.seed(random_paths(ROWS, seed=1))
        export = finished_export(instance)
        file = Path(export["path"]).read_bytes()
        assert sha(file) == export["hash"] and len(file) > 200_000
        yield Site(instance, int(export["id"]), file, str(export["hash"]), int(export["last_hit_id"]))


@pytest.fixture
def proxy(site: Site) -> Iterator[FaultProxy]:
    with FaultProxy(site.goatcounter.base) as instance:
        yield instance


def env_for(site: Site, proxy: FaultProxy, tmp_path: Path, **extra: str) -> dict[str, str]:
    return service_env(site.goatcounter, tmp_path / "state", GOATCOUNTER_URL=proxy.url, **extra)


@contextmanager
def serving(site: Site, proxy: FaultProxy, tmp_path: Path, **extra: str) -> Iterator[Service]:
    """`serve` behind the proxy, started before any toxic (its start-up checks ask GoatCounter), with the
    proxy's record of requests cleared once it listens."""
    with running(SERVE, env_for(site, proxy, tmp_path, **extra)) as service:
        proxy.requests.clear()
        yield service


# -- latency ----------------------------------------------------------------------------------------


def test_latency_each_way_still_serves_the_export_and_its_verified_file(
    site: Site, proxy: FaultProxy, tmp_path: Path
) -> None:
    with serving(site, proxy, tmp_path) as service, httpx.Client(timeout=30) as client:
        proxy.set(latency_up=LATENCY, latency_down=LATENCY)
        started = time.monotonic()
        info = client.get(f"{service.rest}/v1/export/{site.export_id}")
        info_took = time.monotonic() - started
        started = time.monotonic()
        download = client.get(f"{service.rest}/v1/export/{site.export_id}/download")
        download_took = time.monotonic() - started
    assert info.status_code == 200 and info.json()["hash"] == site.hash
    assert download.status_code == 200
    assert sha(download.content) == site.hash and download.content == site.file
    assert info_took >= 2 * LATENCY  # one round trip through the slow link
    assert "x-cache" not in info.headers
    # The finished export's object was cached by the GET: only its file crosses the slow link.
    assert download_took >= 2 * LATENCY


# -- a stall ----------------------------------------------------------------------------------------


def test_a_stalled_upstream_is_a_timeout_naming_the_host_never_the_key(
    site: Site, proxy: FaultProxy, tmp_path: Path
) -> None:
    env = env_for(site, proxy, tmp_path, GOATCOUNTER_EXPORTS_READ_TIMEOUT="1")
    host = f"127.0.0.1:{proxy.port}"
    out = tmp_path / "out"
    out.mkdir()
    with serving(site, proxy, tmp_path, GOATCOUNTER_EXPORTS_READ_TIMEOUT="1") as service:
        proxy.set(stall=True)
        started = time.monotonic()
        rest = httpx.get(f"{service.rest}/v1/export/{site.export_id}", timeout=30)
        rest_took = time.monotonic() - started
        mcp = call_tool(service.mcp, "get-export-info", {"id": site.export_id})
    started = time.monotonic()
    cli = run_cli(["export", "-o", str(out / "views.csv")], env, timeout=60)
    cli_took = time.monotonic() - started
    print(f"stalled: REST {rest.status_code} in {rest_took:.1f} s; export exit {cli.returncode} in {cli_took:.1f} s")
    key = site.goatcounter.export_key
    assert rest.status_code == 504, rest.text
    assert host in rest.json()["error"] and "did not answer in time" in rest.json()["error"]
    assert 0.9 <= rest_took < 5  # the read timeout, not retried: a timeout is no connection failure
    assert mcp.is_error and host in mcp.content[0].text
    assert cli.returncode == EXIT_UPSTREAM, cli.stderr
    assert host in one_error_line(cli.stderr) and cli_took < 30
    assert list(out.iterdir()) == []
    assert key not in rest.text + mcp.content[0].text + cli.stderr + service.output()
    assert proxy.forwarded() == [] and proxy.requests  # everything asked, nothing reached GoatCounter


# -- resets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("toxic", ["reset_connections", "reset_requests", "reset_responses"])
def test_one_reset_of_a_read_is_invisible(site: Site, proxy: FaultProxy, tmp_path: Path, toxic: str) -> None:
    with serving(site, proxy, tmp_path) as service, httpx.Client(timeout=30) as client:
        proxy.reset_open()  # the connections the service keeps (it asked /status at start): a new one is needed
        time.sleep(0.2)  # for the service to see them go
        proxy.set(**{toxic: 1})
        info = client.get(f"{service.rest}/v1/export/{site.export_id}")
        proxy.clear()
        proxy.reset_open()  # existing, idle connections reset
        time.sleep(0.2)
        again = client.get(f"{service.rest}/v1/export/{site.export_id}")
        proxy.set(reset_responses=1, match="/download$")
        download = client.get(f"{service.rest}/v1/export/{site.export_id}/download")
    assert info.status_code == again.status_code == 200, info.text + again.text
    assert info.json()["hash"] == again.json()["hash"] == site.hash
    assert download.status_code == 200 and download.content == site.file
    assert proxy.resets == 2, proxy.requests  # the first read's, the download's (reset_open counts none)
    assert len(proxy.forwarded("GET", "/download")) == 2  # the reset one, and the one asked again


def test_resets_that_persist_are_a_502_naming_the_host(site: Site, proxy: FaultProxy, tmp_path: Path) -> None:
    with serving(site, proxy, tmp_path) as service:
        proxy.set(reset_requests=EVERY)
        started = time.monotonic()
        answer = httpx.get(f"{service.rest}/v1/export/{site.export_id}", timeout=30)
        took = time.monotonic() - started
    assert answer.status_code == 502, answer.text
    assert f"127.0.0.1:{proxy.port}" in answer.json()["error"]
    assert site.goatcounter.export_key not in answer.text
    assert took < RETRY_DEADLINE + 2
    assert proxy.forwarded() == []


@pytest.mark.parametrize(
    "toxic",
    [
        "close_responses",
        "reset_responses",
    ],
)
def test_a_read_whose_answer_is_lost_twice_is_asked_again(
    site: Site, proxy: FaultProxy, tmp_path: Path, toxic: str
) -> None:
    """aiohttp asks once more by itself; the second loss must be carried by the service's own retries."""
    with serving(site, proxy, tmp_path) as service:
        proxy.set(**{toxic: 2}, match="^GET ")
        answer = httpx.get(f"{service.rest}/v1/export/{site.export_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    assert len(proxy.forwarded("GET")) == 3


@pytest.mark.parametrize("toxic", ["reset_requests", "reset_responses", "close_responses"])
def test_a_create_whose_answer_is_lost_is_never_sent_again(
    site: Site, proxy: FaultProxy, tmp_path: Path, toxic: str
) -> None:
    """A POST is not retried, by aiohttp or by the service: only its caller can know whether that is safe."""
    before = export_rows(site.goatcounter)
    with serving(site, proxy, tmp_path) as service:
        proxy.set(**{toxic: EVERY}, match="^POST ")
        answer = httpx.post(f"{service.rest}/v1/export", json={"start_from_hit_id": site.last_hit_id}, timeout=30)
    posts = [r for r in proxy.requests if r.method == "POST"]
    reached = 0 if toxic == "reset_requests" else 1  # reset before, or after GoatCounter had it
    assert answer.status_code in (502, 504), answer.text
    assert len(posts) == 1 and len(proxy.forwarded("POST")) == reached
    assert export_rows(site.goatcounter) == before + reached


def test_the_export_command_never_sends_a_create_twice(site: Site, proxy: FaultProxy, tmp_path: Path) -> None:
    before = export_rows(site.goatcounter)
    proxy.set(reset_responses=EVERY, match="^POST ")
    out = tmp_path / "out"
    out.mkdir()
    run = run_cli(["export", "-o", str(out / "views.csv")], env_for(site, proxy, tmp_path), timeout=60)
    assert run.returncode == EXIT_UPSTREAM, run.stderr
    one_error_line(run.stderr)
    assert len(proxy.forwarded("POST")) == 1 and export_rows(site.goatcounter) == before + 1
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "toxic",
    [
        "reset_responses",
        "close_responses",
    ],
)
def test_a_retry_with_the_same_idempotency_key_finds_the_export_a_lost_answer_made(
    site: Site, proxy: FaultProxy, tmp_path: Path, toxic: str
) -> None:
    before = export_rows(site.goatcounter)
    body = {"start_from_hit_id": site.last_hit_id}
    key = {"Idempotency-Key": f"lost-answer-{toxic}"}
    with serving(site, proxy, tmp_path) as service, httpx.Client(timeout=30) as client:
        proxy.set(**{toxic: 1}, match="^POST ")
        first = client.post(f"{service.rest}/v1/export", json=body, headers=key)
        retry = client.post(f"{service.rest}/v1/export", json=body, headers=key)
    assert first.status_code == 502, first.text
    assert len(proxy.forwarded("POST")) == 1, "the retry created another export"
    assert export_rows(site.goatcounter) == before + 1
    assert retry.status_code == 202 and retry.headers.get("idempotent-replayed") == "true", retry.text


# -- a slow link ------------------------------------------------------------------------------------


def test_a_bandwidth_limit_slows_a_download_that_still_arrives_whole(
    site: Site, proxy: FaultProxy, tmp_path: Path
) -> None:
    with serving(site, proxy, tmp_path) as service:
        proxy.set(bandwidth=BANDWIDTH)
        started = time.monotonic()
        download = httpx.get(f"{service.rest}/v1/export/{site.export_id}/download", timeout=60)
        took = time.monotonic() - started
    assert download.status_code == 200 and download.content == site.file
    assert sha(download.content) == site.hash
    assert took >= 0.8 * len(site.file) / BANDWIDTH


# -- a download cut short ---------------------------------------------------------------------------


def test_a_download_cut_mid_body_never_arrives_whole(site: Site, proxy: FaultProxy, tmp_path: Path) -> None:
    cut = len(site.file) // 3
    env = env_for(site, proxy, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    received = bytearray()
    broken: Exception | None = None
    with serving(site, proxy, tmp_path) as service:
        proxy.set(cut_after=cut, match="/download$")
        try:
            with httpx.stream("GET", f"{service.rest}/v1/export/{site.export_id}/download", timeout=30) as answer:
                status = answer.status_code
                for chunk in answer.iter_raw():
                    received += chunk
        except httpx.RemoteProtocolError as exc:  # the body ended before its Content-Length
            broken = exc
        mcp = call_tool(service.mcp, "download-export", {"id": site.export_id})
    cli = run_cli(["export", "-o", str(out / "views.csv")], env, timeout=90)
    how = type(broken).__name__ if broken else "a short body"
    print(f"cut at {cut} of {len(site.file)} bytes: REST client got {len(received)} bytes and {how}; ", end="")
    print(f"MCP: {mcp.content[0].text[:120]!r}; export exit {cli.returncode}: {cli.stderr.strip()[-160:]!r}")
    assert status == 200  # the head went out before the cut
    assert broken is not None or len(received) < len(site.file)
    assert len(received) <= cut < len(site.file)  # never whole: the last piece waits for the hash
    assert mcp.is_error, mcp.content
    assert cli.returncode == EXIT_UPSTREAM, cli.stderr
    one_error_line(cli.stderr)
    assert list(out.iterdir()) == []  # not even a temporary file
    assert proxy.cuts >= 3


def test_a_sync_cut_mid_download_adds_nothing_and_the_next_run_converges(tmp_path: Path) -> None:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc") as instance, FaultProxy(instance.base) as proxy:
        database = tmp_path / "views.sqlite3"
        env = service_env(instance, tmp_path / "state", GOATCOUNTER_URL=proxy.url)
        sync = ["sync", "--db", str(database), "--timeout", "60"]
        instance.seed(random_paths(2000, seed=2))
        first = run_cli(sync, env, timeout=90)
        assert first.returncode == 0, first.stderr
        cursor, rows = synced_cursor(database), synced_paths(database)
        assert cursor == instance.max_hit_id() and rows == goatcounter_paths(instance)
        instance.seed(random_paths(6000, seed=3))
        proxy.set(cut_after=30_000, match="/download$")
        cut = run_cli(sync, env, timeout=90)
        assert cut.returncode == EXIT_UPSTREAM, cut.stderr
        one_error_line(cut.stderr)
        assert synced_cursor(database) == cursor and synced_paths(database) == rows  # nothing added
        proxy.clear()
        resumed = run_cli(sync, env, timeout=90)
        assert resumed.returncode == 0, resumed.stderr
        assert "Synced 6000 pageviews" in resumed.stderr
        assert synced_paths(database) == goatcounter_paths(instance)
        assert synced_cursor(database) == instance.max_hit_id() and len(synced_paths(database)) == 8000
        assert proxy.cuts == 1


# -- GoatCounter stopped and started again ----------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "outage", "expected"),
    [
        ("stop", 0.5, 0),  # back within the retry deadline: the reads carry on
        ("stop", 12.0, EXIT_UPSTREAM),  # down longer than a poll's pause and the retry deadline together
        ("kill", 0.5, EXIT_TIMEOUT),  # SIGKILL while writing the export: it never finishes
    ],
    ids=["stopped-briefly", "stopped-long", "killed-mid-export"],
)
def test_goatcounter_stopped_during_a_sync_then_the_next_run_converges(
    tmp_path: Path, how: str, outage: float, expected: int
) -> None:
    """SIGTERM: GoatCounter finishes the export it is writing, then exits. SIGKILL: the export is left
    unfinished forever (no finished_at, no error), so the run waits until its --timeout."""
    instance = LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", port=free_port())
    instance.start()
    try:
        instance.seed([f"/k-{i % 40}" for i in range(ROWS)])
        database = tmp_path / "views.sqlite3"
        env = service_env(instance, tmp_path / "state")
        sync = ["sync", "--db", str(database), "--timeout", "8"]
        run = subprocess.Popen(
            [*CLI, *sync], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for(lambda: export_rows(instance) > 0, timeout=30, interval=0.02, what="the sync's create")
            if how == "kill":
                process = instance._process  # the test bed stops politely; this is the crash
                assert process is not None
                os.kill(process.pid, signal.SIGKILL)
            instance.stop()
            time.sleep(outage)
            instance.start()  # the same port and database
            _, stderr = run.communicate(timeout=90)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
        print(f"{how} + {outage} s: sync exit {run.returncode}: {stderr.strip().splitlines()[-1]!r}")
        assert run.returncode == expected, stderr
        if expected == 0:
            assert synced_paths(database) == goatcounter_paths(instance)
        else:
            error = one_error_line(stderr)
            assert ("unreachable" if expected == EXIT_UPSTREAM else "did not finish within") in error
            assert instance.export_key not in stderr
            assert synced_paths(database) == []  # nothing half-written
        again = run_cli([*sync[:-1], "30"], env, timeout=90)
        assert again.returncode == 0, again.stderr
        assert synced_paths(database) == goatcounter_paths(instance) and len(synced_paths(database)) == ROWS
        assert synced_cursor(database) == instance.max_hit_id()
    finally:
        instance.stop()


def test_rest_is_a_502_while_goatcounter_is_down_and_200_once_it_is_back(tmp_path: Path) -> None:
    instance = LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", port=free_port())
    instance.start()
    try:
        instance.seed(["/up", "/down", "/up"])
        export = finished_export(instance)
        with running(SERVE, service_env(instance, tmp_path / "state")) as service, httpx.Client(timeout=30) as client:
            url = f"{service.rest}/v1/export/{export['id']}"
            instance.stop()  # before the export was ever asked for: nothing of it is cached
            started = time.monotonic()
            down = client.get(url)
            down_took = time.monotonic() - started
            with ThreadPoolExecutor(1) as pool:  # a read that begins while it is down and ends once it is back
                bridged = pool.submit(httpx.get, url, timeout=30)
                time.sleep(1)
                instance.start()
                carried = bridged.result(timeout=30)
            after = client.get(url)
            instance.stop()  # a finished export is immutable: once read, it is answered without GoatCounter
            cached = client.get(url)
            still_running = service.process.poll() is None
    finally:
        instance.stop()
    print(f"down: {down.status_code} in {down_took:.1f} s {down.text!r}; begun down, back later: {carried.status_code}")
    assert down.status_code == 502 and "unreachable" in down.json()["error"], down.text
    assert 3 < down_took < RETRY_DEADLINE + 3  # asked again with backoff, then given up
    assert carried.status_code == 200 and carried.json()["id"] == export["id"], carried.text
    assert "x-cache" not in carried.headers  # GoatCounter's own answer, passed through
    assert after.status_code == 200 and after.json() == carried.json()
    assert cached.status_code == 200 and cached.headers["x-cache"] == "hit" and cached.json() == carried.json()
    assert still_running
