"""The defects a hostile review found, each reproduced against the real GoatCounter and the real service:
doubled data, budget burnt by bad input, cross-site and unauthenticated access, a locked or read-only state
store, Idempotency-Key races, and the smaller ones."""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.streamable_http import streamable_http_client

from goatcounter_exports.testbed import LocalGoatCounter
from mcp import Client

from .conftest import service_env
from .support import (
    CLI,
    ROOT,
    SERVE,
    RecordingProxy,
    Service,
    clean_env,
    goatcounter_binary,
    poll_export,
    run_cli,
    running,
)

TOKEN = "inbound-token-0123456789abcdef"


# -- 1. concurrent syncs ------------------------------------------------------------------------


def test_two_concurrent_syncs_store_every_pageview_once(tmp_path: Path) -> None:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc") as gc:
        gc.seed([f"/c-{i % 50}" for i in range(5000)])
        database = tmp_path / "same.sqlite3"
        env = service_env(gc, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=str(database))
        runs = [
            subprocess.Popen(
                [*CLI, "sync"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        outputs = [run.communicate(timeout=120) for run in runs]
        hits = gc.hit_count()
    assert [run.returncode for run in runs] == [0, 0], outputs
    with sqlite3.connect(database) as db:
        rows = db.execute("select count(*), count(distinct seq) from pageviews").fetchone()
    assert rows == (hits, hits) == (5000, 5000)
    added = sorted(int(err.split("Synced ")[1].split()[0]) for _, err in outputs)
    assert added == [0, 5000]  # the second waited for the first, then found nothing new


# -- 2. bad numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"start_from_hit_id": 1.0}',
        b'{"start_from_hit_id": 9223372036854775808}',
        b'{"start_from_hit_id": true}',
        b'{"start_from_hit_id": 1e3}',
        b'{"deep": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_numbers_goatcounter_would_refuse_never_spend_the_budget(
    proxied: tuple[Service, RecordingProxy], body: bytes
) -> None:
    service, proxy = proxied
    answer = httpx.post(f"{service.rest}/v1/export", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "error" in answer.json()
    assert proxy.paths("POST") == []


def test_mcp_create_refuses_the_same_numbers(proxied: tuple[Service, RecordingProxy]) -> None:
    service, proxy = proxied

    async def scenario() -> list[Any]:
        async with Client(service.mcp) as client:
            return [
                await client.call_tool("create-csv-export", {"start_from_hit_id": 1.0}),
                await client.call_tool("create-csv-export", {"start_from_hit_id": 2**63}),
                await client.call_tool("export-pageviews", {"start_from_hit_id": 1.5}),
            ]

    results = asyncio.run(scenario())
    assert all(r.is_error and "Invalid arguments" in r.content[0].text for r in results)
    assert proxy.paths("POST") == []


# -- 3. cross-site pages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "content", "status"),
    [
        ({"Content-Type": "text/plain"}, b"{}", 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"a=1", 415),
        ({}, b"", 415),
        ({"Content-Type": "application/json", "Origin": "https://evil.example"}, b"{}", 403),
        ({"Content-Type": "application/json", "Host": "attacker.example"}, b"{}", 421),
    ],
)
def test_rest_cannot_be_driven_from_another_sites_page(
    proxied: tuple[Service, RecordingProxy], headers: dict[str, str], content: bytes, status: int
) -> None:
    service, proxy = proxied
    answer = httpx.post(f"{service.rest}/v1/export", content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert "access-control-allow-origin" not in answer.headers
    assert proxy.paths("POST") == []


def test_a_rebinding_page_cannot_read_an_export(proxied: tuple[Service, RecordingProxy]) -> None:
    service, proxy = proxied
    answer = httpx.get(f"{service.rest}/v1/export/1/download", headers={"Host": "attacker.example"})
    assert answer.status_code == 421
    preflight = httpx.request("OPTIONS", f"{service.rest}/v1/export", headers={"Origin": "http://127.0.0.1:1"})
    assert "access-control-allow-origin" not in preflight.headers
    assert proxy.requests == []


# -- 4. inbound authentication -------------------------------------------------------------------


def test_a_network_bind_without_authentication_refuses_to_start(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    run = run_cli(
        ["serve", "--host", "0.0.0.0", "--rest-port", "0", "--mcp-port", "0"], service_env(goatcounter, tmp_path)
    )
    assert run.returncode == 2
    assert "without authentication" in run.stderr and "--auth-token" in run.stderr
    assert run.stderr.count("\n") == 1


def test_rest_and_mcp_require_the_token_and_tell_clients_how(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path, GOATCOUNTER_EXPORTS_AUTH_TOKEN=TOKEN)
    args = ["serve", "--host", "0.0.0.0", "--rest-port", "0", "--mcp-port", "0"]
    with running(args, env) as service:
        rest = service.rest.replace("0.0.0.0", "127.0.0.1")
        mcp = service.mcp.replace("0.0.0.0", "127.0.0.1")
        anonymous = httpx.get(f"{rest}/v1/export/1")
        wrong = httpx.get(f"{rest}/v1/export/1", headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
        allowed = httpx.get(f"{rest}/v1/export/99999", headers={"Authorization": f"Bearer {TOKEN}"})
        mcp_anonymous = httpx.post(mcp, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        metadata = httpx.get(f"{mcp.rsplit('/mcp', 1)[0]}/.well-known/oauth-protected-resource/mcp")

        async def tools() -> set[str]:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with (
                httpx2.AsyncClient(headers=headers) as http,
                Client(streamable_http_client(mcp, http_client=http)) as client,
            ):
                return {t.name for t in (await client.list_tools()).tools}

        names = asyncio.run(tools())
        output = service.output()
    assert anonymous.status_code == wrong.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer ")
    assert allowed.status_code == 404  # through to GoatCounter
    assert mcp_anonymous.status_code == 401
    challenge = mcp_anonymous.headers["www-authenticate"]
    assert (
        'resource_metadata="http://127.0.0.1:' in challenge and "/.well-known/oauth-protected-resource/mcp" in challenge
    )
    assert metadata.status_code == 200 and metadata.json()["resource"].endswith("/mcp")
    assert "download-export" in names
    assert TOKEN not in output and TOKEN not in anonymous.text + mcp_anonymous.text + metadata.text


def test_a_spec_declaring_authentication_on_its_adapters_is_honoured(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    seed = (ROOT / "src/goatcounter_exports/capabilities/goatcounter-exports.yaml").read_text()
    spec = tmp_path / "guarded.yaml"
    spec.write_text(
        seed.replace(
            "    GOATCOUNTER_API_KEY: GOATCOUNTER_API_KEY\n",
            "    GOATCOUNTER_API_KEY: GOATCOUNTER_API_KEY\n    INBOUND_KEY: INBOUND_KEY\n",
        ).replace(
            "    port: 8080\n",
            "    port: 8080\n    authentication: {type: apikey, key: X-Api-Key, value: '{{env.INBOUND_KEY}}'}\n",
        )
    )
    env = service_env(goatcounter, tmp_path, INBOUND_KEY="spec-declared-key-0123")
    with running(["serve", "--spec", str(spec), "--rest-port", "0", "--mcp-port", "0"], env) as service:
        refused = httpx.get(f"{service.rest}/v1/export/99999")
        allowed = httpx.get(f"{service.rest}/v1/export/99999", headers={"X-Api-Key": "spec-declared-key-0123"})
        mcp_open = httpx.post(service.mcp, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert refused.status_code == 401 and allowed.status_code == 404
    assert mcp_open.status_code != 401  # the MCP adapter declared none, and loopback needs none


# -- 5. a locked or read-only state store ---------------------------------------------------------


def test_a_locked_state_store_neither_freezes_the_server_nor_loses_an_export(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    with RecordingProxy(goatcounter.url) as proxy:
        env = service_env(goatcounter, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env) as service:
            assert httpx.get(f"{service.rest}/v1/export/99999").status_code == 404  # opens the state store
            holder = sqlite3.connect(tmp_path / "state.sqlite3", timeout=1, isolation_level=None)
            holder.execute("begin exclusive")
            try:
                started = time.monotonic()
                create = httpx.post(f"{service.rest}/v1/export", json={}, timeout=30)
                took = time.monotonic() - started
                openapi = httpx.get(f"{service.rest}/openapi.json", timeout=5)
            finally:
                holder.execute("rollback")
                holder.close()
    assert create.status_code == 503 and "state store" in create.json()["error"], create.text
    assert took < 10
    assert openapi.status_code == 200
    assert proxy.paths("POST") == []  # refused before anything was spent


def test_a_state_store_that_cannot_be_opened_is_a_clear_error_everywhere(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    (state / "state.sqlite3").mkdir(parents=True)  # unopenable, for root too (a read-only file is not)
    env = service_env(goatcounter, state)
    with running(SERVE, env) as service:
        rest = httpx.post(f"{service.rest}/v1/export", json={})

        async def tool() -> Any:
            async with Client(service.mcp) as client:
                return await client.call_tool("create-csv-export", {})

        mcp = asyncio.run(tool())
    cli = run_cli(["export", "-o", str(tmp_path / "x.csv")], env)
    assert rest.status_code == 503 and "state store" in rest.json()["error"]
    assert mcp.is_error and "state store" in mcp.content[0].text
    assert cli.returncode == 1 and cli.stderr.startswith("error: ") and cli.stderr.count("\n") == 1, cli.stderr
    assert "Traceback" not in cli.stderr


# -- 6. Idempotency-Key --------------------------------------------------------------------------


def test_an_idempotency_key_is_bound_to_its_request(proxied: tuple[Service, RecordingProxy]) -> None:
    service, proxy = proxied
    key = {"Idempotency-Key": "bound-to-a-body"}
    first = httpx.post(f"{service.rest}/v1/export", json={"start_from_hit_id": 1}, headers=key)
    other = httpx.post(f"{service.rest}/v1/export", json={"start_from_hit_id": 2}, headers=key)
    again = httpx.post(f"{service.rest}/v1/export", json={"start_from_hit_id": 1}, headers=key)
    assert first.status_code == 202 and other.status_code == 422 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert len(proxy.paths("POST")) == 1


def test_concurrent_requests_with_one_key_make_one_export(proxied: tuple[Service, RecordingProxy]) -> None:
    service, proxy = proxied

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            headers = {"Idempotency-Key": "ten-at-once"}
            calls = [client.post(f"{service.rest}/v1/export", json={}, headers=headers) for _ in range(10)]
            return list(await asyncio.gather(*calls))

    answers = asyncio.run(burst())
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(202) >= 1 and set(statuses) <= {202, 409}
    assert len({a.json()["id"] for a in answers if a.status_code == 202}) == 1
    assert len(proxy.paths("POST")) == 1


class SlowAnswers:
    """A TCP proxy that passes requests to GoatCounter at once but holds its answers to POSTs back for `delay`
    seconds: the create happens upstream while the gateway times out (GoatCounter cannot be made slow)."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> SlowAnswers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        posting = threading.Event()  # the last request on this connection was a POST

        def forward_requests() -> None:
            try:
                while data := client.recv(65536):
                    if data[:4] in (b"POST", b"GET ", b"HEAD"):
                        posting.set() if data.startswith(b"POST") else posting.clear()
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward_requests, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if posting.is_set():
                    time.sleep(self.delay)
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()


def test_a_retry_after_a_timed_out_create_finds_the_export_instead_of_making_another(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    port = int(goatcounter.url.rsplit(":", 1)[1])
    with SlowAnswers(port, delay=2.5) as slow, RecordingProxy(slow.url) as proxy:
        env = service_env(goatcounter, tmp_path, GOATCOUNTER_URL=proxy.url, GOATCOUNTER_EXPORTS_READ_TIMEOUT="1")
        with running(SERVE, env) as service:
            key = {"Idempotency-Key": "timed-out-once"}
            first = httpx.post(f"{service.rest}/v1/export", json={"start_from_hit_id": 3}, headers=key, timeout=30)
            time.sleep(3)  # the key's try is over: its outcome is unknown, not in flight
            retry = httpx.post(f"{service.rest}/v1/export", json={"start_from_hit_id": 3}, headers=key, timeout=60)
    assert first.status_code == 504
    assert retry.status_code == 202, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert proxy.paths("POST") == ["/api/v0/export"]  # one create, ever


# -- 7. the smaller ones -------------------------------------------------------------------------


def test_405_says_what_is_allowed(proxied: tuple[Service, RecordingProxy]) -> None:
    service, _ = proxied
    answer = httpx.delete(f"{service.rest}/v1/export/1")
    assert answer.status_code == 405
    assert sorted(answer.headers["allow"].split(", ")) == ["GET", "HEAD"]  # Starlette's order is a set's


def test_head_of_a_download_downloads_nothing(proxied: tuple[Service, RecordingProxy]) -> None:
    service, proxy = proxied
    with httpx.Client(timeout=30) as client:
        export = client.post(f"{service.rest}/v1/export", json={}).json()
        poll_export(client, service.rest, int(export["id"]))
        proxy.requests.clear()
        head = client.head(f"{service.rest}/v1/export/{export['id']}/download")
    assert head.status_code == 200 and head.headers["content-type"] == "application/gzip"
    assert [p for p in proxy.paths() if p.endswith("/download")] == []


def test_export_objects_do_not_show_goatcounters_file_path(proxied: tuple[Service, RecordingProxy]) -> None:
    service, _ = proxied
    created = httpx.post(f"{service.rest}/v1/export", json={})
    info = httpx.get(f"{service.rest}/v1/export/{created.json()['id']}")
    assert "path" not in created.json() and "path" not in info.json()


def test_identical_concurrent_reads_share_one_upstream_request(proxied: tuple[Service, RecordingProxy]) -> None:
    service, proxy = proxied
    created = httpx.post(f"{service.rest}/v1/export", json={}).json()
    proxy.requests.clear()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{service.rest}/v1/export/{created['id']}"
            return list(await asyncio.gather(*(client.get(url) for _ in range(20))))

    answers = asyncio.run(burst())
    assert {a.status_code for a in answers} == {200}
    assert len(proxy.paths("GET")) < 20


def test_sigterm_stops_serve_even_while_a_download_is_stalled(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with running(SERVE, service_env(goatcounter, tmp_path)) as service, httpx.Client(timeout=30) as client:
        export = client.post(f"{service.rest}/v1/export", json={}).json()
        poll_export(client, service.rest, int(export["id"]))
        host, port = service.rest.removeprefix("http://").split(":")
        stalled = socket.create_connection((host, int(port)))
        stalled.sendall(f"GET /v1/export/{export['id']}/download HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # and never read
        time.sleep(0.5)
        service.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = service.process.wait(timeout=30)
        stalled.close()
    assert time.monotonic() - started < 15
    assert code == 0


def test_a_file_that_cannot_be_written_is_one_error_line_and_nothing_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def small_files() -> None:  # a full disk for the export (about 400 KB), not for the small state file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc") as gc:
        gc.seed([f"/a-rather-long-path/number-{i}" for i in range(5000)])
        run = subprocess.run(
            [*CLI, "export", "-o", str(out / "big.csv")],
            env=service_env(gc, tmp_path / "state"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            preexec_fn=small_files,
            timeout=120,
        )
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: cannot write"), run.stderr
    assert "Traceback" not in run.stderr
    assert list(out.iterdir()) == []


def test_stats_errors_do_not_reveal_where_the_database_is(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    secret_place = tmp_path / "hidden-place-x"
    env = service_env(goatcounter, tmp_path, GOATCOUNTER_EXPORTS_DB=str(secret_place / "copy.sqlite3"))
    with running(SERVE, env) as service:

        async def ask() -> Any:
            async with Client(service.mcp) as client:
                return await client.call_tool("pageview-stats", {"question": "total"})

        answer = asyncio.run(ask())
    assert answer.is_error and "hidden-place-x" not in answer.content[0].text


def test_a_key_with_a_control_character_is_refused_at_start(tmp_path: Path) -> None:
    run = run_cli(SERVE, clean_env(GOATCOUNTER_URL="http://127.0.0.1:1", GOATCOUNTER_API_KEY="abc\tdef"))
    assert run.returncode == 2 and "control character" in run.stderr and "abc" not in run.stderr
