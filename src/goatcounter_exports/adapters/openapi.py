"""The OpenAPI 3.1 document of the REST adapter, built from the same bindings it serves.

Its hooks (`OpenApiHooks`) let an API's own module describe what an operation does and the answers it really
gives. The document passes Spectral's `spectral:oas` ruleset with no error and no warning
(tests/test_spectral.py): a server (this one, relative), a contact, and every operation with a description and a
tag (the consumed API it calls, each tag declared once at the top).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .. import __version__
from ..runtime import Runtime
from ..spec.resolve import Binding


class OpenApiHooks(Protocol):
    def description(self, binding: Binding) -> str | None:
        """What the operation does, for people and agents reading the document (None: the generic sentence)."""

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


# Who answers for this API: the service serving it (a capability document names no maintainer we read).
CONTACT = {"name": "goatcounter-exports"}
LOCAL_RESPONSES: dict[str, Any] = {
    "400": error_response("Invalid input, refused before any upstream call; or the upstream's own 400."),
    "413": error_response("Request body too large."),
    "502": error_response("Upstream unreachable or answered unusably. Names the upstream host."),
    "504": error_response("Upstream did not answer in time."),
}
# Methods whose request must say it is JSON (`Content-Type: application/json`), even with no body: the REST
# adapter refuses anything else with 415, because a form or text POST is what another site's page can send
# without a CORS preflight.
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
NOT_JSON = error_response("The request did not say `Content-Type: application/json` (required even with no body).")


def generic_description(binding: Binding) -> str:
    target = binding.target
    summary = binding.description.rstrip(".") or binding.name
    return f"{summary}: calls `{target.method} {target.path}` of `{target.consumes.namespace}` and answers as it does."


def tag(binding: Binding) -> str:
    """An operation's tag: the consumed API it calls."""
    return binding.target.consumes.namespace


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
    if binding.method.upper() in BODY_METHODS:
        responses["415"] = NOT_JSON
    hook = hooks.get(binding.target.consumes.namespace)
    if hook is not None:
        responses.update(hook.responses(binding) or {})
    result: dict[str, Any] = {
        "operationId": binding.name,
        "summary": binding.description,
        "description": (hook.description(binding) if hook is not None else None) or generic_description(binding),
        "tags": [tag(binding)],
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
    operation_ids: set[str] = set()
    tags: dict[str, dict[str, str]] = {}
    for binding in bindings:
        entry = operation(runtime, binding, hooks)
        base, number = entry["operationId"], 1
        while entry["operationId"] in operation_ids:  # unique, as OpenAPI requires, across several resources
            number += 1
            entry["operationId"] = f"{base}-{number}"
        operation_ids.add(entry["operationId"])
        consumes = binding.target.consumes
        tags.setdefault(tag(binding), {"name": tag(binding), "description": consumes.description or consumes.base_uri})
        paths.setdefault(binding.path, {})[binding.method.lower()] = entry
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for hook in hooks.values():
        schemas.update(hook.schemas())
    info = runtime.spec.info
    return {
        "openapi": "3.1.0",
        "info": {
            "title": info.label or "capability",
            "description": info.description or "A capability served as a REST API.",
            "version": __version__,
            "contact": CONTACT,
        },
        # Relative: the host and port that serve this document (the adapter binds whatever it is told to).
        "servers": [{"url": "/", "description": "This service: the REST adapter that serves this document."}],
        "tags": sorted(tags.values(), key=lambda t: t["name"]),
        "paths": paths,
        "components": {"schemas": schemas},
    }
