"""The small expression language of `with` values, templates and JSONPath mappings.

`with: {id: rest.id}` takes the adapter input `id`; `{{env.KEY}}` renders a
bound variable; `$.a.b[0]` picks from a JSON body. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

TEMPLATE = re.compile(r"\{\{\s*([A-Za-z0-9_.$-]+)\s*\}\}")
# Path placeholders: the seed's `{id}` and the reference engine's `{{id}}` mean the same.
PLACEHOLDER = re.compile(r"\{\{?\s*([A-Za-z0-9_-]+)\s*\}?\}")
REFERENCE = re.compile(r"^(?:\$this\.)?([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)$")

# Adapter-neutral prefixes that always mean "the calling adapter's input".
ADAPTER_PREFIXES = ("rest", "tools")


@dataclass(frozen=True)
class InputRef:
    """`rest.<name>`, `tools.<name>` or `<expose-namespace>.<name>`: an adapter input."""

    name: str


@dataclass(frozen=True)
class Template:
    """A string with `{{...}}` parts, rendered at call time."""

    text: str


@dataclass(frozen=True)
class Literal:
    value: Any


Source = InputRef | Template | Literal


def parse_source(value: object, adapter_namespace: str) -> Source:
    """Read one `with` value as seen from the adapter whose namespace is given."""
    if not isinstance(value, str):
        return Literal(value)
    if TEMPLATE.search(value):
        return Template(value)
    match = REFERENCE.match(value)
    if match and match.group(1) in (*ADAPTER_PREFIXES, adapter_namespace):
        return InputRef(match.group(2))
    return Literal(value)


def looks_like_reference(value: object) -> str | None:
    """The namespace part of a `ns.name` string, for lint; None when it is not one."""
    if isinstance(value, str):
        match = REFERENCE.match(value)
        if match:
            return match.group(1)
    return None


def path_placeholders(path: str) -> list[str]:
    return PLACEHOLDER.findall(path)


def fill_path(path: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], path)


def template_names(text: str) -> list[str]:
    return TEMPLATE.findall(text)


def render(text: str, lookup: Callable[[str], str]) -> str:
    """Replace each `{{name}}` with `lookup(name)`; `$env.X` style names are accepted too."""
    return TEMPLATE.sub(lambda m: lookup(m.group(1).removeprefix("$")), text)


def split_dotted(name: str, known_namespaces: Collection[str]) -> tuple[str | None, str]:
    """`env.KEY` -> ("env", "KEY") when `env` is a known namespace, else (None, name)."""
    head, dot, tail = name.partition(".")
    if dot and head in known_namespaces:
        return head, tail
    return None, name


_JSONPATH_STEP = re.compile(r"\.([A-Za-z0-9_$-]+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")


def jsonpath_get(document: Any, path: str) -> Any:
    """Evaluate the simple JSONPath subset mappings use: `$`, `$.`, `$.a.b`, `$.a[0]`, `$['a']`.

    A missing step yields None rather than an error, as a mapping to an absent field does.
    """
    expression = path.strip()
    if not expression.startswith("$"):
        raise ValueError(f"not a JSONPath expression: {path!r}")
    rest = expression[1:]
    if rest in ("", "."):
        return document
    position = 0
    current = document
    while position < len(rest):
        match = _JSONPATH_STEP.match(rest, position)
        if not match:
            raise ValueError(f"unsupported JSONPath expression: {path!r}")
        position = match.end()
        key, index, quoted, dquoted = match.groups()
        if index is not None:
            current = current[int(index)] if isinstance(current, list) and int(index) < len(current) else None
        else:
            field = key if key is not None else (quoted if quoted is not None else dquoted)
            current = current.get(field) if isinstance(current, dict) else None
        if current is None:
            return None
    return current


def is_jsonpath(path: str) -> bool:
    try:
        jsonpath_get({}, path)
    except ValueError:
        return False
    return True
