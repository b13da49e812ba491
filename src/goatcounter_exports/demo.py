"""`goatcounter-exports demo`: a real local GoatCounter with sample pageviews, served as REST and MCP.

For someone with no GoatCounter account at hand. It uses the same binary and
set-up as the test bed, prints what to try, and stops what it started on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .app import build_app, check_ports
from .server import Listener
from .settings import Settings
from .spec import Spec
from .testbed import LocalGoatCounter, find_binary

SAMPLE_PAGES = ["/", "/about", "/blog", "/blog/goats", "/blog/privacy", "/pricing", "/docs", "/docs/api", "/contact"]
SAMPLE_REFERRERS = ["", "", "https://news.ycombinator.com", "https://duckduckgo.com", "https://example.org/links"]


def sample_pageviews(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Repeatable sample traffic: popular pages more often, a few referrers."""
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    weights = [len(SAMPLE_PAGES) - i for i in range(len(SAMPLE_PAGES))]
    hits = []
    for _ in range(count):
        path = rng.choices(SAMPLE_PAGES, weights)[0]
        hit: dict[str, Any] = {"path": path, "title": path.strip("/").replace("/", " / ").title() or "Home"}
        referrer = rng.choice(SAMPLE_REFERRERS)
        if referrer:
            hit["ref"] = referrer
        hits.append(hit)
    return hits


def run_demo(spec: Spec, settings: Settings, announce: Callable[[str], None], pageviews: int = 300) -> None:
    check_ports(spec, settings)  # busy ports are told before a GoatCounter is started, all at once
    binary = find_binary(cache_dir=settings.cache_dir)
    with tempfile.TemporaryDirectory(prefix="goatcounter-demo-") as workdir:
        goatcounter = LocalGoatCounter(binary, Path(workdir))
        announce(f"Starting GoatCounter ({binary.name}) with a sample site ...")
        with goatcounter:
            goatcounter.seed(sample_pageviews(pageviews))
            secrets = {name: goatcounter.export_key for name in spec.bound_variables}
            app = build_app(spec, settings.with_site(goatcounter.url, secrets))

            def explain(found: list[Listener]) -> None:
                rest = next((f.url.rstrip("/") for f in found if f.name == "REST"), "http://127.0.0.1:8080")
                announce("")
                announce(f"GoatCounter  {goatcounter.url}  ({pageviews} sample pageviews)")
                announce(f"API key      {goatcounter.export_key}  (a key of this local demo only)")
                announce("")
                announce("Try:")
                announce(f"  curl -sf -X POST {rest}/v1/export -H 'Content-Type: application/json' -d '{{}}'")
                announce(f"  curl -sf {rest}/v1/export/1")
                announce(f"  curl -sf -H 'Accept: text/csv' {rest}/v1/export/1/download | head")
                announce("")
                announce("Or, in another shell, export and sync from it:")
                announce(f"  export GOATCOUNTER_URL={goatcounter.url} GOATCOUNTER_API_KEY={goatcounter.export_key}")
                announce("  .venv/bin/goatcounter-exports export -o pageviews.csv")
                announce("  .venv/bin/goatcounter-exports sync")
                announce("Press Ctrl-C to stop the demo and its GoatCounter.")

            asyncio.run(app.serve_forever(announce, explain))
