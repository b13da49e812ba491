"""The MCP adapter's hooks: what a tool is, what a call returns, and who provides tools.

Framework-free, so a provider (goatcounter.tools) needs neither the MCP SDK nor the
adapter. The adapter (adapters/mcp.py) is given providers when it is built; it lists
their tools, checks arguments against each tool's published schema (once, here), and
turns errors into `isError` results. `SpecTools` serves any spec's tools generically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import GoatcounterExportsError, InputError
from ..progress import Progress
from ..runtime import Runtime
from ..spec.resolve import Binding
from ..upstream import NOT_JSON

MAX_TEXT_CHARS = 20_000  # what a tool result may put in a model's context


@dataclass(frozen=True)
class Annotations:
    read_only: bool | None = None
    destructive: bool | None = None
    idempotent: bool | None = None
    open_world: bool | None = None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None
    title: str | None = None
    annotations: Annotations = field(default_factory=Annotations)


@dataclass(frozen=True)
class EmbeddedText:
    """A text resource carried in a result (one page of CSV rows)."""

    uri: str
    mime_type: str
    text: str


@dataclass(frozen=True)
class ToolResult:
    text: str
    structured: dict[str, Any] | None = None
    resource: EmbeddedText | None = None
    is_error: bool = False


class ToolProvider(Protocol):
    """A source of tools. Arguments reach `call` already checked against the tool's input schema."""

    def tools(self) -> Sequence[Tool]: ...

    async def call(self, name: str, arguments: dict[str, Any], progress: Progress) -> ToolResult: ...

    def explain(self, error: GoatcounterExportsError) -> str | None:
        """What a model should read for an error of this provider's calls (None: the error's own text)."""


def annotations_of(binding: Binding) -> Annotations:
    hints = binding.hints
    open_world = True if hints.open_world is None else hints.open_world
    return Annotations(hints.read_only, hints.destructive, hints.idempotent, open_world)


def binding_arguments(runtime: Runtime, binding: Binding) -> dict[str, Any]:
    """A binding's input schema as tool arguments: a body's fields are offered as arguments of their own
    (the body itself stays, for callers that pass it whole)."""
    schema = runtime.input_schema(binding)
    properties = dict(schema["properties"])
    for item in binding.inputs:
        body = properties.get(item.name, {})
        if item.location == "body" and body.get("properties"):
            properties = {**body["properties"], **properties}
    return {
        "type": "object",
        "properties": properties,
        "required": list(schema["required"]),
        "additionalProperties": False,
    }


def binding_inputs(runtime: Runtime, binding: Binding, arguments: dict[str, Any]) -> dict[str, Any]:
    """Tool arguments -> the binding's inputs: body fields given as arguments go back into the body."""
    inputs = {item.name: arguments[item.name] for item in binding.inputs if item.name in arguments}
    properties = runtime.input_schema(binding)["properties"]
    for item in binding.inputs:
        fields = properties.get(item.name, {}).get("properties")
        if item.location != "body" or not fields:
            continue
        body = dict(inputs.get(item.name) or {})
        for key in fields:
            if key in arguments and key not in inputs:
                if key in body and body[key] != arguments[key]:
                    raise InputError(f"{key} is given twice, with different values", field=key)
                body[key] = arguments[key]
        if body or item.name in inputs:
            inputs[item.name] = body
    return inputs


class SpecTools:
    """Every MCP tool the spec declares, served generically: JSON comes back structured, text as text,
    and binary answers are described, never dumped into a model's context."""

    def __init__(self, runtime: Runtime, bindings: Sequence[Binding]) -> None:
        self.runtime = runtime
        self.bindings = {b.name: b for b in bindings}

    def tools(self) -> list[Tool]:
        return [
            Tool(
                name=b.name,
                description=b.description or b.target.operation.description,
                input_schema=binding_arguments(self.runtime, b),
                title=b.description or None,
                annotations=annotations_of(b),
            )
            for b in self.bindings.values()
        ]

    async def call(self, name: str, arguments: dict[str, Any], progress: Progress) -> ToolResult:
        binding = self.bindings[name]
        async with self.runtime.send(binding, binding_inputs(self.runtime, binding, arguments)) as response:
            if not response.is_textual and response.status < 300:
                size = response.headers.get("Content-Length", "unknown")
                return ToolResult(f"The answer is a {response.content_type} file of {size} bytes; not shown here.")
            document = await response.document()
        if document is NOT_JSON:
            return ToolResult("(empty answer)")
        mapped = self.runtime.map_output(binding.outputs, document)
        text = json.dumps(mapped, indent=1)
        if len(text) > MAX_TEXT_CHARS:
            text = text[:MAX_TEXT_CHARS] + "\n... (truncated)"
        return ToolResult(text, mapped if isinstance(mapped, dict) else {"result": mapped})

    def explain(self, error: GoatcounterExportsError) -> str | None:
        return None
