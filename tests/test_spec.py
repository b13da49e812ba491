"""The capability document: loading, the project's reading of the seed, and refusals."""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest

from goatcounter_exports.errors import SpecError
from goatcounter_exports.spec import load_default, load_text, resolve
from goatcounter_exports.spec.expressions import jsonpath_get

from .support import SEED

pytestmark = pytest.mark.fast


def seed_text() -> str:
    return SEED.read_text("utf-8")


# The SHA-256 of the seed as users have it (goatcounter-exports.yaml of the capability page).
SEED_SHA256 = "bb292efef1616ba3ce31a9ad473c6f48cf8655ef03efe2a6ae3ea5006055975c"


def test_builtin_spec_is_the_seed_byte_for_byte() -> None:
    bundled = resources.files("goatcounter_exports.capabilities").joinpath("goatcounter-exports.yaml").read_bytes()
    assert hashlib.sha256(bundled).hexdigest() == SEED_SHA256


def test_seed_resolves_rest_and_tools_references_to_inputs() -> None:
    resolution = resolve(load_default())
    assert [p for p in resolution.problems if p.level == "error"] == []
    by_name = {b.name: b for b in resolution.bindings}
    assert set(by_name) == {
        "createexport",
        "getexport",
        "downloadexport",
        "create-csv-export",
        "get-export-info",
        "download-export",
    }
    get_tool = by_name["get-export-info"]
    # `with: {id: tools.id}` is the tool argument `id`, not the literal string "tools.id".
    assert [(i.name, i.type, i.required) for i in get_tool.inputs] == [("id", "integer", True)]
    download = by_name["downloadexport"]
    assert (download.method, download.path) == ("GET", "/v1/export/{id}/download")
    assert [(i.name, i.location) for i in download.inputs] == [("id", "path")]
    create = by_name["createexport"]
    assert [(i.name, i.location, i.required) for i in create.inputs] == [("body", "body", False)]


@pytest.mark.parametrize(
    ("snippet", "where", "words"),
    [
        ("steps: [{type: call, name: a, call: x.y}]", "operations[0].steps", "steps"),
        ("mappings: [{targetName: a, value: b}]", "operations[0].mappings", "mappings"),
        ("ref: agg.fn", "operations[0].ref", "ref"),
    ],
)
def test_unimplemented_operation_features_are_refused_with_their_path_and_line(
    snippet: str, where: str, words: str
) -> None:
    text = seed_text().replace(
        "        call: goatcounter-exports.getexport\n",
        f"        call: goatcounter-exports.getexport\n        {snippet}\n",
        1,
    )
    with pytest.raises(SpecError) as caught:
        load_text(text, "mine.yaml")
    message = str(caught.value)
    assert f"capability.exposes[0].resources[1].{where}" in message
    assert words in message and "not supported" in message
    line = text.splitlines().index(f"        {snippet}") + 1
    assert message.startswith(f"mine.yaml:{line}:")


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        (
            "    - path: /v1/export\n",
            "    - path: /v1/export\n      forward: {targetNamespace: x}\n",
            "resources[0].forward",
        ),
        ("    transport: http\n", "    transport: http\n    prompts: []\n", "exposes[1].prompts"),
        (
            "    port: 8080\n",
            "    port: 8080\n    authentication: {type: oauth2, authorizationServerUri: 'https://as', resource: r}\n",
            "exposes[0].authentication",
        ),
        ("      type: bearer\n", "      type: digest\n", "consumes[0].authentication"),
        ("- namespace: env\n", "- namespace: env\n  location: vault://x\n", "binds[0].location"),
        ("  - type: rest\n", "  - type: skill\n", "exposes[0]"),
    ],
)
def test_other_unimplemented_features_are_refused(old: str, new: str, path: str) -> None:
    text = seed_text()
    assert old in text
    with pytest.raises(SpecError) as caught:
        load_text(text.replace(old, new, 1), "x.yaml")
    assert path in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("call: goatcounter-exports.getexport", "call: goatcounter-exports.nope", "does not resolve"),
        ("          id: rest.id\n", "          id: tools.id\n", "refers to the tools adapter"),
        ("        with:\n          id: rest.id\n", "        with: {}\n", "is not fed"),
        ("naftiko: 1.0.0-alpha2", "naftiko: 9.9.9", "unsupported naftiko version"),
        ("token: '{{env.GOATCOUNTER_API_KEY}}'", "token: '{{env.MISSING}}'", "names no bound variable"),
    ],
)
def test_broken_references_are_errors(old: str, new: str, expected: str) -> None:
    text = seed_text()
    assert old in text
    with pytest.raises(SpecError, match=expected):
        load_text(text.replace(old, new, 1), "x.yaml")


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(SpecError, match=r"^x\.yaml:3: not valid YAML"):
        load_text("naftiko: 1.0.0-alpha2\nkey: value\n  bad: indent\n", "x.yaml")


@pytest.mark.parametrize(
    ("path", "expected"),
    [("$.", {"a": [1, {"b": 2}]}), ("$", {"a": [1, {"b": 2}]}), ("$.a[1].b", 2), ("$['a'][0]", 1), ("$.zz", None)],
)
def test_jsonpath_subset(path: str, expected: object) -> None:
    assert jsonpath_get({"a": [1, {"b": 2}]}, path) == expected
