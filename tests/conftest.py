"""The test bed: a real GoatCounter v2.7.0, started once per session, seeded with known pageviews."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from goatcounter_exports.testbed import LocalGoatCounter

from .support import SERVE, Service, clean_env, goatcounter_binary, start_service

# Known pageviews: 30 paths, some repeated, so counts per path are checkable.
SEEDED_PATHS = [f"/page-{i % 12}" for i in range(30)]


@pytest.fixture(scope="session")
def goatcounter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGoatCounter]:
    instance = LocalGoatCounter(goatcounter_binary(), tmp_path_factory.mktemp("goatcounter"))
    instance.start()
    try:
        instance.seed(SEEDED_PATHS)
        yield instance
    finally:
        instance.stop()


def service_env(goatcounter: LocalGoatCounter, state_dir: Path, key: str | None = None, **extra: str) -> dict[str, str]:
    values = {
        "GOATCOUNTER_URL": goatcounter.url,
        "GOATCOUNTER_API_KEY": key if key is not None else goatcounter.export_key,
        "GOATCOUNTER_EXPORTS_STATE_DIR": str(state_dir),
        **extra,
    }
    return clean_env(**values)


@pytest.fixture(scope="session")
def service(goatcounter: LocalGoatCounter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`goatcounter-exports serve` on free ports, pointed at the test bed with an export key."""
    env = service_env(goatcounter, tmp_path_factory.mktemp("state"))
    running = start_service(SERVE, env)
    try:
        yield running
    finally:
        output = running.stop()
        assert goatcounter.export_key not in output
