"""What bench/service.py and bench/upstream_client.py measure the same way, kept in one place.

Both scripts read CPU time and memory from /proc, drive wrk through the same Lua reporter, print the same
versions line and stop the same way on signals. Sharing the code keeps their numbers comparable: a fix to how
one of them measures is a fix to both. The scripts run as files (`.venv/bin/python bench/service.py`), so
they import this module by name from their own folder; it imports nothing from the project.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any, TypedDict, cast

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 10.0  # how long a process that was told to stop (or killed) may take to go

# wrk's `done` hook: one machine-readable line, so no human-oriented wrk output has to be parsed.
# A script that needs more (headers, say) puts its own Lua before this.
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\"requests\":%.0f,\"duration_us\":%.0f,\"connect\":%.0f,\"read\":%.0f,\"write\":%.0f," ..
    "\"status\":%.0f,\"timeout\":%.0f,\"p50_us\":%.0f,\"p90_us\":%.0f,\"p99_us\":%.0f,\"max_us\":%.0f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# /proc: CPU time and memory


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    """One `kB` line of /proc/PID/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


class PeakRss:
    """Peak resident memory of a process during a block: the kernel's high-water mark, reset at entry
    (/proc/PID/clear_refs), and a 5 ms sampler as a fallback (when the reset is not allowed) and a cross-check."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before_kib = 0
        self.peak_kib = 0
        self.method = "sampled"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(OSError, BenchError):
                self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRss:
        self.before_kib = self.peak_kib = status_kib(self.pid, "VmRSS")
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled"
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.method == "VmHWM":
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmHWM"))


def stop_group(process: subprocess.Popen[Any], first: signal.Signals = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop a process started with `start_new_session=True`, and its children: `first`, then SIGKILL after
    `timeout` seconds. Nothing when it has already ended."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def tail(path: Path, lines: int = 20, *, missing: str = "") -> str:
    """The last lines of a child's log, for an error message; `missing` when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing


class Throughput:
    """Median time and MB/s of sequential downloads of one size, for the result classes that hold them."""

    seconds: list[float]
    size: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.median_s


# --------------------------------------------------------------------------------------------------
# wrk


class _WrkReport(TypedDict):
    """The BENCH line that WRK_REPORT_LUA writes."""

    requests: float
    duration_us: float
    connect: float
    read: float
    write: float
    status: float
    timeout: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float


@dataclass
class WrkRun:
    """One wrk run, as its BENCH line reported it."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # connect/read/write/timeout errors and HTTP statuses >= 400


def run_wrk(
    url: str,
    lua: Path,
    seconds: int,
    threads: int,
    connections: int,
    *,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> WrkRun:
    """Run wrk for `seconds` (killed 30 s after that at the latest) with a script ending in WRK_REPORT_LUA."""
    command = [
        "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        "--timeout=5s",
        f"--script={lua}",
        url,
    ]
    process = subprocess.Popen(
        command,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=new_session,
    )
    try:
        out, err = process.communicate(timeout=seconds + 30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("BENCH ")]
    if process.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({process.returncode}): {err.decode(errors='replace')[-500:]}")
    raw = cast(_WrkReport, json.loads(lines[-1].removeprefix("BENCH ")))
    elapsed = raw["duration_us"] / 1e6
    errors = int(raw["connect"]) + int(raw["read"]) + int(raw["write"]) + int(raw["status"]) + int(raw["timeout"])
    return WrkRun(
        requests=int(raw["requests"]),
        seconds=elapsed,
        rps=raw["requests"] / elapsed if elapsed > 0 else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        errors=errors,
    )


# --------------------------------------------------------------------------------------------------
# The driver


def check_bounds(
    parser: argparse.ArgumentParser, args: argparse.Namespace, bounds: Mapping[str, tuple[float, float]]
) -> None:
    """Every option within its bounds, and no more wrk threads than connections (wrk refuses that); else exit 2."""
    for name, (low, high) in bounds.items():
        if not low <= getattr(args, name) <= high:
            parser.error(f"--{name.replace('_', '-')} must be between {low} and {high}")
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections")


def versions(packages: Sequence[str]) -> dict[str, str]:
    """Python's, the installed `packages`' (those present) and wrk's versions, for the report's header."""
    found = {"python": platform.python_version()}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False)
    banner = (wrk.stdout or wrk.stderr or "wrk ?").splitlines()[0]  # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."
    found["wrk"] = banner.split(" [")[0].removeprefix("wrk ")
    return found


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_guarded(run: Callable[[], int]) -> int:
    """Run the driver so that Ctrl-C, SIGTERM and SIGHUP unwind it (every `with` stops what it started) and a
    failure is one line on stderr: the exit status is run's, 130 when stopped, 1 on a BenchError."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    try:
        return run()
    except KeyboardInterrupt:
        print("\ninterrupted: every process this benchmark started has been stopped", file=sys.stderr)
        return 130
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
