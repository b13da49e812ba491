"""The OpenAPI 3.1 document of the REST adapter, built from the same bindings it serves.

Its hooks (`OpenApiHooks`) let an API's own module describe the answers it really gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .. import __version__
from ..runtime import Runtime
from ..spec.resolve import Binding


class OpenApiHooks(Protocol):
    def responses(self, binding: Binding) -> dict[str, Any] | None:
        """The responses this API really gives for a binding (status -> response object), or None."""

    def schemas(self) -> dict[str, Any]:
        """Named schemas the responses above refer to."""


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An error. GoatCounter answers either `error` (a message) or `errors` (field -> messages).",
    "properties": {
        "error": {"type": "string"},
        "errors": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
        "field": {"type": "string", "description": "The input that was rejected, for local validation errors."},
    },
}


def error_response(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


LOCAL_RESPONSES: dict[str, Any] = {
    "400": error_response("Invalid input, refused before any upstream call; or the upstream's own 400."),
    "413": error_response("Request body too large."),
    "502": error_response("Upstream unreachable or answered unusably. Names the upstream host."),
    "504": error_response("Upstream did not answer in time."),
}


def operation(runtime: Runtime, binding: Binding, hooks: Mapping[str, OpenApiHooks]) -> dict[str, Any]:
    schema = runtime.input_schema(binding)
    parameters = []
    request_body = None
    for item in binding.inputs:
        item_schema = schema["properties"][item.name]
        if item.location == "body":
            request_body = {
                "required": item.required,
                "content": {"application/json": {"schema": item_schema}},
            }
            continue
        parameters.append(
            {
                "name": item.name,
                "in": item.location,
                "required": item.required or item.location == "path",
                "description": item_schema.get("description", ""),
                "schema": {k: v for k, v in item_schema.items() if k != "description"},
            }
        )
    responses: dict[str, Any] = {
        "200": {"description": "Upstream answer, mapped by the operation's outputParameters."},
        **LOCAL_RESPONSES,
    }
    hook = hooks.get(binding.target.consumes.namespace)
    if hook is not None:
        responses.update(hook.responses(binding) or {})
    result: dict[str, Any] = {
        "operationId": binding.name,
        "summary": binding.description,
        "parameters": parameters,
        "responses": dict(sorted(responses.items())),
    }
    if request_body:
        result["requestBody"] = request_body
    return result


def openapi_document(
    runtime: Runtime, bindings: list[Binding], hooks: Mapping[str, OpenApiHooks] | None = None
) -> dict[str, Any]:
    """`hooks` are keyed by the consumed namespace they describe."""
    hooks = hooks or {}
    paths: dict[str, dict[str, Any]] = {}
    for binding in bindings:
        paths.setdefault(binding.path, {})[binding.method.lower()] = operation(runtime, binding, hooks)
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for hook in hooks.values():
        schemas.update(hook.schemas())
    info = runtime.spec.info
    return {
        "openapi": "3.1.0",
        "info": {"title": info.label or "capability", "description": info.description, "version": __version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }
