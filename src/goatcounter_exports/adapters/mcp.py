"""The MCP adapter: the tools of its providers (adapters/tools.py) on the SDK's low-level server.

Arguments are checked against each tool's published input schema before the provider
is called, and every failure comes back as an `isError` result a model can read and act
on. The transport (streamable HTTP or stdio) is chosen outside, in `app`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params

from .. import __version__
from ..errors import ApiError, GoatcounterExportsError, InputError
from ..progress import Progress, no_progress
from ..validation import Validator
from .tools import Tool, ToolProvider, ToolResult

log = logging.getLogger(__name__)


class ToolSet:
    """The tools of several providers, by name (the first provider of a name wins)."""

    def __init__(self, providers: Sequence[ToolProvider]) -> None:
        self.providers: dict[str, ToolProvider] = {}
        self.tools: list[Tool] = []
        for provider in providers:
            for tool in provider.tools():
                if tool.name not in self.providers:
                    self.providers[tool.name] = provider
                    self.tools.append(tool)
        self.validators = {tool.name: Validator(tool.input_schema) for tool in self.tools}

    async def call(self, name: str, arguments: dict[str, Any], progress: Progress = no_progress) -> ToolResult:
        provider = self.providers.get(name)
        if provider is None:
            return ToolResult(f"Unknown tool {name!r}. Available: {', '.join(self.providers)}.", is_error=True)
        try:
            self.validators[name].check(arguments)
        except InputError as exc:
            return ToolResult(f"Invalid arguments: {exc}. Nothing was sent to the upstream.", is_error=True)
        try:
            return await provider.call(name, arguments, progress)
        except InputError as exc:  # the provider may have read from the upstream first: claim nothing about it
            return ToolResult(f"Invalid arguments: {exc}.", is_error=True)
        except GoatcounterExportsError as exc:
            if not isinstance(exc, ApiError):
                log.warning("tool %s failed: %s", name, exc)
            explained = provider.explain(exc)
            if explained is None and isinstance(exc, ApiError):
                explained = f"The upstream answered {exc.status}: {exc.message}"
            return ToolResult(explained or str(exc), is_error=True)

    def schema(self, name: str) -> dict[str, Any] | None:
        validator = self.validators.get(name)
        return validator.schema if validator else None


def to_sdk_tool(tool: Tool) -> types.Tool:
    hints = tool.annotations
    return types.Tool(
        name=tool.name,
        description=tool.description,
        input_schema=tool.input_schema,
        output_schema=tool.output_schema,
        annotations=types.ToolAnnotations(
            title=tool.title,
            read_only_hint=hints.read_only,
            destructive_hint=hints.destructive,
            idempotent_hint=hints.idempotent,
            open_world_hint=hints.open_world,
        ),
    )


def to_result(result: ToolResult) -> types.CallToolResult:
    content: list[types.ContentBlock] = [types.TextContent(text=result.text)]
    if result.resource is not None:
        content.append(
            types.EmbeddedResource(
                resource=types.TextResourceContents(
                    uri=result.resource.uri, mime_type=result.resource.mime_type, text=result.resource.text
                )
            )
        )
    return types.CallToolResult(content=content, structured_content=result.structured, is_error=result.is_error)


def create_mcp_server(
    providers: Sequence[ToolProvider], *, name: str, title: str | None = None, instructions: str | None = None
) -> Server[Any]:
    toolset = ToolSet(providers)
    listed = [to_sdk_tool(tool) for tool in toolset.tools]

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        token = progress_token_from_params(ctx.params)

        async def progress(stage: str, done: float, total: float | None) -> None:
            if token is not None:
                await ctx.session.send_progress_notification(
                    token, done, total, stage, related_request_id=str(ctx.request_id)
                )

        return to_result(await toolset.call(params.name, dict(params.arguments or {}), progress))

    # The spec declares no MCP resources or prompts; answering their lists (empty) rather than
    # "method not found" lets generic clients probe every list without an error.
    async def list_resources(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[])

    async def list_prompts(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=[])

    return Server(
        name,
        version=__version__,
        title=title,
        instructions=instructions,
        get_tool_input_schema=toolset.schema,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_prompts=list_prompts,
    )
