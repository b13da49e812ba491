"""The REST adapter: one Starlette route per exposed operation, generated from the spec.

Upstream answers pass through faithfully (status, JSON error body, rate-limit
headers). Non-JSON bodies are streamed in constant memory; a gzip body is
decompressed on the fly for a client that asks for `text/csv`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ConfigError, InputError, UpstreamError
from ..gzipstream import gunzip
from ..runtime import CallContext, Runtime
from ..spec.resolve import Binding
from ..upstream import NOT_JSON, UpstreamResponse, parse_json
from .openapi import openapi_document

log = logging.getLogger(__name__)

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
GZIP_TYPES = ("application/gzip", "application/x-gzip")


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
        return json.loads(body)
    except ValueError:
        raise InputError("request body is not valid JSON", field="body") from None


def wants_csv(accept: str) -> bool:
    """True when the client prefers text/csv over the gzip file (RFC 9110 q-values)."""
    quality: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    csv = quality.get("text/csv", 0.0)
    gzip = max(quality.get("application/gzip", 0.0), quality.get("*/*", 0.0), quality.get("application/*", 0.0))
    return csv > 0 and csv >= gzip


def passthrough_headers(response: UpstreamResponse) -> dict[str, str]:
    return {name: response.headers[name] for name in PASSTHROUGH_HEADERS if name in response.headers}


async def forward(request: Request, runtime: Runtime, binding: Binding, stack: AsyncExitStack) -> Response:
    """Turn the upstream answer into ours. Takes ownership of `stack` (closes it when done)."""
    raw: dict[str, Any] = {}
    for item in binding.inputs:
        if item.location == "path" and item.name in request.path_params:
            raw[item.name] = request.path_params[item.name]
        elif item.location == "query" and item.name in request.query_params:
            raw[item.name] = request.query_params[item.name]
        elif item.location == "header" and item.name in request.headers:
            raw[item.name] = request.headers[item.name]
        elif item.location == "body":
            value = await read_json_body(request, runtime.settings.max_body_bytes)
            if value is not None:
                raw[item.name] = value
    context = CallContext(idempotency_key=request.headers.get("idempotency-key"))
    response = await stack.enter_async_context(runtime.call(binding, raw, from_strings=True, context=context))
    headers = passthrough_headers(response)
    success = 200 <= response.status < 300
    if response.is_textual or not success:
        body = await response.read()
        document = parse_json(body)
        if document is not NOT_JSON:
            content = runtime.map_output(binding.outputs, document) if success else document
            return JSONResponse(content, response.status, headers)
        if success:
            return Response(body, response.status, headers, media_type=response.content_type or None)
        # An HTML error page (GoatCounter's 404) is no use to an API client: say what happened in JSON.
        message = f"upstream {response.host} answered {response.status} {response.reason}".rstrip()
        return error_response(response.status, message, headers=headers)
    media_type = response.content_type or "application/octet-stream"
    chunks = response.chunks()
    if response.status == 200 and media_type in GZIP_TYPES and wants_csv(request.headers.get("accept", "")):
        chunks = gunzip(chunks)
        media_type = "text/csv"
        if "Content-Disposition" in headers:
            headers["Content-Disposition"] = headers["Content-Disposition"].replace(".csv.gz", ".csv")
    elif "Content-Length" in response.headers:
        headers["Content-Length"] = response.headers["Content-Length"]
    if media_type.startswith("text/") and "charset" not in media_type:
        media_type += "; charset=utf-8"

    async def body_then_close() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await stack.aclose()

    return StreamingResponse(body_then_close(), response.status, headers, media_type=media_type)


def endpoint(runtime: Runtime, binding: Binding) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        stack = AsyncExitStack()
        streaming = False  # a streamed body closes the upstream response itself, when it ends
        try:
            response = await forward(request, runtime, binding, stack)
            streaming = isinstance(response, StreamingResponse)
            return response
        except InputError as exc:
            return error_response(400, str(exc), field=exc.field)
        except UpstreamError as exc:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
            return error_response(exc.status_code, str(exc))
        except ConfigError as exc:
            return error_response(500, str(exc))
        finally:
            if not streaming:
                await stack.aclose()

    return handle


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail)


def create_rest_app(runtime: Runtime, namespace: str | None = None) -> Starlette:
    """The ASGI app for one REST expose (the first one when `namespace` is None)."""
    exposes = runtime.spec.rest_exposes
    expose = next((e for e in exposes if namespace in (None, e.namespace)), None)
    bindings = runtime.bindings("rest", expose.namespace) if expose else []
    routes = [Route(b.path, endpoint(runtime, b), methods=[b.method], name=b.name) for b in bindings]
    document = openapi_document(runtime, bindings)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes.append(Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False))
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
