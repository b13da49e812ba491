"""Adapter-neutral results of a tool call, and the generic way to get one from any binding.

The MCP adapter turns an `Outcome` into a `CallToolResult`; extensions (the
GoatCounter profile) can produce richer outcomes for the operations they know.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .runtime import Runtime
from .spec.resolve import Binding
from .upstream import NOT_JSON, UpstreamResponse, parse_json, retry_after

MAX_TEXT_CHARS = 20_000  # what a tool result may put in a model's context


@dataclass(frozen=True)
class EmbeddedText:
    uri: str
    mime_type: str
    text: str


@dataclass(frozen=True)
class Outcome:
    text: str
    structured: dict[str, Any] | None = None
    resource: EmbeddedText | None = None
    is_error: bool = False


@dataclass(frozen=True)
class ToolSchema:
    """What an extension adds to a generated tool: extra arguments and an output schema."""

    extra_properties: dict[str, Any]
    output_schema: dict[str, Any] | None = None


async def read_answer(response: UpstreamResponse) -> Any:
    """The JSON document of a textual answer, raising ApiError for an error status."""
    body = await response.read() if response.is_textual or response.status >= 300 else b""
    document = parse_json(body) if body else NOT_JSON
    if response.status >= 400:
        message = document.get("error") if isinstance(document, dict) else None
        if message is None and isinstance(document, dict) and "errors" in document:
            message = json.dumps(document["errors"])
        raise ApiError(
            response.status,
            str(message or f"{response.status} {response.reason}".strip()),
            retry_after=retry_after(response.headers.get("Retry-After")),
        )
    return document


async def generic_outcome(runtime: Runtime, binding: Binding, inputs: dict[str, Any]) -> Outcome:
    """Call the binding; JSON comes back structured, text as text, binary is described, not dumped."""
    async with runtime.call(binding, inputs) as response:
        if not response.is_textual and response.status < 300:
            size = response.headers.get("Content-Length", "unknown")
            return Outcome(f"The answer is a {response.content_type} file of {size} bytes; not shown here.")
        document = await read_answer(response)
    if document is NOT_JSON:
        return Outcome("(empty answer)")
    mapped = runtime.map_output(binding.outputs, document)
    text = json.dumps(mapped, indent=1)
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + "\n... (truncated)"
    return Outcome(text, mapped if isinstance(mapped, dict) else {"result": mapped})


Report = Callable[[float, float | None, str | None], Awaitable[None]]  # (progress, total, message)


@dataclass(frozen=True)
class ExtraTool:
    """A tool an extension adds beside the spec's own (a workflow, a question over local data)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    read_only: bool
    idempotent: bool
    open_world: bool
    run: Callable[[dict[str, Any], Report], Awaitable[Outcome]]
