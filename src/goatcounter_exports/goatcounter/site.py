"""What the site itself can tell: whether it keeps individual pageviews, and why a CSV export is empty.

Since v2.6, GoatCounter keeps the pageviews a CSV export is made of only when the site's
*Settings → Data collection → Individual pageviews* is on (collect flag 256), and new sites
have it off: their CSV exports are empty while the dashboard, fed by aggregate tables, looks
full. A key with `site_read` can read that flag (`GET /api/v0/sites/{id}`, under GoatCounter's
spelling `setttings`), so it is read before an export that would come out empty spends the
hourly budget; with any other key, an empty CSV export is explained after the fact.

`GET /api/v0/me` tells the key's site. On GoatCounter main it also warms a key up: main
answers the first request of a key unused for a day with 404 (and still charges the rate
limit for it), so a create sent cold would spend the hour on that 404.
"""

from __future__ import annotations

from typing import Any

from ..errors import GoatcounterExportsError
from ..runtime import Runtime
from ..upstream import NOT_JSON

COLLECT_PAGEVIEWS = 256


def remedy(json_available: bool | None) -> str:
    if json_available:
        return (
            "Turn on Settings > Data collection > Individual pageviews in GoatCounter for CSV exports of the "
            "pageviews that follow, or use the JSON export (`--format json`: the aggregate statistics its "
            "dashboard shows, which this GoatCounter has)."
        )
    return (
        "Turn on Settings > Data collection > Individual pageviews in GoatCounter, then export again: the "
        "pageviews stored after that are exported."
    )


def empty_csv_note(json_available: bool | None) -> str:
    """Why a CSV export has no rows, and what to do."""
    return (
        "This CSV export has no pageviews. GoatCounter keeps individual pageviews only when the site's "
        "Individual pageviews setting is on (off by default for sites made since v2.6). " + remedy(json_available)
    )


def pageviews_off(json_available: bool | None) -> str:
    """Why a CSV export is refused before it is made."""
    return (
        "this site keeps no individual pageviews (its Individual pageviews setting is off), so a CSV export would "
        "be empty and still spend the hourly export budget. " + remedy(json_available)
    )


class SiteProbe:
    """Per upstream site (API URL): the key's site id, and whether the site keeps individual pageviews."""

    def __init__(self) -> None:
        self._me: dict[str, Any] = {}
        self._collects: dict[str, bool | None] = {}

    async def me(self, runtime: Runtime, namespace: str) -> Any:
        """`GET /api/v0/me` (any key may), asked once; a 404 is asked again (main's cold-key quirk)."""
        api_uri = runtime.base_uri(namespace)
        if api_uri not in self._me:
            document: Any = NOT_JSON
            for _ in range(2):
                status, document = await self._get(runtime, namespace, "/me")
                if status != 404:
                    break
            self._me[api_uri] = document if status == 200 else NOT_JSON
        return self._me[api_uri]

    async def collects_pageviews(self, runtime: Runtime, namespace: str) -> bool | None:
        """True/False when the key may read the site's settings; None when it cannot be told."""
        api_uri = runtime.base_uri(namespace)
        if api_uri not in self._collects:
            self._collects[api_uri] = await self._read_collect(runtime, namespace)
        return self._collects[api_uri]

    async def _read_collect(self, runtime: Runtime, namespace: str) -> bool | None:
        me = await self.me(runtime, namespace)
        if not isinstance(me, dict):
            return None
        sites = (me.get("token") or {}).get("sites") or []
        site_id = sites[0] if sites else (me.get("user") or {}).get("site")
        if not isinstance(site_id, int):
            return None
        status, site = await self._get(runtime, namespace, f"/sites/{site_id}")
        settings = site.get("setttings") or site.get("settings") if status == 200 and isinstance(site, dict) else None
        collect = settings.get("collect") if isinstance(settings, dict) else None
        return bool(collect & COLLECT_PAGEVIEWS) if isinstance(collect, int) else None

    async def _get(self, runtime: Runtime, namespace: str, path: str) -> tuple[int, Any]:
        request = runtime.request_to(namespace, "GET", path, {"Content-Type": "application/json"})
        try:
            return await runtime.client.fetch_json(request)
        except GoatcounterExportsError:
            return 0, NOT_JSON  # a probe that fails tells nothing; the real call will say what is wrong
