"""`goatcounter-exports doctor`: is everything in place, and if not, what to do. Never spends the export budget.

Checks, in order, each a pass, a fail (with the fix) or an unknown (what it would take to tell):
configuration, upstream reachable, version (and whether it has JSON exports), key accepted, key has
`export`, Individual pageviews, export budget left, ports free. `serve` runs the cheap ones at start.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .app import App
from .errors import GoatcounterExportsError
from .goatcounter.profile import INT32_MAX
from .goatcounter.versions import site_root
from .upstream import NOT_JSON, UpstreamRequest

Outcome = bool | None  # pass, fail, or cannot tell


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "?   "}[self.outcome]
        return f"{mark} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix and self.outcome is False else "")


async def checks(app: App, *, ports: bool = True, cheap: bool = False) -> list[Check]:
    """Every check, or (`cheap`) only those that ask GoatCounter nothing but its status and the key."""
    found: list[Check] = []
    if not app.goatcounter:
        return [Check("configuration", None, "the capability consumes no GoatCounter API: nothing to check")]
    parts = next(iter(app.goatcounter.values()))
    runtime, namespace = app.runtime, parts.namespace
    api_uri = runtime.base_uri(namespace)
    found.append(Check("configuration", True, f"site {site_root(api_uri)}, key from the environment"))

    def get(path: str) -> Callable[[], Awaitable[tuple[int, object]]]:
        async def fetch() -> tuple[int, object]:
            request = runtime.request_to(namespace, "GET", path, {"Content-Type": "application/json"})
            return await runtime.client.fetch_json(request)

        return fetch

    try:
        status, document = await runtime.client.fetch_json(UpstreamRequest("GET", site_root(api_uri) + "/status"))
    except GoatcounterExportsError as exc:
        found.append(Check("upstream reachable", False, str(exc), "check GOATCOUNTER_URL and your network"))
        return found
    if status != 200 or document is NOT_JSON or not isinstance(document, dict):
        fix = "GOATCOUNTER_URL should be the site's address, e.g. https://mysite.goatcounter.com, without a path"
        found.append(Check("upstream reachable", False, f"GET /status answered {status}, not GoatCounter's", fix))
        return found
    found.append(Check("upstream reachable", True, f"{site_root(api_uri)} answers"))
    json_available = await parts.job().json_available()
    what = "has JSON exports (aggregate statistics)" if json_available else "makes CSV exports only"
    found.append(Check("version", True, f"GoatCounter {document.get('version')}: {what}"))
    status, _ = await get("/me")()
    if status == 404:  # main answers a key's first request of the day with 404: ask again
        status, _ = await get("/me")()
    if status in (401, 403) or status != 200:
        fix = "create a key in GoatCounter (Settings > API) and set GOATCOUNTER_API_KEY"
        found.append(Check("key accepted", False, f"GoatCounter answered {status} to GET /api/v0/me", fix))
        return found
    found.append(Check("key accepted", True, "GoatCounter knows the key"))
    status, _ = await get(f"/export/{INT32_MAX}")()  # an id no export has: 404 with the permission, 403 without
    if status == 403:
        fix = "give the key the 'export' permission (Settings > API in GoatCounter)"
        found.append(Check("key may export", False, "the key lacks the 'export' permission", fix))
    else:
        found.append(Check("key may export", status == 404, f"GET of an unknown export answered {status}"))
    if cheap:
        return found
    collects = await parts.site.collects_pageviews(runtime, namespace)
    if collects is None:
        detail = "cannot tell: the key lacks the 'site_read' permission"
        found.append(Check("individual pageviews", None, detail))
    elif collects:
        found.append(Check("individual pageviews", True, "on: CSV exports hold every pageview"))
    elif json_available:
        found.append(Check("individual pageviews", True, "off: CSV exports are empty; `sync` uses the JSON export"))
    else:
        fix = "turn on Settings > Data collection > Individual pageviews in GoatCounter"
        found.append(Check("individual pageviews", False, "off: CSV exports are empty", fix))
    budget = await app.store.budget(api_uri)
    if budget is None:
        found.append(Check("export budget", None, "not known until the first export (GoatCounter allows 1 an hour)"))
    elif budget.exhausted(time.time()):
        wait = budget.retry_after(time.time())
        found.append(Check("export budget", False, f"spent; full again in {wait} s", "wait, or reuse a recent export"))
    else:
        found.append(Check("export budget", True, f"{budget.remaining} left of {budget.limit} this window"))
    if ports:
        found.extend(port_checks(app))
    return found


def port_checks(app: App) -> list[Check]:
    """Can REST and MCP listen where they are told to? (Port 0 always can.)"""
    found = []
    for listener in app.listeners():
        family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((listener.host, listener.port))
            except OSError as exc:
                flag = "--rest-port" if listener.name == "REST" else "--mcp-port"
                fix = f"stop what uses it, or choose another port with {flag} (0: any free port)"
                found.append(
                    Check(f"{listener.name} port", False, f"{listener.host}:{listener.port}: {exc.strerror}", fix)
                )
                continue
        found.append(Check(f"{listener.name} port", True, f"{listener.host}:{listener.port} is free"))
    return found
