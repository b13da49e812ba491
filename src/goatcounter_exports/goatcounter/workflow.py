"""The export job users actually do: create (or reuse), wait, download, verify.

Shared by the `export` and `sync` commands and the `export-pageviews` tool. Waiting
backs off from a quarter second to five (well under GoatCounter's 4 requests a
second), stops at the export's `error` field, and gives up at a deadline: a
background export that dies after writing its rows never sets `error` nor
`finished_at`, so a waiter without a deadline waits forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ApiError, ExportError
from ..gzipstream import TruncatedGzip, gunzip
from ..outcome import read_answer
from ..runtime import Runtime
from .csvfile import hash_matches, split_header
from .exports import ExportOps, find_ops, get_export, id_values, refusal, state
from .state import RECENT_EXPORT_SECONDS, StateStore

Progress = Callable[[str, float, float | None], Awaitable[None]]  # (stage, done, total)
FIRST_POLL = 0.25
MAX_POLL = 5.0


class WaitTimeout(ExportError):
    """The export did not finish before the deadline."""


class IntegrityError(ExportError):
    """The downloaded file does not match the export's hash (or is not a CSV of a known version)."""


async def _quiet(stage: str, done: float, total: float | None) -> None:
    return None


@dataclass
class ExportJob:
    runtime: Runtime
    ops: ExportOps
    state: StateStore | None
    progress: Progress = _quiet

    @classmethod
    def for_runtime(cls, runtime: Runtime, state: StateStore | None, progress: Progress = _quiet) -> ExportJob:
        namespace = runtime.spec.capability.consumes[0].namespace
        return cls(runtime, find_ops(runtime, namespace), state, progress)

    @property
    def api_uri(self) -> str:
        return self.runtime.base_uri(self.ops.create.consumes.namespace)

    async def create_or_reuse(self, start: int) -> tuple[dict[str, Any], bool]:
        """A new export of hits after `start`, or, when the budget is spent, a recent one of ours
        covering the same range. Returns (export, reused)."""
        budget = self.state.budget(self.api_uri) if self.state else None
        if self.state and budget and budget.exhausted(time.time()):
            recent = self.state.latest_export(self.api_uri, since=time.time() - RECENT_EXPORT_SECONDS, start=start)
            if recent is not None:
                export = await get_export(self.runtime, self.ops, recent.export_id)
                if state(export) != "failed":
                    return export, True
        async with self.runtime.call_target(self.ops.create, {"body": {"start_from_hit_id": start}}) as response:
            export = await read_answer(response)
        if not isinstance(export, dict) or "id" not in export:
            raise ExportError("GoatCounter did not answer the create with an export")
        return export, False

    async def wait(self, export: dict[str, Any], wait_seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait_seconds
        delay = FIRST_POLL
        while True:
            current = state(export)
            if current == "failed":
                raise ExportError(f"export {export['id']} failed in GoatCounter: {export['error']}")
            if current == "finished":
                return export
            if time.monotonic() + delay > deadline:
                raise WaitTimeout(f"export {export['id']} did not finish within {wait_seconds:.0f} seconds")
            await self.progress("waiting", time.monotonic() - (deadline - wait_seconds), wait_seconds)
            await asyncio.sleep(delay)
            delay = min(delay * 1.6, MAX_POLL)
            try:
                export = await get_export(self.runtime, self.ops, int(export["id"]))
            except ApiError as exc:
                if exc.status != 429:
                    raise
                delay = max(delay, exc.retry_after or MAX_POLL)

    async def file_chunks(self, export: dict[str, Any]) -> AsyncIterator[bytes]:
        """The export file's compressed bytes; verifies its SHA-256 when the last chunk is through."""
        digest = hashlib.sha256()
        size = 0
        total = float(export["size"]) * 1024 * 1024 if export.get("size") else None
        async with self.runtime.call_target(self.ops.download, id_values(self.ops.download, int(export["id"]))) as r:
            if r.status != 200:
                raise await refusal(r)
            async for chunk in r.chunks():
                digest.update(chunk)
                size += len(chunk)
                await self.progress("downloading", size, total)
                yield chunk
        if hash_matches(export.get("hash"), digest.hexdigest()) is False:
            raise IntegrityError(
                f"export {export['id']}: the file's SHA-256 {digest.hexdigest()} does not match {export.get('hash')}"
            )


async def write_atomically(chunks: AsyncIterator[bytes], destination: Path, *, decompress: bool) -> int:
    """Write to a temporary file beside `destination`, then rename: a failure leaves nothing behind.

    With `decompress`, the gzip stream is inflated on the way and the CSV version header checked.
    Returns the number of bytes written.
    """
    destination = destination.resolve()
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    written = 0
    try:
        checked = not decompress
        with os.fdopen(handle, "wb") as out:
            try:
                async for data in gunzip(chunks) if decompress else chunks:
                    if not checked and data:
                        try:
                            split_header(data.split(b"\n", 1)[0].decode("utf-8", "replace").split(","))
                        except ExportError as exc:
                            raise IntegrityError(str(exc)) from None
                        checked = True
                    out.write(data)
                    written += len(data)
            except (zlib.error, TruncatedGzip) as exc:
                raise IntegrityError(f"the export file is not valid, complete gzip: {exc}") from None
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written
