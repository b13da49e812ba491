"""The command line as a user meets it: start-up errors, lint, and the README's own commands."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from goatcounter_exports.testbed import LocalGoatCounter

from .conftest import service_env
from .support import ROOT, SCHEMA, SEED, SERVE, Service, clean_env, goatcounter_binary, run_cli, running

README = (ROOT / "README.md").read_text("utf-8")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_serve_without_the_key_says_which_variable_in_one_line(tmp_path: Path) -> None:
    run = run_cli(SERVE, clean_env(GOATCOUNTER_URL="http://127.0.0.1:1"))
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert "GOATCOUNTER_API_KEY is not set" in run.stderr and "export GOATCOUNTER_API_KEY=" in run.stderr


def test_serve_on_a_busy_port_says_so(goatcounter: LocalGoatCounter, tmp_path: Path, service: Service) -> None:
    busy = service.rest.rsplit(":", 1)[1]
    run = run_cli(["serve", "--rest-port", busy, "--mcp-port", "0"], service_env(goatcounter, tmp_path))
    assert run.returncode == 2
    assert f"127.0.0.1:{busy}" in run.stderr and "--rest-port" in run.stderr


def test_lint_reports_the_seeds_schema_deviations_as_warnings_and_exits_0() -> None:
    run = run_cli(["lint", str(SEED), "--schema", str(SCHEMA)])
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    warnings = [line for line in lines if ": warning: " in line]
    # The three kinds of deviation: typed consumed inputs, a REST description, outputs without properties.
    assert any("consumes[0].resources[0].operations[0].inputParameters[0]" in w and "'type'" in w for w in warnings)
    assert any(
        w.endswith("capability.exposes[0]: schema: not allowed by the schema: 'description' was unexpected")
        for w in warnings
    )
    assert any("tools[2].outputParameters[0]" in w and "'properties' is a required property" in w for w in warnings)
    assert all(re.search(r": line \d+, capability\.", w) for w in warnings)
    assert lines[-1].endswith("0 error(s), 10 warning(s)")


def test_lint_fails_a_broken_spec_with_every_error_and_its_path(tmp_path: Path) -> None:
    broken = SEED.read_text("utf-8").replace("goatcounter-exports.getexport", "goatcounter-exports.gone")
    download = "call: goatcounter-exports.downloadexport\n        with:\n          id: rest.id\n"
    assert download in broken
    broken = broken.replace(download, download.replace("rest.id", "tools.id"))
    spec = tmp_path / "broken.yaml"
    spec.write_text(broken)
    run = run_cli(["lint", str(spec), "--schema", str(SCHEMA)])
    assert run.returncode == 1
    errors = [line for line in run.stdout.splitlines() if ": error: " in line]
    assert any("capability.exposes[0].resources[1].operations[0].call" in e and "does not resolve" in e for e in errors)
    assert any("capability.exposes[1].tools[1].call" in e for e in errors)
    assert any("resources[2].operations[0].with.id" in e and "tools adapter" in e for e in errors)


# The SHA-256 of the official schema, naftiko/framework tag v1.0.0-alpha2 (naftiko-schema-1.0.0-alpha2.json).
SCHEMA_SHA256 = "95d23858bc6765bd9d775364e506de4bf2498065cb899f93b8a539d8a50089f7"


def test_bundled_schema_is_the_official_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    first = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines()]
    assert commands == ["scripts/run", "scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^scripts/test\b", ci, flags=re.M)


def interrupt(service: Service) -> str:
    service.process.send_signal(signal.SIGINT)
    service.process.wait(30)
    if service.reader is None and service.process.stdout is not None:  # read by hand: collect the rest
        service.lines.extend(service.process.stdout.read().splitlines())
    return service.stop()


def test_readme_run_command_serves_the_named_site(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    env = service_env(goatcounter, tmp_path, GOATCOUNTER_EXPORTS_REST_PORT="0", GOATCOUNTER_EXPORTS_MCP_PORT="0")
    service = start_service_script(env)
    try:
        assert httpx.get(f"{service.rest}/v1/export/424242", timeout=30).json() == {"error": "not found"}
    finally:
        output = interrupt(service)
    assert "demo" not in output and goatcounter.export_key not in output


def start_service_script(env: dict[str, str]) -> Service:
    process = subprocess.Popen(
        ["scripts/run"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return attach(process)


def attach(process: subprocess.Popen[str]) -> Service:
    from .support import Service as ServiceType

    service = ServiceType(process)
    deadline = time.monotonic() + 180
    assert process.stdout is not None
    while time.monotonic() < deadline and not {"REST", "MCP"} <= set(service.urls):
        line = process.stdout.readline()
        if not line:
            break
        service.lines.append(line.rstrip("\n"))
        match = re.match(r"^(REST|MCP)\s+(http://\S+)", line)
        if match:
            service.urls[match.group(1)] = match.group(2)
    assert {"REST", "MCP"} <= set(service.urls), service.output()
    return service


def test_readme_run_without_a_site_starts_the_demo_and_its_curl_session_works(tmp_path: Path) -> None:
    env = clean_env(GOATCOUNTER_EXPORTS_REST_PORT="0", GOATCOUNTER_EXPORTS_MCP_PORT="0")
    service = start_service_script(env)
    try:
        assert service.process.stdout is not None
        while not (service.lines and service.lines[-1].startswith("Press Ctrl-C")):  # the demo's own lines
            service.lines.append(service.process.stdout.readline().rstrip("\n"))
        assert any(line.startswith("API key") for line in service.lines)
        # It says how to point export and sync at it, with the exact variables to copy.
        assert any(line.startswith("  export GOATCOUNTER_URL=http://127.0.0.1:") for line in service.lines)
        rest = service.rest
        (block,) = [block for block in code_blocks("sh") if block.startswith("curl ")]
        assert len(block.splitlines()) == 5
        script = block.replace("http://127.0.0.1:8080", rest)  # the port this test was given
        done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        created, end = json.JSONDecoder().raw_decode(done.stdout)  # curl adds no newline after the JSON
        assert created["id"] == 1
        assert (tmp_path / "export.csv.gz").read_bytes()[:2] == b"\x1f\x8b"
        rest_of_it = done.stdout[end:].splitlines()
        assert rest_of_it[0].startswith("2Path,Title,") and len(rest_of_it) == 4
        assert rest_of_it[3].startswith('{"openapi":"3.1.0"')
    finally:
        output = interrupt(service)
    assert "Press Ctrl-C" in output


def test_readme_mcp_configurations_work_as_written(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    import asyncio

    from mcp import Client, StdioServerParameters

    configs = [json.loads(block) for block in code_blocks("json")]
    http_config, stdio_config = (c["mcpServers"]["goatcounter"] for c in configs)
    assert http_config["url"] == "http://127.0.0.1:9090/mcp"
    env = service_env(goatcounter, tmp_path)

    async def names(client: Client) -> set[str]:
        async with client:
            tools = await client.list_tools()
            info = await client.call_tool("get-export-info", {"id": 424242})
            assert info.is_error and "not found" in info.content[0].text
            return {t.name for t in tools.tools}

    with running(SERVE, env) as service:
        listed = asyncio.run(names(Client(http_config["url"].replace("http://127.0.0.1:9090/mcp", service.mcp))))
        assert {"create-csv-export", "get-export-info", "download-export", "export-pageviews"} <= listed
    stdio_env = {**clean_env(), **stdio_config["env"]}
    stdio_env.update(GOATCOUNTER_URL=goatcounter.url, GOATCOUNTER_API_KEY=goatcounter.export_key)
    command = stdio_config["command"].replace("/ABSOLUTE/PATH/TO/goatcounter-exports", str(ROOT))
    assert Path(command).is_absolute()
    elsewhere = tmp_path / "a-client-starts-here"  # clients do not start in the checkout
    elsewhere.mkdir()
    params = StdioServerParameters(command=command, args=stdio_config["args"], env=stdio_env, cwd=elsewhere)
    assert len(asyncio.run(names(Client(params)))) == 5


@pytest.mark.parametrize(
    "command",
    [[name, "--help"] for name in ("serve", "mcp", "demo", "lint", "export", "sync", "doctor", "config", "browse")],
)
def test_every_command_is_documented_in_the_readme(command: list[str]) -> None:
    run = run_cli(command)
    assert run.returncode == 0
    assert f"goatcounter-exports {command[0]}" in README
    assert "Examples:" in run.stdout and "Exit codes:" in run.stdout


def test_readme_export_sync_cron_and_query_commands_work_as_written(tmp_path: Path) -> None:
    """Every `.venv/bin/goatcounter-exports` line, the cron entry and the sqlite3 query of the README."""

    lines = [line for block in code_blocks("sh") for line in block.replace("\\\n", "").splitlines()]
    commands = [line for line in lines if line.startswith(".venv/bin/goatcounter-exports ")]
    (cron,) = [line for line in lines if line.startswith("15 * * * * ")]
    query, _ = [line for line in lines if line.startswith("sqlite3 ")]  # the second: test_json_export.py
    assert "from pageviews" in query
    assert [c.split()[1] for c in commands] == ["export", "export"]
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc") as site:
        site.seed(["/cron-a", "/cron-b", "/cron-a"])
        home = tmp_path / "home"
        env = clean_env(HOME=str(home), GOATCOUNTER_URL=site.url, GOATCOUNTER_API_KEY=site.export_key)
        work = tmp_path / "work"
        work.mkdir()
        for command in commands:
            done = subprocess.run(str(ROOT / command), shell=True, cwd=work, env=env, capture_output=True, text=True)  # noqa: S602
            assert done.returncode == 0, done.stderr
        assert (work / "pageviews.csv").read_text().count("/cron-a") == 2
        assert (work / "new.csv.gz").exists()
        entry = cron.split(" ", 5)[5].replace("/path/to/goatcounter-exports", str(ROOT))
        entry = entry.replace("https://mysite.goatcounter.com", site.url).replace("=...", f"={site.export_key}")
        done = subprocess.run(entry, shell=True, env=clean_env(HOME=str(home)), capture_output=True, text=True)  # noqa: S602
        assert done.returncode == 0, done.stderr
        query = query.replace("https://mysite.goatcounter.com", site.url)
        answer = subprocess.run(query, shell=True, env=env, capture_output=True, text=True)  # noqa: S602
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.splitlines() == ["/cron-a|2", "/cron-b|1"]


def test_readme_fast_tier_command_selects_the_in_process_tier() -> None:
    assert "`.venv/bin/python -m pytest -m fast`" in README
    run = subprocess.run(
        [
            str(ROOT / ".venv/bin/python"),
            "-m",
            "pytest",
            "-m",
            "fast",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    assert any(line.startswith("tests/test_inprocess.py::") for line in collected)
    assert not any(line.startswith(("tests/test_rest.py::", "tests/test_workflow.py::")) for line in collected)
