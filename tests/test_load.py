"""A bounded load on loopback against the running service and the real GoatCounter behind it.

CONNECTIONS clients ask for SECONDS, each one request after another: the export object of a finished export
(identical concurrent GETs share one upstream request) and, every DOWNLOAD_EVERY-th request, its file. Every
answer must be right (no 5xx, no exception, the file's bytes whole), and the service's resident memory must
not grow by more than RSS_GROWTH_LIMIT. The figures are printed (run with -s) and kept in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from goatcounter_exports.testbed import LocalGoatCounter

from .conftest import service_env
from .support import SERVE, poll_export, running

CONNECTIONS = 32
SECONDS = 10.0
DOWNLOAD_EVERY = 8
RSS_GROWTH_LIMIT_KB = 50 * 1024


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used, from /proc (clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class Tally:
    requests: int = 0
    downloads: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def load(base: str, export_id: int, expected_hash: str, file: bytes) -> Tally:
    """CONNECTIONS clients, each asking one request after another until SECONDS have passed."""
    tally = Tally()
    info_url, download_url = f"{base}/v1/export/{export_id}", f"{base}/v1/export/{export_id}/download"
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SECONDS

    async def client_loop(client: httpx.AsyncClient, number: int) -> None:
        count = number  # the clients do not download in step
        while loop.time() < deadline:
            count += 1
            download = count % DOWNLOAD_EVERY == 0
            started = loop.time()
            try:
                answer = await client.get(download_url if download else info_url)
            except httpx.HTTPError as exc:
                tally.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            tally.latencies.append(loop.time() - started)
            tally.requests += 1
            if answer.status_code != 200:
                tally.errors.append(f"{answer.status_code}: {answer.text[:200]}")
            elif download:
                tally.downloads += 1
                if answer.content != file:
                    tally.errors.append(f"download of {len(answer.content)} bytes is not the file")
            elif answer.json().get("hash") != expected_hash:
                tally.errors.append(f"export object without its hash: {answer.text[:200]}")

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        work = asyncio.gather(*(client_loop(client, n) for n in range(CONNECTIONS)))
        await asyncio.wait_for(work, SECONDS + 60)
    return tally


def test_a_bounded_load_has_no_errors_and_bounded_memory(goatcounter: LocalGoatCounter, tmp_path: Path) -> None:
    with running(SERVE, service_env(goatcounter, tmp_path)) as service:
        with httpx.Client(timeout=30) as client:  # a finished export, and one of each request to warm up
            created = client.post(f"{service.rest}/v1/export", json={})
            assert created.status_code == 202, created.text
            export_id: int = created.json()["id"]
            export = poll_export(client, service.rest, export_id)
            file = client.get(f"{service.rest}/v1/export/{export_id}/download").content
            assert "sha256-" + hashlib.sha256(file).hexdigest() == export["hash"]
        pid = service.process.pid
        before, cpu_before, own_cpu_before = rss_kb(pid), cpu_seconds(pid), time.process_time()
        started = time.monotonic()
        tally = asyncio.run(load(service.rest, export_id, str(export["hash"]), file))
        took = time.monotonic() - started
        after, cpu, own_cpu = rss_kb(pid), cpu_seconds(pid) - cpu_before, time.process_time() - own_cpu_before
        alive = service.process.poll() is None
    print(
        f"\nload {datetime.now(UTC):%Y-%m-%d}: {CONNECTIONS} connections x {SECONDS:.0f} s: {tally.requests} requests "
        f"({tally.requests / took:.0f}/s; {tally.downloads} downloads of {len(file)} bytes), {len(tally.errors)} "
        f"errors; latency median {statistics.median(tally.latencies or [0]) * 1000:.0f} ms, "
        f"p99 {tally.percentile(0.99) * 1000:.0f} ms; service RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB; "
        f"CPU: service {cpu:.1f} s, load client {own_cpu:.1f} s"
    )
    assert alive
    assert tally.errors == [], tally.errors[:5]
    assert tally.requests > CONNECTIONS and tally.downloads > 0
    assert after - before < RSS_GROWTH_LIMIT_KB
