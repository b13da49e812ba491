"""The hourly export budget, guarded: never spend a create that GoatCounter would refuse.

GoatCounter takes the export token before it even checks the key, so a refused
POST costs as much as a good one. The real budget is learnt from the
`X-Rate-Limit-*` headers of each create (self-hosted servers set their own), and
while it is spent a create is answered here: 429, `Retry-After`, and the id of
the export this installation made most recently. An `Idempotency-Key` replays
the export it first created instead of making a second one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..errors import (
    ApiError,
    GoatcounterExportsError,
    StateError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..runtime import CallContext, Runtime
from ..spec.resolve import Target
from ..upstream import NOT_JSON, UpstreamRequest, UpstreamResponse, parse_json
from .exports import Export, ExportOps, request_key
from .store import RECENT_EXPORT_SECONDS, Budget, Store, budget_host


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


SLOT_WAIT_SECONDS = 50.0  # how long a create waits for another process's create to be answered
SLOT_POLL_SECONDS = 0.2
IN_FLIGHT_SECONDS = 45.0  # an Idempotency-Key reserved this recently may still be on its way: 409
PROBES = 5  # the newest export ids checked for the one an unanswered create made
MAX_PROBES = 40  # export reads spent looking for it, at most
log = logging.getLogger(__name__)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def key_of(request: UpstreamRequest) -> str:
    return request_key(json.loads(request.body) if request.body else {})


LONG_WAIT = 60  # seconds: a Retry-After this long on a read is an hourly budget (main's api2), not 4/s


class ExportBudget:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def before_create(
        self, runtime: Runtime, target: Target, api_uri: str, body: dict[str, Any], context: CallContext
    ) -> UpstreamResponse | None:
        """An answer made here (an idempotent replay or refusal, a spent budget); None lets the create go."""
        await self.store.check_writable()  # a create we could not record would spend the budget blind
        host = target_host(api_uri)
        key = context.idempotency_key
        if key:
            reservation = await self.store.reserve(api_uri, key, request_key(body), IN_FLIGHT_SECONDS, self.clock())
            if reservation.state == "mismatch":
                message = "this Idempotency-Key was first used with another request; use a new key for this one"
                return UpstreamResponse.local(422, {"error": message}, {}, host)
            if reservation.state == "in_flight":
                message = "a request with this Idempotency-Key is being sent; ask again in a moment"
                return UpstreamResponse.local(409, {"error": message}, {"Retry-After": "1"}, host)
            export_id = reservation.export_id
            if reservation.state == "unknown":  # an earlier try got no answer: did it create the export?
                export_id = await self._find(runtime, target, api_uri, body, (reservation.started_at or 0) - 5)
                if export_id is not None:
                    await self.store.settle(api_uri, key, export_id)
            if export_id is not None:
                current = await self._current(runtime, target, export_id)
                return UpstreamResponse.local(202, current, {"Idempotent-Replayed": "true"}, host)
        refused = await self._take_slot(api_uri)
        if refused is not None and key:
            await self.store.settle(api_uri, key, None)
        return refused

    async def _take_slot(self, api_uri: str) -> UpstreamResponse | None:
        """The host's create slot, taken (None: send the create); else the answer to give. While another
        process's create is on its way (the slot is busy), wait for its answer: the budget it learns decides."""
        deadline = time.monotonic() + SLOT_WAIT_SECONDS
        slot = await self.store.take_create_slot(api_uri, IN_FLIGHT_SECONDS, self.clock())
        while slot.state == "busy" and time.monotonic() < deadline:
            await asyncio.sleep(SLOT_POLL_SECONDS)
            slot = await self.store.take_create_slot(api_uri, IN_FLIGHT_SECONDS, self.clock())
        if slot.state == "go":
            return None
        if slot.state == "busy":
            message = "another process's export of this host is on its way; ask again in a moment"
            return UpstreamResponse.local(429, {"error": message}, {"Retry-After": "2"}, target_host(api_uri))
        assert slot.budget is not None
        return await self._spent(api_uri, slot.budget)

    async def _spent(self, api_uri: str, budget: Budget) -> UpstreamResponse:
        now = self.clock()
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
        """Learn the budget from the answer, and remember the export. A state store that cannot be written
        must not lose the export GoatCounter made (and charged for): the caller still gets it."""
        try:
            await self._record(api_uri, request, response, context)
            await self.store.free_create_slot(api_uri)
        except StateError as exc:
            log.warning("export created, but not recorded in the state store: %s", exc)

    async def _record(
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
        export = parse_json(await response.read()) if response.status == 202 else NOT_JSON
        export_id = export.get("id") if isinstance(export, dict) else None
        if isinstance(export_id, int):
            await self.store.record_export(api_uri, export_id, key_of(request), context.idempotency_key, self.clock())
        if context.idempotency_key:
            await self.store.settle(api_uri, context.idempotency_key, export_id if isinstance(export_id, int) else None)

    async def create_refused(self, api_uri: str, context: CallContext) -> None:
        """The create was refused before it was sent: its Idempotency-Key and the create slot are free again."""
        if context.idempotency_key:
            await self.store.settle(api_uri, context.idempotency_key, None)
        await self.store.free_create_slot(api_uri)

    async def create_failed(self, api_uri: str, error: GoatcounterExportsError, context: CallContext) -> None:
        """No answer to a create: after a timeout or a connection lost mid-way GoatCounter may have made the
        export, so a retry with the same Idempotency-Key looks for it before creating again; when the connection
        was never made, the key is free again."""
        if context.idempotency_key:
            sent = UpstreamTimeout | UpstreamProtocolError | UpstreamDisconnected
            unknown = isinstance(error, sent)  # sent, perhaps done
            await self.store.settle(api_uri, context.idempotency_key, None, unknown=unknown)
        await self.store.free_create_slot(api_uri)  # the budget stays counted down: a sent POST spends it

    async def _find(
        self, runtime: Runtime, target: Target, api_uri: str, body: dict[str, Any], since: float
    ) -> int | None:
        """The export an unanswered create made, if it did. GoatCounter numbers exports in order and never
        deletes one, so this site's newest export is found by galloping up from the newest id recorded here (a
        new state store records none) to the first id that is not there, then bisecting; the few ids below it
        are then checked for one of this request made since the try. Bounded by MAX_PROBES reads. Exact when the
        site's exports are numbered without gaps (a GoatCounter of its own); on a shared instance another site's
        exports look missing and it may stop early, and the hourly create budget is what refuses a second one."""
        get = ExportOps.find(runtime, target.consumes.namespace).get
        seen: dict[int, Export | None] = {}

        async def look(export_id: int) -> Export | None:
            if export_id not in seen and len(seen) < MAX_PROBES:
                try:
                    async with runtime.call_target(get, ExportOps.id_values(get, export_id)) as response:
                        document = await response.document()
                    seen[export_id] = Export.parse(document) if isinstance(document, dict) else None
                except ApiError:
                    seen[export_id] = None  # another site's export, or none yet
            return seen.get(export_id)

        present = await self.store.max_export_id(api_uri)  # 0: nothing recorded, ids start at 1
        step, absent = 1, None
        while absent is None and len(seen) < MAX_PROBES:
            if await look(present + step) is None:
                absent = present + step
            else:
                present, step = present + step, step * 2
        while absent is not None and absent - present > 1 and len(seen) < MAX_PROBES:
            middle = (present + absent) // 2
            present, absent = (middle, absent) if await look(middle) is not None else (present, middle)
        wanted = request_key(body)
        for export_id in range(present, max(present - PROBES, 0), -1):
            made = await look(export_id)
            created = made.document.get("created_at") if made is not None else None
            if made is not None and request_key(made.document) == wanted and created and _epoch(str(created)) >= since:
                return made.id
        return None

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
