"""Who may talk to an adapter: Host and Origin checks against DNS rebinding and cross-site pages, and
inbound authentication, for REST and MCP alike (ASGI middleware around either app).

- A request whose `Host` is not one this server answers to gets 421; one that carries an `Origin` of
  another site gets 403. No CORS headers are ever sent, so browsers keep other sites' pages out.
- With `InboundAuth`, every request but the metadata below must present the secret (a bearer token,
  or an API key in a header or the query), compared in constant time; otherwise 401 with a
  `WWW-Authenticate` header. For a bearer token that header names the Protected Resource Metadata
  (RFC 9728) served at `/.well-known/oauth-protected-resource`, as the MCP authorization spec asks,
  so clients that support it find out how to authenticate.

Secrets are never logged or echoed.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

METADATA_PATH = "/.well-known/oauth-protected-resource"


@dataclass(frozen=True)
class InboundAuth:
    """What a client must present: a bearer token, an API key (`name` in a header or the query), or a
    `user:password` pair (basic)."""

    kind: Literal["bearer", "apikey", "basic"]
    secret: str = field(repr=False)
    name: str = "X-Api-Key"
    placement: Literal["header", "query"] = "header"

    def accepts(self, headers: dict[str, str], query: str) -> bool:
        if self.kind in ("bearer", "basic"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == self.kind else ""
            if self.kind == "basic":
                try:
                    given = base64.b64decode(given, validate=True).decode()
                except (ValueError, UnicodeDecodeError):
                    given = ""
        elif self.placement == "query":
            given = dict(parse_qsl(query)).get(self.name, "")
        else:
            given = headers.get(self.name.lower(), "")
        return hmac.compare_digest(given.encode(), self.secret.encode())

    def challenge(self, metadata_url: str) -> str:
        if self.kind == "bearer":
            return f'Bearer realm="goatcounter-exports", resource_metadata="{metadata_url}"'
        if self.kind == "basic":
            return 'Basic realm="goatcounter-exports"'
        return f'ApiKey realm="goatcounter-exports", {self.placement}="{self.name}"'


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """`allowed` holds names with an optional `:*` for any port (the MCP SDK's form)."""
    for pattern in allowed:
        if pattern.endswith(":*") and host.rsplit(":", 1)[0] == pattern[:-2] and host != pattern[:-2]:
            return True
        if host == pattern:
            return True
    return False


class Guard:
    """ASGI middleware: Host and Origin first, then authentication; `resource` is the path clients use."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Sequence[str],
        auth: InboundAuth | None = None,
        resource: str = "/",
        public: Sequence[str] = (),
    ) -> None:
        """`public` paths need no authentication (health probes, the index): they show nothing secret."""
        self.app = app
        self.allowed_hosts = tuple(allowed_hosts)
        self.auth = auth
        self.resource = resource
        self.public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed_hosts):
            await _json(send, 421, {"error": "this server does not answer to that Host"})
            return
        origin = headers.get("origin")
        if origin is not None and not host_allowed(origin.split("://", 1)[-1], self.allowed_hosts):
            await _json(send, 403, {"error": "requests from other sites' pages are refused"})
            return
        path: str = scope.get("path", "")
        if path == METADATA_PATH or path.startswith(METADATA_PATH + "/"):
            await self._metadata(scope, host, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        if self.auth is not None and path not in self.public and not self.auth.accepts(headers, query):
            metadata = f"{_scheme(scope)}://{host}{METADATA_PATH}{self.resource.rstrip('/')}"
            challenge = self.auth.challenge(metadata)
            await _json(send, 401, {"error": "authentication required"}, [("www-authenticate", challenge)])
            return
        await self.app(scope, receive, send)

    async def _metadata(self, scope: Scope, host: str, send: Send) -> None:
        if scope.get("method") not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "method not allowed"}, [("allow", "GET, HEAD")])
            return
        document: dict[str, object] = {
            "resource": f"{_scheme(scope)}://{host}{self.resource}",
            "resource_name": "goatcounter-exports",
        }
        if self.auth is not None:
            document["bearer_methods_supported"] = ["header"] if self.auth.kind == "bearer" else []
        await _json(send, 200, document)


def _scheme(scope: Scope) -> str:
    return str(scope.get("scheme", "http"))


async def _json(send: Send, status: int, document: object, extra: Sequence[tuple[str, str]] = ()) -> None:
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode("latin-1")) for name, value in extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
