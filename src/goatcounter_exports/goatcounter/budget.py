"""The hourly export budget, guarded: never spend a create that GoatCounter would refuse.

GoatCounter takes the export token before it even checks the key, so a refused
POST costs as much as a good one. The real budget is learnt from the
`X-Rate-Limit-*` headers of each create (self-hosted servers set their own), and
while it is spent a create is answered here: 429, `Retry-After`, and the id of
the export this installation made most recently. An `Idempotency-Key` replays
the export it first created instead of making a second one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from ..errors import GoatcounterExportsError
from ..runtime import CallContext, Runtime
from ..spec.resolve import Target
from ..upstream import NOT_JSON, UpstreamRequest, UpstreamResponse, parse_json
from .exports import ExportOps, request_key
from .store import RECENT_EXPORT_SECONDS, StateStore, budget_host


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def key_of(request: UpstreamRequest) -> str:
    return request_key(json.loads(request.body) if request.body else {})


LONG_WAIT = 60  # seconds: a Retry-After this long on a read is an hourly budget (main's api2), not 4/s


class ExportBudget:
    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def before_create(
        self, runtime: Runtime, target: Target, api_uri: str, context: CallContext
    ) -> UpstreamResponse | None:
        """An answer made here for an idempotent replay or a spent budget; None lets the create go."""
        if context.idempotency_key:
            export_id = await self.store.export_for_key(api_uri, context.idempotency_key)
            if export_id is not None:
                current = await self._current(runtime, target, export_id)
                return UpstreamResponse.local(202, current, {"Idempotent-Replayed": "true"}, target_host(api_uri))
        now = self.clock()
        budget = await self.store.budget(api_uri)
        if budget is None or not budget.exhausted(now):
            return None
        wait = budget.retry_after(now)
        recent = await self.store.latest_export(api_uri, since=now - RECENT_EXPORT_SECONDS)
        document: dict[str, Any] = {
            "error": f"the export budget of {budget_host(api_uri)} is spent ({budget.limit} per window); "
            f"try again in {wait} seconds. Nothing was sent to GoatCounter."
        }
        if recent is not None:
            document["recent_export_id"] = recent
        headers = {"Retry-After": str(wait), "X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Reset": str(wait)}
        if budget.limit is not None:
            headers["X-Rate-Limit-Limit"] = str(budget.limit)
        return UpstreamResponse.local(429, document, headers, target_host(api_uri))

    async def after_create(
        self, api_uri: str, request: UpstreamRequest, response: UpstreamResponse, context: CallContext
    ) -> None:
        headers = response.headers
        limit = _int(headers.get("X-Rate-Limit-Limit"))
        remaining = _int(headers.get("X-Rate-Limit-Remaining"))
        reset = _int(headers.get("X-Rate-Limit-Reset"))
        if response.status == 429:
            remaining, reset = 0, _int(headers.get("Retry-After")) or reset
        if remaining is not None and reset is not None:
            await self.store.save_budget(api_uri, limit, remaining, reset, now=self.clock())
        if response.status == 202:
            export = parse_json(await response.read())
            if export is not NOT_JSON and isinstance(export.get("id"), int):
                await self.store.record_export(
                    api_uri, export["id"], key_of(request), context.idempotency_key, now=self.clock()
                )

    async def before_read(self, api_uri: str) -> UpstreamResponse | None:
        """A local 429 while GoatCounter's hourly API budget (main's api2) is known to be spent."""
        now = self.clock()
        budget = await self.store.budget(api_uri, "api")
        if budget is None or not budget.exhausted(now):
            return None
        wait = budget.retry_after(now)
        document = {
            "error": f"GoatCounter's hourly API budget for {budget_host(api_uri)} is spent ({budget.limit} an hour); "
            f"try again in {wait} seconds. Nothing was sent to GoatCounter."
        }
        headers = {"Retry-After": str(wait), "X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Reset": str(wait)}
        return UpstreamResponse.local(429, document, headers, target_host(api_uri))

    async def after_read(self, api_uri: str, response: UpstreamResponse) -> None:
        """Learn main's hourly API budget the only way it shows: a 429 with a long Retry-After."""
        wait = _int(response.headers.get("Retry-After"))
        if response.status == 429 and wait is not None and wait >= LONG_WAIT:
            limit = _int(response.headers.get("X-Rate-Limit-Limit"))
            await self.store.save_budget(api_uri, limit, 0, wait, now=self.clock(), scope="api")

    async def _current(self, runtime: Runtime, create: Target, export_id: int) -> Any:
        get = ExportOps.find(runtime, create.consumes.namespace).get
        try:
            async with runtime.call_target(get, ExportOps.id_values(get, export_id)) as response:
                return await response.document()
        except GoatcounterExportsError:  # the replay still names the export, even if GoatCounter cannot be asked now
            return {"id": export_id}


def target_host(api_uri: str) -> str:
    return UpstreamRequest("GET", api_uri).host
