"""The MCP adapter: one tool per exposed MCP tool in the spec, on the SDK's low-level server.

Schemas come from the runtime (and extensions); calls go to the runtime; the
transport (streamable HTTP or stdio) is chosen outside, in `app`/`cli`.
Arguments are checked before any upstream call, and every failure comes back
as an `isError` result a model can read and act on.
"""

from __future__ import annotations

import logging
from typing import Any

import jsonschema
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params

from .. import __version__
from ..errors import ApiError, ConfigError, ExportError, InputError, SpecError, UpstreamError
from ..outcome import ExtraTool, Outcome, Report, ToolSchema, generic_outcome
from ..runtime import Runtime
from ..spec.resolve import Binding

log = logging.getLogger(__name__)


async def _no_report(progress: float, total: float | None, message: str | None) -> None:
    return None


class ToolSet:
    """The generated tools of one MCP expose, with their schemas, ready to list and call."""

    def __init__(self, runtime: Runtime, namespace: str | None = None) -> None:
        self.runtime = runtime
        exposes = runtime.spec.mcp_exposes
        self.expose = next((e for e in exposes if namespace in (None, e.namespace)), None)
        bindings = runtime.bindings("mcp", self.expose.namespace) if self.expose else []
        self.bindings = {b.name: b for b in bindings}
        self.extras = {b.name: self._extension_schema(b) for b in bindings}
        self.tools = [self._tool(b) for b in bindings]
        self.extra = {
            t.name: t for e in runtime.extensions for t in e.extra_tools(runtime) if t.name not in self.bindings
        }
        self.tools += [self._extra_tool(t) for t in self.extra.values()]
        self.input_schemas = {t.name: t.input_schema for t in self.tools}
        self.validators = {name: jsonschema.Draft202012Validator(s) for name, s in self.input_schemas.items()}

    def _extension_schema(self, binding: Binding) -> ToolSchema:
        for extension in self.runtime.extensions:
            schema = extension.tool_schema(binding)
            if schema is not None:
                return schema
        return ToolSchema({})

    def _tool(self, binding: Binding) -> types.Tool:
        schema = self.runtime.input_schema(binding)
        properties = dict(schema["properties"])
        required = list(schema["required"])
        for item in binding.inputs:
            body = properties.get(item.name, {})
            if item.location == "body" and body.get("properties"):
                # Offer the body's fields as arguments of their own, and keep `body` for callers that use it.
                properties = {**body["properties"], **properties}
        properties.update(self.extras[binding.name].extra_properties)
        hints = binding.hints
        return types.Tool(
            name=binding.name,
            description=binding.description or binding.target.operation.description,
            input_schema={
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
            output_schema=self.extras[binding.name].output_schema,
            annotations=types.ToolAnnotations(
                title=binding.description or None,
                read_only_hint=hints.read_only,
                destructive_hint=hints.destructive,
                idempotent_hint=hints.idempotent,
                open_world_hint=True if hints.open_world is None else hints.open_world,
            ),
        )

    def _extra_tool(self, tool: ExtraTool) -> types.Tool:
        return types.Tool(
            name=tool.name,
            description=tool.description,
            input_schema=tool.input_schema,
            output_schema=tool.output_schema,
            annotations=types.ToolAnnotations(
                read_only_hint=tool.read_only,
                destructive_hint=False,
                idempotent_hint=tool.idempotent,
                open_world_hint=tool.open_world,
            ),
        )

    def check(self, name: str, arguments: dict[str, Any]) -> None:
        """Arguments against the tool's published input schema. Raises InputError."""
        error = jsonschema.exceptions.best_match(self.validators[name].iter_errors(arguments))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path)
            raise InputError(f"{where + ': ' if where else ''}{error.message}", field=where or None)

    def split_arguments(self, binding: Binding, arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Tool arguments -> (runtime inputs, extension extras). Raises InputError."""
        self.check(binding.name, arguments)
        extras_names = set(self.extras[binding.name].extra_properties)
        extras = {k: v for k, v in arguments.items() if k in extras_names}
        inputs: dict[str, Any] = {}
        for item in binding.inputs:
            if item.name in arguments:
                inputs[item.name] = arguments[item.name]
        for item in binding.inputs:
            fields = self.runtime.input_schema(binding)["properties"].get(item.name, {}).get("properties")
            if item.location == "body" and fields:
                flat = {k: arguments[k] for k in fields if k in arguments and k not in inputs}
                body = dict(inputs.get(item.name) or {})
                for key, value in flat.items():
                    if key in body and body[key] != value:
                        raise InputError(f"{key} is given twice, with different values", field=key)
                    body[key] = value
                if body or item.name in inputs:
                    inputs[item.name] = body
        return inputs, extras

    async def call(self, name: str, arguments: dict[str, Any], report: Report = _no_report) -> Outcome:
        binding = self.bindings.get(name)
        if binding is None and name not in self.extra:
            known = ", ".join([*self.bindings, *self.extra])
            return Outcome(f"Unknown tool {name!r}. Available: {known}.", is_error=True)
        try:
            if binding is None:
                self.check(name, arguments)
                return await self.extra[name].run(arguments, report)
            inputs, extras = self.split_arguments(binding, arguments)
            for extension in self.runtime.extensions:
                outcome = await extension.run_tool(self.runtime, binding, inputs, extras)
                if outcome is not None:
                    return outcome
            return await generic_outcome(self.runtime, binding, inputs)
        except InputError as exc:
            return Outcome(f"Invalid arguments: {exc}. Nothing was sent to the upstream.", is_error=True)
        except ApiError as exc:
            return Outcome(self._advice(binding, exc), is_error=True)
        except SpecError as exc:
            return Outcome(str(exc), is_error=True)
        except (UpstreamError, ExportError, ConfigError) as exc:
            log.warning("tool %s failed: %s", name, exc)
            return Outcome(str(exc), is_error=True)

    def _advice(self, binding: Binding | None, error: ApiError) -> str:
        consumes = binding.target.consumes if binding else self.runtime.spec.capability.consumes[0]
        for extension in self.runtime.extensions:
            text = extension.explain_error(consumes, error)
            if text:
                return text
        return f"The upstream answered {error.status}: {error.message}"


def to_result(outcome: Outcome) -> types.CallToolResult:
    content: list[types.ContentBlock] = [types.TextContent(text=outcome.text)]
    if outcome.resource is not None:
        content.append(
            types.EmbeddedResource(
                resource=types.TextResourceContents(
                    uri=outcome.resource.uri, mime_type=outcome.resource.mime_type, text=outcome.resource.text
                )
            )
        )
    return types.CallToolResult(content=content, structured_content=outcome.structured, is_error=outcome.is_error)


def create_mcp_server(runtime: Runtime, namespace: str | None = None) -> Server[Any]:
    toolset = ToolSet(runtime, namespace)
    expose = toolset.expose

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=toolset.tools)

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        token = progress_token_from_params(ctx.params)

        async def report(progress: float, total: float | None, message: str | None) -> None:
            if token is not None:
                await ctx.session.send_progress_notification(
                    token, progress, total, message, related_request_id=str(ctx.request_id)
                )

        return to_result(await toolset.call(params.name, dict(params.arguments or {}), report))

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
        expose.namespace if expose else "goatcounter-exports",
        version=__version__,
        title=runtime.spec.info.label or None,
        instructions=expose.description if expose and expose.description else None,
        get_tool_input_schema=lambda name: toolset.input_schemas.get(name),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_prompts=list_prompts,
    )
