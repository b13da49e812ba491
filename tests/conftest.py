"""The test bed: a real GoatCounter v2.7.0, started once per session, seeded with known pageviews; and the
key-leak check over the whole session."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from goatcounter_exports.goatcounter.store import StateStore
from goatcounter_exports.testbed import LocalGoatCounter

from .support import (
    FUZZ_REPORT,
    LEAKS,
    SERVE,
    LeakCheck,
    LeakLogHandler,
    RecordingProxy,
    Service,
    clean_env,
    current_test,
    goatcounter_binary,
    running,
    start_service,
)

# Known pageviews: 30 paths, some repeated, so counts per path are checkable.
SEEDED_PATHS = [f"/page-{i % 12}" for i in range(30)]


@pytest.fixture(scope="session", autouse=True)
def no_secret_leaks() -> Iterator[LeakCheck]:
    """The key-leak check over the whole session (tests/support.py `LeakCheck`).

    Every LocalGoatCounter started registers its sites' keys (and its working directory, whose database holds
    them by design, as not ours to scan); every app built in process its state directory; run_cli and
    start_service what they run; the package's log records are kept. When the session ends (this fixture
    is set up first, so it is torn down last, after every service stopped), every output and every file
    under those places is searched for every secret, and the session fails naming whose secret leaked where.
    """
    start, open_store = LocalGoatCounter.start, StateStore.__init__

    def start_and_register(self: LocalGoatCounter) -> None:
        LEAKS.ignore(self.workdir)
        try:
            start(self)
        finally:
            LEAKS.goatcounter(self)

    def open_and_watch(self: StateStore, path: Path, *args: Any, **kwargs: Any) -> None:
        LEAKS.watch(Path(path).parent, f"the state directory of an app built in process by {current_test()}")
        open_store(self, path, *args, **kwargs)

    handler = LeakLogHandler(LEAKS)
    logger = logging.getLogger("goatcounter_exports")
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LocalGoatCounter, "start", start_and_register)
            patch.setattr(StateStore, "__init__", open_and_watch)
            yield LEAKS
    finally:
        logger.removeHandler(handler)
    leaks = LEAKS.scan()
    if leaks:
        pytest.fail("secrets leaked:\n" + "\n".join(f"  {leak}" for leak in leaks), pytrace=False)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in FUZZ_REPORT:
        terminalreporter.write_line(f"fuzz: {line}")
    if LEAKS.scanned_files or LEAKS.outputs:
        terminalreporter.write_line(f"key-leak check: {LEAKS.summary()}")


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


@pytest.fixture(scope="module")
def proxied(
    goatcounter: LocalGoatCounter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, RecordingProxy]]:
    """The service behind a recording proxy, to prove what reaches GoatCounter (one per test module). Its records
    are cleared before each test."""
    with RecordingProxy(goatcounter.url) as proxy:
        env = service_env(goatcounter, tmp_path_factory.mktemp("state"), GOATCOUNTER_URL=proxy.url)
        with running(SERVE, env) as service:
            yield service, proxy


@pytest.fixture(autouse=True)
def _clear_records(request: pytest.FixtureRequest) -> None:
    if "proxied" in request.fixturenames:
        request.getfixturevalue("proxied")[1].requests.clear()
