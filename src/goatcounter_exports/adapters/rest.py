"""The REST adapter: one Starlette route per exposed operation, generated from the spec.

Upstream answers pass through faithfully (status, JSON error body, rate-limit
headers); non-JSON bodies are streamed in constant memory. An API's own module
can take over a route it knows better through `RestHooks` (GoatCounter's
download). Errors are mapped to a JSON body and a status here, once.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..errors import ApiError, GoatcounterExportsError, InputError, UpstreamError, http_status
from ..runtime import CallContext, Runtime
from ..spec.resolve import Binding
from ..upstream import NOT_JSON, UpstreamResponse, parse_json
from .openapi import BODY_METHODS, OpenApiHooks, openapi_document

log = logging.getLogger(__name__)

# A route handler given the request and its inputs, already validated by the runtime.
Handler = Callable[[Request, dict[str, Any]], Awaitable[Response]]


class RestHooks(Protocol):
    def handler(self, binding: Binding) -> Handler | None:
        """A handler for a route this API knows better than a pass-through, or None."""

    async def shape(self, binding: Binding, document: Any) -> tuple[Any, dict[str, str]]:
        """A passed-through JSON answer as clients should see it (fields dropped, a note added as a header)."""


PASSTHROUGH_HEADERS = (
    "Retry-After",
    "X-Rate-Limit-Limit",
    "X-Rate-Limit-Remaining",
    "X-Rate-Limit-Reset",
    "Content-Disposition",
    "Last-Modified",
    "ETag",
    "Idempotent-Replayed",
)


def error_response(
    status: int, message: str, *, headers: dict[str, str] | None = None, field: str | None = None
) -> JSONResponse:
    content = {"error": message, **({"field": field} if field else {})}
    return JSONResponse(content, status_code=status, headers=headers)


async def read_json_body(request: Request, limit: int) -> Any:
    """The request body as JSON, or None when empty. Refuses oversized and malformed bodies."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body is larger than {limit} bytes")
    if not body.strip():
        return None
    try:
        value = json.loads(body)
    except ValueError:
        raise InputError("request body is not valid JSON", field="body") from None
    except RecursionError:
        raise InputError("request body nests too deeply", field="body") from None
    if value is None:  # `null` is a body, and not an object: never mistaken for no body (which may be allowed)
        raise InputError("request body is `null`; send a JSON object, or no body", field="body")
    return value


def passthrough_headers(response: UpstreamResponse) -> dict[str, str]:
    return {name: response.headers[name] for name in PASSTHROUGH_HEADERS if name in response.headers}


def error_for(exc: GoatcounterExportsError) -> JSONResponse:
    """The one mapping of our errors to a REST answer: a JSON body, and the status of `http_status`."""
    headers = {}
    if isinstance(exc, ApiError) and exc.retry_after is not None:
        headers["Retry-After"] = str(round(exc.retry_after))
    message = exc.message if isinstance(exc, ApiError) else str(exc)
    return error_response(http_status(exc), message, headers=headers, field=getattr(exc, "field", None))


async def read_inputs(request: Request, binding: Binding, max_body_bytes: int) -> dict[str, Any]:
    """The binding's inputs as they arrived: path, query and header values as text, the body as JSON."""
    raw: dict[str, Any] = {}
    for item in binding.inputs:
        if item.location == "path" and item.name in request.path_params:
            raw[item.name] = request.path_params[item.name]
        elif item.location == "query" and item.name in request.query_params:
            raw[item.name] = request.query_params[item.name]
        elif item.location == "header" and item.name in request.headers:
            raw[item.name] = request.headers[item.name]
        elif item.location == "body":
            value = await read_json_body(request, max_body_bytes)
            if value is not None:
                raw[item.name] = value
    return raw


async def forward(
    request: Request,
    runtime: Runtime,
    binding: Binding,
    inputs: dict[str, Any],
    stack: AsyncExitStack,
    hook: RestHooks | None,
) -> Response:
    """Turn the upstream answer into ours. Takes ownership of `stack` (closes it when done)."""
    context = CallContext(idempotency_key=request.headers.get("idempotency-key"))
    response = await stack.enter_async_context(runtime.send(binding, inputs, context))
    headers = passthrough_headers(response)
    success = 200 <= response.status < 300
    if response.is_textual or not success:
        body = await response.read()
        document = parse_json(body)
        if document is not NOT_JSON:
            content = runtime.map_output(binding.outputs, document) if success else document
            if success and hook is not None:
                content, extra = await hook.shape(binding, content)
                headers.update(extra)
            return JSONResponse(content, response.status, headers)
        if success:
            return Response(body, response.status, headers, media_type=response.content_type or None)
        # An HTML error page (GoatCounter's 404) is no use to an API client: say what happened in JSON.
        message = f"upstream {response.host} answered {response.status} {response.reason}".rstrip()
        return error_response(response.status, message, headers=headers)
    media_type = response.content_type or "application/octet-stream"
    if "Content-Length" in response.headers:
        headers["Content-Length"] = response.headers["Content-Length"]
    if media_type.startswith("text/") and "charset" not in media_type:
        media_type += "; charset=utf-8"
    return streaming(response.chunks(), response.status, headers, media_type, stack)


def streaming(
    chunks: AsyncIterator[bytes], status: int, headers: dict[str, str], media_type: str, stack: AsyncExitStack
) -> StreamingResponse:
    """A streamed answer that closes `stack` (the upstream response) when the body ends or fails."""

    async def body_then_close() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await stack.aclose()

    return StreamingResponse(body_then_close(), status, headers, media_type=media_type)


def endpoint(
    runtime: Runtime, binding: Binding, hook: RestHooks | None, max_body_bytes: int
) -> Callable[[Request], Awaitable[Response]]:
    handler = hook.handler(binding) if hook is not None else None

    async def handle(request: Request) -> Response:
        stack = AsyncExitStack()
        streamed = False  # a streamed body closes the upstream response itself, when it ends
        try:
            # A body must say it is JSON: a form or text/plain POST is what another site's page can send
            # without asking (no CORS preflight), so it is refused before anything is read or spent.
            if request.method in BODY_METHODS and not is_json(request.headers.get("content-type", "")):
                return error_response(415, "send a JSON body with Content-Type: application/json")
            raw = await read_inputs(request, binding, max_body_bytes)
            inputs = runtime.validate(binding, raw, from_strings=True)
            if handler is not None:
                return await handler(request, inputs)
            response = await forward(request, runtime, binding, inputs, stack, hook)
            streamed = isinstance(response, StreamingResponse)
            return response
        except GoatcounterExportsError as exc:
            if isinstance(exc, UpstreamError):
                log.warning("%s %s: %s", request.method, request.url.path, exc)
            return error_for(exc)
        finally:
            if not streamed:
                await stack.aclose()

    return handle


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail, headers=dict(exc.headers or {}))  # 405 keeps its Allow


def is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def create_rest_app(
    runtime: Runtime,
    namespace: str | None = None,
    *,
    hooks: Mapping[str, RestHooks] | None = None,
    openapi_hooks: Mapping[str, OpenApiHooks] | None = None,
    max_body_bytes: int = 64 * 1024,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The ASGI app for one REST expose (the first one when `namespace` is None). Hooks are keyed by the
    consumed namespace whose routes they know."""
    hooks = hooks or {}
    exposes = runtime.spec.rest_exposes
    expose = next((e for e in exposes if namespace in (None, e.namespace)), None)
    bindings = runtime.bindings("rest", expose.namespace) if expose else []
    routes: list[BaseRoute] = []
    for binding in bindings:
        handle = endpoint(runtime, binding, hooks.get(binding.target.consumes.namespace), max_body_bytes)
        routes.append(Route(binding.path, handle, methods=[binding.method], name=binding.name))
    document = openapi_document(runtime, bindings, openapi_hooks)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def index(request: Request) -> Response:
        return HTMLResponse(index_page(document, bindings))

    async def docs(request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE)

    routes.append(Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False))
    routes.append(Route("/", index, methods=["GET"], include_in_schema=False))
    routes.append(Route("/docs", docs, methods=["GET"], include_in_schema=False))
    routes.extend(extra_routes)
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def index_page(document: dict[str, Any], bindings: Sequence[Binding]) -> str:
    """The root: what this is, its routes, and where the machine-readable and interactive docs are."""
    title = html.escape(str(document["info"]["title"]))
    items = "".join(
        f"<li><code>{html.escape(b.method)} {html.escape(b.path)}</code> {html.escape(b.description)}</li>"
        for b in bindings
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title></head><body>"
        f"<h1>{title}</h1><ul>{items}</ul>"
        '<p><a href="/openapi.json">OpenAPI document</a> &middot; <a href="/docs">interactive docs</a> &middot; '
        '<a href="/healthz">health</a> &middot; <a href="/readyz">readiness</a> &middot; '
        '<a href="/metrics">metrics</a></p></body></html>'
    )


# Swagger UI, from its CDN: the page needs the network in the browser, never on the server.
DOCS_PAGE = """<!doctype html><html><head><meta charset=utf-8><title>API docs</title>
<link rel=stylesheet href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id=ui></div><script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"})</script>
<noscript>See <a href="/openapi.json">/openapi.json</a>.</noscript></body></html>"""
