"""GoatCounter knowledge plugged into the generic runtime as an `Extension`.

- `GOATCOUNTER_URL` names the site (`/api/v0` is appended when it has no path);
- export ids are positive int32s, and the create body has known fields, so bad
  input is refused before it can spend the hourly export budget;
- the create body differs between v2.7.0 (no `format` field allowed) and main
  (`format` required), so the server's style is learnt once (goatcounter.versions),
  at no cost to the export budget, before the first create.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ApiError, InputError
from ..outcome import ExtraTool, Outcome, ToolSchema
from ..settings import Settings, check_url
from ..spec.models import Consumes
from ..spec.resolve import AdapterInput, Binding, Target
from ..upstream import UpstreamRequest, UpstreamResponse

if TYPE_CHECKING:
    from ..runtime import CallContext, Runtime

from . import tools
from .budget import ExportBudget
from .exports import export_shape
from .state import StateStore
from .versions import API_PATH, CreateBodyStyle

INT32_MAX = 2**31 - 1
STATE_FILE = "state.sqlite3"
SITE_URL_VARIABLE = "GOATCOUNTER_URL"

CREATE_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Export request. Only start_from_hit_id is usually needed; format is set to suit the server.",
    "properties": {
        "start_from_hit_id": {
            "type": "integer",
            "minimum": 0,
            "description": "Export only pageviews with a hit id greater than this (exclusive); "
            "pass the previous export's last_hit_id for an incremental export.",
        },
        "format": {
            "type": "string",
            "enum": ["csv", "json"],
            "description": "csv (default). json (a ZIP) exists only on GoatCounter newer than v2.7.0.",
        },
        "start_from_day": {
            "type": "string",
            "format": "date-time",
            "description": "json format only: first day to export (RFC 3339).",
        },
    },
    "additionalProperties": False,
}


def is_goatcounter(consumes: Consumes) -> bool:
    host = urlsplit(consumes.base_uri).hostname or ""
    return consumes.namespace.startswith("goatcounter") or host.endswith("goatcounter.com")


def is_create_export(target: Target) -> bool:
    return export_shape(target) == "create"


def site_api_url(site_url: str, variable: str = SITE_URL_VARIABLE) -> str:
    """`https://mysite.goatcounter.com` -> `https://mysite.goatcounter.com/api/v0`; a URL with a path is kept."""
    url = check_url(site_url, variable)
    return url if urlsplit(url).path not in ("", "/") else url + API_PATH


class GoatCounterProfile:
    def __init__(self, state: StateStore | None = None) -> None:
        self.create_body = CreateBodyStyle()
        self.budget = ExportBudget(state) if state is not None else None

    @classmethod
    def for_settings(cls, settings: Settings) -> GoatCounterProfile:
        return cls(StateStore(settings.state_dir / STATE_FILE))

    def base_uri(self, consumes: Consumes, settings: Settings) -> str | None:
        if not is_goatcounter(consumes) or settings.base_uri_override(consumes.namespace):
            return None
        site = settings.environ.get(SITE_URL_VARIABLE)
        return site_api_url(site) if site else None

    def input_schema(self, binding: Binding, adapter_input: AdapterInput) -> dict[str, Any] | None:
        if not is_goatcounter(binding.target.consumes):
            return None
        if adapter_input.feeds == "id" and adapter_input.type == "integer":
            return {"minimum": 1, "maximum": INT32_MAX, "description": "Export id, as returned by create."}
        if adapter_input.location == "body" and is_create_export(binding.target):
            return CREATE_BODY_SCHEMA
        return None

    async def prepare(
        self, runtime: Runtime, target: Target, request: UpstreamRequest, context: CallContext
    ) -> UpstreamRequest:
        if not is_goatcounter(target.consumes):
            return request
        # GoatCounter answers errors in JSON only to requests that say they are JSON, GETs included.
        headers = {**request.headers, "Content-Type": "application/json"}
        if not is_create_export(target):
            return replace(request, headers=headers)
        api_uri = runtime.base_uri(target.consumes.namespace)
        body = json.loads(request.body) if request.body else {}
        if self.budget is not None:
            await self.budget.before_create(runtime, target, api_uri, context)
        version, takes_format = await self.create_body.learn(runtime.client.fetch_json, api_uri)
        body = adapt_create_body(body, version, takes_format)
        return replace(request, body=json.dumps(body, separators=(",", ":")).encode(), headers=headers)

    async def observe(
        self,
        runtime: Runtime,
        target: Target,
        request: UpstreamRequest,
        response: UpstreamResponse,
        context: CallContext,
    ) -> None:
        if self.budget is not None and is_goatcounter(target.consumes) and is_create_export(target):
            await self.budget.after_create(runtime.base_uri(target.consumes.namespace), request, response, context)

    def openapi_responses(self, binding: Binding) -> dict[str, Any] | None:
        return openapi_responses(binding)

    def openapi_schemas(self) -> dict[str, Any]:
        return {"Export": EXPORT_SCHEMA}

    def tool_schema(self, binding: Binding) -> ToolSchema | None:
        if not is_goatcounter(binding.target.consumes):
            return None
        return tools.tool_schema(binding)

    async def run_tool(
        self, runtime: Runtime, binding: Binding, inputs: dict[str, Any], extras: dict[str, Any]
    ) -> Outcome | None:
        if not is_goatcounter(binding.target.consumes):
            return None
        return await tools.run_tool(runtime, binding, inputs, extras)

    def extra_tools(self, runtime: Runtime) -> list[ExtraTool]:
        if not any(is_goatcounter(c) for c in runtime.spec.capability.consumes):
            return []
        from .agent_tools import extra_tools

        return extra_tools(runtime, self.budget.state if self.budget else None)

    def explain_error(self, consumes: Consumes, error: ApiError) -> str | None:
        if not is_goatcounter(consumes):
            return None
        return tools.explain_error(error)


def adapt_create_body(body: dict[str, Any], version: str, takes_format: bool) -> dict[str, Any]:
    """Add or drop `format` to suit the server; refuse what this server would refuse (and charge for)."""
    body = dict(body)
    export_format = body.get("format") or "csv"
    if export_format == "json" and "start_from_hit_id" in body:
        raise InputError("start_from_hit_id only applies to csv exports", field="start_from_hit_id")
    if export_format == "csv" and "start_from_day" in body:
        raise InputError("start_from_day only applies to json exports", field="start_from_day")
    if takes_format:
        body["format"] = export_format
    else:
        if export_format != "csv":
            raise InputError(f"GoatCounter {version} makes only csv exports", field="format")
        body.pop("format", None)
    return body


def _json(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


EXPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A GoatCounter export.",
    "properties": {
        "id": {"type": "integer"},
        "site_id": {"type": "integer"},
        "format": {"type": "string", "description": "Only on GoatCounter newer than v2.7.0."},
        "start_from_hit_id": {"type": "integer"},
        "last_hit_id": {"type": ["integer", "null"], "description": "Cursor: start the next export from this."},
        "path": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time", "description": "null while running."},
        "num_rows": {"type": ["integer", "null"]},
        "size": {"type": ["string", "null"], "description": "Size in MB, as text."},
        "hash": {"type": ["string", "null"], "description": "SHA-256 of the gzip file."},
        "error": {"type": ["string", "null"], "description": "Set when the export failed."},
    },
}
ERROR_REF = "#/components/schemas/Error"
EXPORT_REF = "#/components/schemas/Export"
AUTH_RESPONSES = {
    "401": _json("Unknown or missing GoatCounter key.", ERROR_REF),
    "403": _json("The key lacks the export permission.", ERROR_REF),
    "429": _json("Rate limited; see Retry-After and X-Rate-Limit-* headers.", ERROR_REF),
}


def openapi_responses(binding: Binding) -> dict[str, Any] | None:
    target = binding.target
    if not is_goatcounter(target.consumes):
        return None
    if is_create_export(target):
        return {"202": _json("Export started.", EXPORT_REF), **AUTH_RESPONSES}
    if export_shape(target) == "download":
        return {
            "200": {
                "description": "The export file: gzip-compressed CSV, or plain CSV when Accept prefers text/csv.",
                "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                "content": {
                    "application/gzip": {"schema": {"type": "string", "contentMediaType": "application/gzip"}},
                    "text/csv": {"schema": {"type": "string"}},
                },
            },
            "202": _json("Still being generated: try again shortly.", ERROR_REF),
            "400": _json("Invalid id, or the file was deleted (exports are kept 24 hours).", ERROR_REF),
            "404": _json("No such export for this site.", ERROR_REF),
            **AUTH_RESPONSES,
        }
    return {"200": _json("The export.", EXPORT_REF), "404": _json("No such export.", ERROR_REF), **AUTH_RESPONSES}
