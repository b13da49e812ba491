"""GoatCounter's hourly API budget (main's api2: 500 requests an hour, besides 4 a second): learnt from the
429 that shows it, honoured without asking again, and never exhausted by our own polling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from goatcounter_exports.goatcounter.workflow import FIRST_POLL, next_poll
from goatcounter_exports.testbed import NO_RATELIMIT, LocalGoatCounter

from .conftest import service_env
from .support import SERVE, RecordingProxy, goatcounter_binary, running

# A real GoatCounter whose API budget is four requests an hour: the same 429 main's api2 gives (a long
# Retry-After), from v2.7.0, which CI runs. `serve`'s checks at start spend two of them (GET /api/v0/me and
# GET /api/v0/export/<an id no export has>), the test the other two.
HOURLY_API = NO_RATELIMIT.replace("api:1000/1", "api:4/3600")


@pytest.fixture
def hourly(tmp_path: Path) -> Iterator[LocalGoatCounter]:
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc", ratelimit=HOURLY_API) as instance:
        yield instance


def test_a_spent_hourly_api_budget_is_learnt_and_answered_locally(hourly: LocalGoatCounter, tmp_path: Path) -> None:
    with RecordingProxy(hourly.url) as proxy:
        env = service_env(hourly, tmp_path, GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env) as service, httpx.Client(timeout=30) as client:
            at_start = [p for p in proxy.paths("GET") if p.startswith("/api/")]
            answers = [client.get(f"{service.rest}/v1/export/4242") for _ in range(4)]
    assert len(at_start) == 2, at_start
    assert [a.status_code for a in answers] == [404, 404, 429, 429]
    assert 3000 < int(answers[2].headers["retry-after"]) <= 3600  # GoatCounter's own
    assert "Nothing was sent to GoatCounter" in answers[3].json()["error"]
    assert 3000 < int(answers[3].headers["retry-after"]) <= 3600
    assert len([p for p in proxy.paths("GET") if p.startswith("/api/")]) == 2 + 3  # the fourth never left


@pytest.mark.fast
def test_a_long_export_is_polled_well_within_an_hourly_api_budget() -> None:
    waited, delay, polls = 0.0, FIRST_POLL, 0
    while waited < 3600:
        waited += delay
        polls += 1
        delay = next_poll(delay, waited)
    assert polls <= 150  # main allows 500 API requests an hour; an hour of waiting spends under a third
    assert next_poll(FIRST_POLL, 1) < 1  # while a small export is likely to finish, look often
