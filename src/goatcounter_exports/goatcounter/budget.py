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
from typing import TYPE_CHECKING, Any

from ..runtime import Answered, CallContext
from ..spec.resolve import Target
from ..upstream import NOT_JSON, UpstreamRequest, UpstreamResponse, parse_json
from .state import RECENT_EXPORT_SECONDS, StateStore, budget_host

if TYPE_CHECKING:
    from ..runtime import Runtime


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def start_of(request: UpstreamRequest) -> int:
    body = json.loads(request.body) if request.body else {}
    return int(body.get("start_from_hit_id") or 0)


class ExportBudget:
    def __init__(self, state: StateStore, clock: Any = time.time) -> None:
        self.state = state
        self.clock = clock

    async def before_create(self, runtime: Runtime, target: Target, api_uri: str, context: CallContext) -> None:
        """Raise `Answered` for an idempotent replay or a spent budget; return to let the create go."""
        if context.idempotency_key:
            export_id = self.state.export_for_key(api_uri, context.idempotency_key)
            if export_id is not None:
                raise Answered(202, await self._current(runtime, target, export_id), {"Idempotent-Replayed": "true"})
        now = self.clock()
        budget = self.state.budget(api_uri)
        if budget is None or not budget.exhausted(now):
            return
        wait = budget.retry_after(now)
        recent = self.state.latest_export(api_uri, since=now - RECENT_EXPORT_SECONDS)
        document: dict[str, Any] = {
            "error": f"the export budget of {budget_host(api_uri)} is spent ({budget.limit} per window); "
            f"try again in {wait} seconds. Nothing was sent to GoatCounter."
        }
        if recent is not None:
            document["recent_export_id"] = recent.export_id
        headers = {"Retry-After": str(wait), "X-Rate-Limit-Remaining": "0", "X-Rate-Limit-Reset": str(wait)}
        if budget.limit is not None:
            headers["X-Rate-Limit-Limit"] = str(budget.limit)
        raise Answered(429, document, headers)

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
            self.state.save_budget(api_uri, limit, remaining, reset, now=self.clock())
        if response.status == 202:
            export = parse_json(await response.read())
            if export is not NOT_JSON and isinstance(export.get("id"), int):
                self.state.record_export(
                    api_uri, export["id"], start_of(request), context.idempotency_key, now=self.clock()
                )

    async def _current(self, runtime: Runtime, create: Target, export_id: int) -> Any:
        from .exports import find_ops, get_export

        try:
            return await get_export(runtime, find_ops(runtime, create.consumes.namespace), export_id)
        except Exception:  # the replay still names the export, even if GoatCounter cannot be asked now
            return {"id": export_id}
