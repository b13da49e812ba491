"""Daily use, as a site owner and as an operator meet it: doctor, health and metrics, one configuration story,
clear start-up errors, quiet cron runs and honest output files. Against the real GoatCounter test bed."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from goatcounter_exports.testbed import LocalGoatCounter

from .conftest import service_env
from .support import SERVE, clean_env, free_port, goatcounter_binary, metric_samples, run_cli, running

DOCTOR = ["doctor", "--rest-port", "0", "--mcp-port", "0"]


def lines_of(output: str) -> dict[str, str]:
    """doctor's lines by check name: {"key accepted": "ok   key accepted: ..."}."""
    return {line[5:].split(":", 1)[0]: line for line in output.splitlines() if line[:5].strip()}


# -- doctor ---------------------------------------------------------------------------------------


def test_doctor_on_a_healthy_site_passes_every_check_and_spends_nothing(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    env = service_env(goatcounter, tmp_path, GOATCOUNTER_API_KEY=goatcounter.siteread_key)
    run = run_cli(DOCTOR, env)
    assert run.returncode == 0, run.stdout + run.stderr
    checks = lines_of(run.stdout)
    for name in ("configuration", "upstream reachable", "version", "key accepted", "key may export"):
        assert checks[name].startswith("ok"), checks
    assert checks["version"].endswith("makes CSV exports only")
    assert checks["individual pageviews"].startswith("ok") and "on:" in checks["individual pageviews"]
    assert checks["export budget"].startswith("?")  # not known before the first export: nothing was spent
    assert checks["REST port"].startswith("ok") and checks["MCP port"].startswith("ok")
    assert goatcounter.siteread_key not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("case", "failed", "words"),
    [
        ("stopped", "upstream reachable", "unreachable"),
        ("wrong key", "key accepted", "401"),
        ("no export permission", "key may export", "lacks the 'export' permission"),
        ("no scheme", "configuration", "must be an http(s) URL"),
        ("wrong path", "upstream reachable", "GET /status answered 404"),
    ],
)
def test_doctor_names_what_is_wrong_and_how_to_fix_it(
    goatcounter: LocalGoatCounter, tmp_path: Path, case: str, failed: str, words: str
) -> None:
    env = service_env(goatcounter, tmp_path)
    if case == "stopped":
        env["GOATCOUNTER_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "wrong key":
        env["GOATCOUNTER_API_KEY"] = "not-a-key-of-this-site"
    elif case == "no export permission":
        env["GOATCOUNTER_API_KEY"] = goatcounter.noexport_key
    elif case == "no scheme":
        env["GOATCOUNTER_URL"] = goatcounter.url.removeprefix("http://")
    else:
        env["GOATCOUNTER_URL"] = goatcounter.url + "/goatcounter"
    run = run_cli(DOCTOR, env)
    assert run.returncode == 1, run.stdout + run.stderr
    line = lines_of(run.stdout)[failed]
    assert line.startswith("FAIL") and words in line, run.stdout
    assert "->" in line or case == "no scheme"  # the fix, after the arrow
    assert env["GOATCOUNTER_API_KEY"] not in run.stdout


def test_doctor_says_which_port_is_busy(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        run = run_cli(["doctor", "--rest-port", str(port), "--mcp-port", "0"], service_env(goatcounter, tmp_path))
    assert run.returncode == 1
    line = lines_of(run.stdout)["REST port"]
    assert line.startswith("FAIL") and f"127.0.0.1:{port}" in line and "--rest-port" in line


# -- start-up: one line, exit 2 -------------------------------------------------------------------


@pytest.mark.parametrize("command", [SERVE, ["mcp"], ["export", "-o", "x.csv"], ["sync"]])
def test_a_url_without_a_scheme_is_one_line_and_exit_2_for_every_command(command: list[str], tmp_path: Path) -> None:
    env = clean_env(GOATCOUNTER_URL="mysite.goatcounter.com", GOATCOUNTER_API_KEY="k" * 20)
    run = run_cli(command, {**env, "GOATCOUNTER_EXPORTS_STATE_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "must be an http(s) URL" in run.stderr


def test_a_key_without_a_site_is_an_error_not_a_silent_goatcounter_com(tmp_path: Path) -> None:
    run = run_cli(["export", "-o", "x.csv"], clean_env(GOATCOUNTER_API_KEY="k" * 20, HOME=str(tmp_path)))
    assert run.returncode == 2
    assert "GOATCOUNTER_URL is not set" in run.stderr and run.stderr.count("\n") == 1


def test_busy_ports_are_all_named_at_once(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with socket.socket() as rest, socket.socket() as mcp:
        for sock in (rest, mcp):
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
        ports = [str(rest.getsockname()[1]), str(mcp.getsockname()[1])]
        run = run_cli(["serve", "--rest-port", ports[0], "--mcp-port", ports[1]], service_env(goatcounter, tmp_path))
        demo = run_cli(["demo", "--check-ports", "--rest-port", ports[0], "--mcp-port", ports[1]], clean_env())
    for done in (run, demo):
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert all(f"127.0.0.1:{p}" in done.stderr for p in ports) and "--rest-port and --mcp-port" in done.stderr


def test_serve_says_at_start_what_is_wrong_and_still_serves(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path, GOATCOUNTER_API_KEY="not-a-key-of-this-site")
    with running(SERVE, env) as service:
        health = httpx.get(f"{service.rest}/healthz")
        ready = httpx.get(f"{service.rest}/readyz")
        output = service.output()
    assert "warning: key accepted: GoatCounter answered 401" in output
    assert health.status_code == 200 and ready.status_code == 503 and "key" in ready.json()["reason"]


# -- health, readiness, metrics, request ids ------------------------------------------------------


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[LocalGoatCounter]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", port=free_port()) as instance:
        yield instance


def test_readyz_flips_when_goatcounter_stops_and_recovers_when_it_returns(
    restartable: LocalGoatCounter, tmp_path: Path
) -> None:
    def ready(base: str) -> int:
        deadline = time.monotonic() + 20
        status = httpx.get(f"{base}/readyz").status_code
        while time.monotonic() < deadline and status != wanted:
            time.sleep(0.5)
            status = httpx.get(f"{base}/readyz").status_code
        return status

    with running(SERVE, service_env(restartable, tmp_path / "state")) as service:
        wanted = 200
        assert ready(service.rest) == 200
        restartable.stop()
        wanted = 503
        assert ready(service.rest) == 503
        reason = httpx.get(f"{service.rest}/readyz").json()["reason"]
        restartable.start()
        wanted = 200
        assert ready(service.rest) == 200
        assert httpx.get(f"{service.rest}/healthz").json() == {"status": "ok"}
    assert "unreachable" in reason or "did not answer" in reason


def test_metrics_parse_and_count_the_requests_made(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with running(SERVE, service_env(goatcounter, tmp_path)) as service, httpx.Client() as client:
        for _ in range(3):
            assert client.get(f"{service.rest}/v1/export/99999").status_code == 404
        traced = client.get(f"{service.rest}/v1/export/99999", headers={"X-Request-Id": "trace-me-42"})
        fresh = client.get(f"{service.rest}/healthz")
        text = client.get(f"{service.rest}/metrics").text
    samples = metric_samples(text)
    key = (
        "goatcounter_exports_requests_total",
        (("adapter", "rest"), ("method", "GET"), ("route", "/v1/export/{id}"), ("status", "404")),
    )
    assert samples[key] == 4
    upstream = [v for (name, labels), v in samples.items() if name == "goatcounter_exports_upstream_seconds_count"]
    assert sum(upstream) >= 4
    assert traced.headers["x-request-id"] == "trace-me-42"
    assert len(fresh.headers["x-request-id"]) == 32


def test_json_logs_carry_the_request_id(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    args = [*SERVE, "--log-format", "json", "--log-level", "info"]
    with running(args, service_env(goatcounter, tmp_path)) as service:
        httpx.get(f"{service.rest}/v1/export/99999", headers={"X-Request-Id": "find-me-in-the-log"})
        time.sleep(0.3)
        output = service.output()
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (mine,) = [r for r in records if r.get("request_id") == "find-me-in-the-log"]
    assert mine["status"] == 404 and mine["route"] == "/v1/export/{id}" and mine["level"] == "info"
    assert goatcounter.export_key not in output


def test_the_rest_root_is_an_index_of_the_api(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with running(SERVE, service_env(goatcounter, tmp_path)) as service:
        index = httpx.get(f"{service.rest}/")
        docs = httpx.get(f"{service.rest}/docs")
    assert index.status_code == 200 and 'href="/openapi.json"' in index.text and 'href="/docs"' in index.text
    assert "/v1/export/{id}/download" in index.text
    assert docs.status_code == 200 and '"/openapi.json"' in docs.text


# -- configuration ------------------------------------------------------------------------------------


def test_config_shows_every_setting_its_source_and_never_the_key(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('rest_port = 8181\nlog_format = "json"\n')
    env = service_env(goatcounter, tmp_path, GOATCOUNTER_EXPORTS_MCP_PORT="9292")
    run = run_cli(["--config", str(config), "config"], env)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines()[1:]}
    assert rows["GOATCOUNTER_EXPORTS_REST_PORT"].endswith("8181  [config file]")
    assert rows["GOATCOUNTER_EXPORTS_MCP_PORT"].endswith("9292  [environment]")
    assert rows["GOATCOUNTER_URL"].endswith(f"{goatcounter.url}  [environment]")
    assert f"(set, {len(goatcounter.export_key)} characters)" in rows["GOATCOUNTER_API_KEY"]
    assert goatcounter.export_key not in run.stdout + run.stderr


# -- cron, and the files written ----------------------------------------------------------------------


def test_a_quiet_sync_prints_nothing_and_a_failed_first_sync_leaves_no_database(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    database = tmp_path / "views.sqlite3"
    env = service_env(goatcounter, tmp_path / "state", GOATCOUNTER_EXPORTS_DB=str(database))
    failed = run_cli(["sync"], {**env, "GOATCOUNTER_API_KEY": "not-a-key-of-this-site"})
    assert failed.returncode == 4 and not database.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("views", ".views"))] == []
    quiet = run_cli(["sync", "-q"], env)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert database.exists()


def test_an_export_of_nothing_new_is_a_csv_of_its_header_and_files_follow_the_umask(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    env = service_env(goatcounter, tmp_path / "state")
    out = tmp_path / "none.csv"
    run = run_cli(["export", "-o", str(out), "--since-hit-id", str(goatcounter.max_hit_id())], env)
    assert run.returncode == 0, run.stderr
    assert out.read_text().startswith("2Path,Title,Event,") and out.read_text().count("\n") == 1
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # what any new file of this user gets


def test_metrics_show_the_budget_learnt_and_the_pageviews_synced(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path)
    synced = run_cli(["sync"], env)
    assert synced.returncode == 0, synced.stderr
    with closing(sqlite3.connect(tmp_path / "state.sqlite3")) as state:
        budgets = state.execute("select host, remaining from budgets").fetchall()
    with closing(sqlite3.connect(tmp_path / "pageviews.sqlite3")) as copy:
        cursors = copy.execute("select site, rows from sync_state").fetchall()
    assert budgets, "the create's answer taught the export budget"
    with running(SERVE, env) as service:
        samples = metric_samples(httpx.get(f"{service.rest}/metrics").text)
    shown_rows = {
        dict(labels)["site"]: v for (name, labels), v in samples.items() if name == "goatcounter_exports_sync_rows"
    }
    assert shown_rows == {site: float(rows) for site, rows in cursors} and all(rows > 0 for _, rows in cursors)
    shown_budgets = {
        (dict(labels)["host"], dict(labels)["scope"]): v
        for (name, labels), v in samples.items()
        if name == "goatcounter_exports_budget_remaining"
    }
    learnt = {(key.partition(" ")[0], key.partition(" ")[2] or "export"): float(left) for key, left in budgets}
    assert shown_budgets == learnt
