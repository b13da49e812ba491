"""Capability document: YAML text in, a checked `Spec` out, or a `SpecError` naming the line.

Loading happens in three passes, each of which can refuse the document:
1. YAML parsing, keeping the line of every node so messages can point at it;
2. a scan for features the runtime does not implement (steps, forward, ...),
   which are refused rather than silently ignored;
3. the typed models, then `spec.resolve` (every `call`, `with` and placeholder).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import SpecError
from .models import Spec, format_path
from .resolve import resolve

SUPPORTED_VERSIONS = ("1.0.0-alpha2",)
DEFAULT_SPEC_NAME = "goatcounter-exports.yaml"

# (where, key) -> why it is refused. `where` is a path pattern with `*` for list indexes.
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("", "import"): "imported documents are not supported",
    ("capability", "aggregates"): "aggregates are not supported",
    ("binds.*", "location"): "only the process environment is supported as a bind provider",
    ("capability.binds.*", "location"): "only the process environment is supported as a bind provider",
    ("capability.consumes.*", "import"): "imported consumes are not supported",
    ("capability.consumes.*", "location"): "imported consumes are not supported",
    ("capability.consumes.*.resources.*.operations.*", "body"): "request body templates are not supported",
    ("capability.exposes.*", "resources@mcp"): "MCP resources are not supported",
    ("capability.exposes.*", "prompts"): "MCP prompts are not supported",
    ("capability.exposes.*", "skills"): "skill adapters are not supported",
    ("capability.exposes.*", "management"): "control adapters are not supported",
    ("capability.exposes.*", "observability"): "control adapters are not supported",
    ("capability.exposes.*.resources.*", "forward"): "forward is not supported",
    ("capability.exposes.*.resources.*.operations.*", "steps"): "multi-step orchestration (steps) is not supported",
    ("capability.exposes.*.resources.*.operations.*", "mappings"): "step mappings are not supported",
    ("capability.exposes.*.resources.*.operations.*", "ref"): "aggregate references (ref) are not supported",
    ("capability.exposes.*.tools.*", "steps"): "multi-step orchestration (steps) is not supported",
    ("capability.exposes.*.tools.*", "mappings"): "step mappings are not supported",
    ("capability.exposes.*.tools.*", "ref"): "aggregate references (ref) are not supported",
}
SUPPORTED_AUTH = ("bearer", "apikey", "basic")
SUPPORTED_EXPOSES = ("rest", "mcp")


@dataclass(frozen=True)
class Document:
    """Parsed YAML plus the line of each node, for messages."""

    data: Any
    lines: dict[tuple[str | int, ...], int]
    source: str

    def line_of(self, path: tuple[str | int, ...]) -> int | None:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)

    def error(self, message: str, path: tuple[str | int, ...]) -> SpecError:
        return SpecError(message, path=format_path(path), line=self.line_of(path), source=self.source)


def parse_yaml(text: str, source: str) -> Document:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise SpecError(f"not valid YAML: {getattr(exc, 'problem', exc)}", line=line, source=source) from None
    if not isinstance(data, dict):
        raise SpecError("a capability document must be a YAML mapping", source=source)
    lines: dict[tuple[str | int, ...], int] = {}
    _index_lines(node, (), lines)
    return Document(data, lines, source)


def _index_lines(node: yaml.Node | None, path: tuple[str | int, ...], lines: dict[tuple[str | int, ...], int]) -> None:
    if node is None:
        return
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            lines[child] = key.start_mark.line + 1
            _index_lines(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index_lines(item, (*path, index), lines)


def _pattern(path: tuple[str | int, ...]) -> str:
    return ".".join("*" if isinstance(p, int) else p for p in path)


def refuse_unsupported(doc: Document) -> None:
    """Raise on the first feature the runtime would otherwise have to ignore."""

    def walk(value: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(value, dict):
            where = _pattern(path)
            for key in value:
                reason = UNSUPPORTED.get((where, str(key)))
                if reason is None and key == "resources" and value.get("type") == "mcp":
                    reason = UNSUPPORTED.get((where, "resources@mcp"))
                if reason:
                    raise doc.error(f"'{key}': {reason} by this runtime", (*path, str(key)))
            _check_kinds(doc, value, path)
            for key, child in value.items():
                walk(child, (*path, str(key)))
        elif isinstance(value, list):
            for index, child in enumerate(value):
                walk(child, (*path, index))

    walk(doc.data, ())


def _check_kinds(doc: Document, value: dict[str, Any], path: tuple[str | int, ...]) -> None:
    where = _pattern(path)
    if where == "capability.exposes.*" and value.get("type") not in SUPPORTED_EXPOSES:
        raise doc.error(f"exposed adapter type {value.get('type')!r} is not supported (only rest, mcp)", path)
    if where == "capability.consumes.*" and value.get("type") != "http":
        raise doc.error(f"consumed adapter type {value.get('type')!r} is not supported (only http)", path)
    if where.endswith("authentication") and value.get("type") not in SUPPORTED_AUTH:
        raise doc.error(f"authentication type {value.get('type')!r} is not supported (bearer, apikey, basic)", path)
    if where.endswith("inputParameters.*") and value.get("in") in ("environment", "cookie"):
        raise doc.error(f"input parameters 'in: {value.get('in')}' are not supported", (*path, "in"))


def _model_error(doc: Document, exc: ValidationError) -> SpecError:
    first = exc.errors()[0]
    path = tuple(p for p in first["loc"] if isinstance(p, str | int))
    # pydantic reports union branches by model name; keep only document keys.
    path = tuple(p for p in path if isinstance(p, int) or not p[:1].isupper())
    return doc.error(f"{first['msg']}", path)


def build_spec(doc: Document) -> Spec:
    """Passes 1 and 2 and the typed models; `resolve` problems are left to the caller."""
    version = doc.data.get("naftiko")
    if version not in SUPPORTED_VERSIONS:
        message = f"unsupported naftiko version {version!r}; this runtime serves {SUPPORTED_VERSIONS[0]}"
        raise doc.error(message, ("naftiko",))
    refuse_unsupported(doc)
    data = dict(doc.data)
    # Root-level consumes are shared by the capability: serve them as if declared inside it.
    if "consumes" in data:
        capability = dict(data.get("capability") or {})
        capability["consumes"] = [*data.pop("consumes"), *capability.get("consumes", [])]
        data["capability"] = capability
    try:
        return Spec.model_validate({**data, "source": doc.source})
    except ValidationError as exc:
        raise _model_error(doc, exc) from None


def load_text(text: str, source: str = "<string>") -> Spec:
    doc = parse_yaml(text, source)
    spec = build_spec(doc)
    problems = [p for p in resolve(spec).problems if p.level == "error"]
    if problems:
        first = problems[0]
        raise SpecError(first.message, path=first.path, line=doc.line_of(first.key), source=source)
    return spec


def load_path(path: str | Path) -> Spec:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read capability document: {exc.strerror}", source=str(file)) from None
    return load_text(text, str(file))


def default_spec_text() -> str:
    return resources.files("goatcounter_exports.capabilities").joinpath(DEFAULT_SPEC_NAME).read_text("utf-8")


def load_default() -> Spec:
    return load_text(default_spec_text(), f"<builtin>/{DEFAULT_SPEC_NAME}")
