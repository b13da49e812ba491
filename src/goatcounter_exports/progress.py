"""Progress of long jobs: the one signature they report through, and the CLI's reporter for it.

Workflows call `progress(stage, done, total)`; the MCP adapter turns that into progress
notifications, and the CLI into a rich bar on a terminal, plain lines otherwise (cron, CI, pipes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich import progress as bar
from rich.console import Console

PLAIN_EVERY = 2.0  # seconds between plain progress lines

Progress = Callable[[str, float, float | None], Awaitable[None]]  # (stage, done, total)


async def no_progress(stage: str, done: float, total: float | None) -> None:
    return None


class Reporter:
    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet  # nothing but what the caller prints itself (cron)
        self.tty = stream.isatty() and not quiet
        self._bar: bar.Progress | None = None
        self._tasks: dict[str, bar.TaskID] = {}
        self._last_line = 0.0
        self._last_stage = ""

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    async def __call__(self, stage: str, done: float, total: float | None) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            if stage not in self._tasks:
                label = "Waiting for GoatCounter" if stage == "waiting" else "Downloading"
                self._tasks[stage] = self._bar.add_task(label, total=total)
            self._bar.update(self._tasks[stage], completed=done, total=total)
            return
        now = time.monotonic()
        if stage != self._last_stage or now - self._last_line >= PLAIN_EVERY:
            self._last_line, self._last_stage = now, stage
            amount = f"{done / 1024:.0f} KiB" if stage == "downloading" else f"{done:.0f}s"
            print(f"{stage}: {amount}", file=self.stream, flush=True)

    @contextmanager
    def live(self) -> Iterator[Reporter]:
        if not self.tty:
            yield self
            return
        console = Console(file=self.stream)
        columns = (bar.TextColumn("{task.description}"), bar.BarColumn(), bar.DownloadColumn(), bar.TimeElapsedColumn())
        with bar.Progress(*columns, console=console, transient=True) as live:
            self._bar = live
            try:
                yield self
            finally:
                self._bar = None


def reporter(*, quiet: bool = False) -> Reporter:
    return Reporter(sys.stderr, quiet=quiet)
