"""Lint a capability document: the official JSON Schema, then the runtime's own checks.

Schema deviations the runtime accepts (the seed has three kinds) are warnings;
anything the runtime would refuse is an error. Every finding carries its path
and line in the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jsonschema
from jsonschema.exceptions import ValidationError

from ..errors import SpecError
from .loader import Document, build_spec, parse_yaml
from .models import format_path
from .resolve import resolve

SCHEMA_NAME = "naftiko-schema-1.0.0-alpha2.json"


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning"]
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}, " if self.line else ""
        return f"{self.level}: {where}{self.path or '<document>'}: {self.message}"


def bundled_schema_text() -> str:
    return resources.files("goatcounter_exports.spec").joinpath(SCHEMA_NAME).read_text("utf-8")


def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    text = Path(path).read_text("utf-8") if path else bundled_schema_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _leaf_errors(error: ValidationError) -> list[ValidationError]:
    """Descend `oneOf`/`anyOf` failures into the branch that fits the document best."""
    if not error.context:
        return [error]
    branches: dict[int, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(int(sub.relative_schema_path[0]), []).append(sub)

    def score(errors: list[ValidationError]) -> tuple[int, int]:
        # A branch whose `type` discriminator fails is the wrong branch, however few its errors.
        wrong_kind = sum(1 for e in errors if e.validator == "const" and list(e.relative_path)[-1:] == ["type"])
        return wrong_kind, len(errors)

    best = min(branches.values(), key=score)
    return [leaf for sub in best for leaf in _leaf_errors(sub)]


def _describe(error: ValidationError) -> str:
    if error.validator == "additionalProperties":
        return f"not allowed by the schema: {error.message.split('(')[-1].rstrip(')')}"
    return error.message[:300]


def schema_findings(doc: Document, schema: dict[str, Any]) -> list[Finding]:
    validator = jsonschema.Draft202012Validator(schema)
    findings = []
    for error in validator.iter_errors(doc.data):
        for leaf in _leaf_errors(error):
            key = tuple(leaf.absolute_path)
            findings.append(Finding("warning", format_path(key), doc.line_of(key), f"schema: {_describe(leaf)}"))
    unique = {(f.path, f.message): f for f in findings}
    return sorted(unique.values(), key=lambda f: (f.line or 0, f.path))


def lint_text(text: str, source: str, schema: dict[str, Any]) -> list[Finding]:
    try:
        doc = parse_yaml(text, source)
    except SpecError as exc:
        return [Finding("error", exc.path, exc.line, str(exc))]
    findings = schema_findings(doc, schema)
    try:
        spec = build_spec(doc)
    except SpecError as exc:
        return [*findings, Finding("error", exc.path, exc.line, str(exc).split(": ", 1)[-1])]
    for problem in resolve(spec).problems:
        findings.append(Finding(problem.level, problem.path, doc.line_of(problem.key), problem.message))
    return findings
