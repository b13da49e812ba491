"""Running it as a service: health, readiness, Prometheus metrics, request ids and structured logs.

- `GET /healthz`: the process answers (liveness).
- `GET /readyz`: the upstream answers and accepts the key (a check the app supplies), cached for
  a few seconds so probes cost GoatCounter little; 503 with the reason when not.
- `GET /metrics`: Prometheus text format, from a registry of this app's own.
- Every answer carries `X-Request-Id` (the client's, when it sends a sane one); with
  `--log-format json` every request is logged as one JSON object with that id.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("goatcounter_exports.access")

READY_CACHE_SECONDS = 5.0
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ReadinessCheck = Callable[[], Awaitable[str | None]]  # None when ready, else why not


class Metrics:
    """The app's metrics, in a registry of its own (several apps can live in one process, as in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Awaited before each scrape: collectors that read state (a store that is awaited) read it here.
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []
        self.requests = Counter(
            "goatcounter_exports_requests", "Requests answered, by adapter, route and status.",
            ["adapter", "route", "method", "status"], registry=self.registry,
        )  # fmt: skip
        self.bytes_streamed = Counter(
            "goatcounter_exports_response_bytes", "Body bytes sent, by adapter and route.",
            ["adapter", "route"], registry=self.registry,
        )  # fmt: skip
        self.upstream_seconds = Histogram(
            "goatcounter_exports_upstream_seconds", "Time to the upstream's answer (headers), by operation.",
            ["operation", "status"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.exports_created = Counter(
            "goatcounter_exports_exports_created", "Exports GoatCounter created for this gateway.",
            registry=self.registry,
        )  # fmt: skip

    def observe_upstream(self, operation: str, status: int, seconds: float) -> None:
        self.upstream_seconds.labels(operation, str(status)).observe(seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The route template a request matched (`/v1/export/{id}`), so that labels stay few."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "other"))
    return "other"


class Observe:
    """ASGI middleware: request id, metrics and (at info level) one access log line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, adapter: str, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.adapter = adapter
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        route = route_of(self.routes, scope)
        started = time.monotonic()
        status = 500
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(self.adapter, route, scope["method"], str(status)).inc()
            self.metrics.bytes_streamed.labels(self.adapter, route).inc(sent)
            log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "request_id": request_id,
                    "adapter": self.adapter,
                    "route": route,
                    "status": status,
                    "bytes": sent,
                    "ms": round((time.monotonic() - started) * 1000, 1),
                },
            )


def ops_routes(metrics: Metrics, ready: ReadinessCheck) -> list[Route]:
    """/healthz, /readyz and /metrics (collectors in `metrics.registry` may read state at scrape time, in
    `metrics.before_scrape`)."""
    cache: dict[str, Any] = {"at": -READY_CACHE_SECONDS, "reason": None}

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        now = time.monotonic()
        if now - cache["at"] >= READY_CACHE_SECONDS:
            cache["reason"], cache["at"] = await ready(), now
        if cache["reason"] is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": cache["reason"]}, 503)

    async def prometheus(request: Request) -> Response:
        for refresh in metrics.before_scrape:
            await refresh()
        body = await run_in_threadpool(metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz, methods=["GET"], include_in_schema=False),
        Route("/readyz", readyz, methods=["GET"], include_in_schema=False),
        Route("/metrics", prometheus, methods=["GET"], include_in_schema=False),
    ]


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and whatever `extra` the call gave."""

    STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update({k: v for k, v in record.__dict__.items() if k not in self.STANDARD})
        if record.exc_info:
            document["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(document, default=str)


def configure_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
