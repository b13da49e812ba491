"""`sync --all`: every site of the config file's `[[sites]]` into one database, each scoped by its URL.

Sites are synced one after the other, each with its own key (from the variable its entry names) and the
same state store, so the budgets they share are shared here too: GoatCounter counts one export an hour per
client IP, so on goatcounter.com a run may sync only some of the sites; the others are *deferred* to a
later run, which starts with them (the least recently synced first). One failing site does not stop the
others; each gets one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .app import build_app
from .errors import GoatcounterExportsError, RateLimited, exit_code
from .goatcounter.exports import Format
from .goatcounter.sync import sync
from .goatcounter.warehouse import Warehouse
from .progress import Progress, no_progress
from .settings import Settings, Site
from .spec import Spec


@dataclass(frozen=True)
class SiteOutcome:
    site: Site
    line: str
    exit_code: int  # 0: synced; deferred sites count as 0 too (their turn comes)
    deferred: bool = False


def order(sites: tuple[Site, ...], last_synced: Callable[[str], str | None]) -> list[Site]:
    """Never synced first, then the least recently synced: deferred sites get their turn."""
    return sorted(sites, key=lambda site: (last_synced(site.url) or "", sites.index(site)))


async def sync_all(
    spec: Spec,
    settings: Settings,
    warehouse: Warehouse,
    *,
    export_format: Format | None,
    wait_seconds: float,
    progress: Progress = no_progress,
) -> list[SiteOutcome]:
    outcomes = []
    for site in order(settings.sites, warehouse.last_synced):
        key = settings.site_keys.get(site.name)
        if key is None:
            line = f"{site.name}: FAILED: {site.key_variable}, which holds its key, is not set"
            outcomes.append(SiteOutcome(site, line, 2))
            continue
        secrets = {name: key for name in spec.bound_variables}
        site_settings = replace(settings.with_site(site.url, secrets), sites=(), site_keys={})
        try:
            app = build_app(spec, site_settings)
            async with app:
                job = app.export_job(progress)
                result = await sync(job, warehouse, export_format=export_format, wait_seconds=wait_seconds)
        except RateLimited as exc:
            wait = f"; its turn comes in {exc.retry_after:.0f} s" if exc.retry_after else ""
            outcomes.append(SiteOutcome(site, f"{site.name}: deferred: {exc.message}{wait}", 0, deferred=True))
            continue
        except GoatcounterExportsError as exc:
            outcomes.append(SiteOutcome(site, f"{site.name}: FAILED: {exc}", exit_code(exc)))
            continue
        outcomes.append(SiteOutcome(site, f"{site.name}: {result.line(warehouse.name)}", 0))
    return outcomes


def overall_exit_code(outcomes: list[SiteOutcome]) -> int:
    """0 when every site synced or was deferred; the failures' exit code when they agree, else 1."""
    codes = {o.exit_code for o in outcomes if o.exit_code}
    return 0 if not codes else codes.pop() if len(codes) == 1 else 1
