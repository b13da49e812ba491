"""GoatCounter's request path, plugged into the generic runtime as an `Extension`.

The composition root (app.py) attaches it to the consumed namespaces that are GoatCounter:
- export ids are positive int32s, and the create body has known fields, so bad
  input is refused before it can spend the hourly export budget;
- the create body differs between v2.7.0 (no `format` field allowed) and main
  (`format` required), so the server's style is learnt once (goatcounter.versions),
  at no cost to the export budget, before the first create;
- the hourly export budget is guarded, and so is main's hourly API budget (goatcounter.budget);
- on main, a key is warmed up before its first create (goatcounter.site).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from ..errors import GoatcounterExportsError, InputError
from ..runtime import CallContext, Runtime
from ..settings import check_url
from ..spec.models import Consumes
from ..spec.resolve import AdapterInput, Binding, Target
from ..upstream import UpstreamRequest, UpstreamResponse
from .budget import ExportBudget
from .exports import export_shape
from .site import SiteProbe
from .versions import API_PATH, CreateBodyStyle

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1  # GoatCounter's hit ids; beyond it a create is refused upstream, after being charged

CREATE_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Export request. Only start_from_hit_id is usually needed; format is set to suit the server.",
    "properties": {
        "start_from_hit_id": {
            "type": "integer",
            "minimum": 0,
            "maximum": INT64_MAX,
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
    """Whether a consumed API is GoatCounter: by its namespace, or by its host."""
    host = urlsplit(consumes.base_uri).hostname or ""
    return consumes.namespace.startswith("goatcounter") or host.endswith("goatcounter.com")


def site_api_url(site_url: str, variable: str = "GOATCOUNTER_URL") -> str:
    """`https://mysite.goatcounter.com` -> `https://mysite.goatcounter.com/api/v0`; a URL with a path is kept."""
    url = check_url(site_url, variable)
    return url if urlsplit(url).path not in ("", "/") else url + API_PATH


class GoatCounterProfile:
    def __init__(
        self,
        budget: ExportBudget | None = None,
        create_body: CreateBodyStyle | None = None,
        site: SiteProbe | None = None,
    ) -> None:
        self.create_body = create_body or CreateBodyStyle()
        self.budget = budget
        self.site = site or SiteProbe()

    def input_schema(self, binding: Binding, adapter_input: AdapterInput) -> dict[str, Any] | None:
        if adapter_input.feeds == "id" and adapter_input.type == "integer":
            return {"minimum": 1, "maximum": INT32_MAX, "description": "Export id, as returned by create."}
        if adapter_input.location == "body" and export_shape(binding.target) == "create":
            return CREATE_BODY_SCHEMA
        return None

    async def prepare(
        self, runtime: Runtime, target: Target, request: UpstreamRequest, context: CallContext
    ) -> UpstreamRequest | UpstreamResponse:
        # GoatCounter answers errors in JSON only to requests that say they are JSON, GETs included.
        headers = {**request.headers, "Content-Type": "application/json"}
        api_uri = runtime.base_uri(target.consumes.namespace)
        if export_shape(target) != "create":
            if self.budget is not None:
                answer = await self.budget.before_read(api_uri)
                if answer is not None:
                    return answer
            return replace(request, headers=headers)
        body = json.loads(request.body) if request.body else {}
        if self.budget is not None:
            answer = await self.budget.before_create(runtime, target, api_uri, body, context)
            if answer is not None:
                return answer
        try:
            version, takes_format = await self.create_body.learn(runtime.client.fetch_json, api_uri)
            body = adapt_create_body(body, version, takes_format)
            if takes_format:  # main: a cold key's first request is a 404 that still spends the hour; warm it
                await self.site.me(runtime, target.consumes.namespace)
        except GoatcounterExportsError:
            if self.budget is not None:  # nothing was sent: an Idempotency-Key it reserved is free again
                await self.budget.create_refused(api_uri, context)
            raise
        return replace(request, body=json.dumps(body, separators=(",", ":")).encode(), headers=headers)

    async def observe(
        self,
        runtime: Runtime,
        target: Target,
        request: UpstreamRequest,
        response: UpstreamResponse,
        context: CallContext,
    ) -> None:
        if self.budget is None:
            return
        if export_shape(target) == "create":
            await self.budget.after_create(runtime.base_uri(target.consumes.namespace), request, response, context)
        else:
            await self.budget.after_read(runtime.base_uri(target.consumes.namespace), response)

    async def failed(
        self,
        runtime: Runtime,
        target: Target,
        request: UpstreamRequest,
        error: GoatcounterExportsError,
        context: CallContext,
    ) -> None:
        if self.budget is not None and export_shape(target) == "create":
            await self.budget.create_failed(runtime.base_uri(target.consumes.namespace), error, context)


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
