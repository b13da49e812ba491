"""GoatCounter's export operations and the Export object, as the rest of the package sees them.

The three consumed operations are recognised by their shape (POST /export,
GET /export/{id}, GET /export/{id}/download) in the spec, so a renamed
operation still works, and calls go through the runtime like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from ..errors import ExportError, SpecError
from ..runtime import Runtime
from ..spec.expressions import path_placeholders
from ..spec.resolve import Target

Shape = Literal["create", "get", "download"]
Status = Literal["running", "finished", "failed"]
Format = Literal["csv", "json"]


@dataclass(frozen=True)
class ExportRequest:
    """What to export: CSV pageviews after a hit id, or the JSON statistics from a day (UTC) on."""

    format: Format = "csv"
    start_from_hit_id: int = 0
    start_from_day: date | None = None

    def body(self) -> dict[str, Any]:
        """The create body; the profile adds or drops `format` to suit the server's version."""
        if self.format == "json":
            body: dict[str, Any] = {"format": "json"}
            if self.start_from_day is not None:
                # Always UTC midnight: main truncates to the UTC day but keeps another offset, and loses hours.
                body["start_from_day"] = f"{self.start_from_day.isoformat()}T00:00:00Z"
            return body
        return {"start_from_hit_id": self.start_from_hit_id}

    @property
    def key(self) -> str:
        """The request, canonical, so that a recorded export can be matched with a new request."""
        return request_key(self.body())


def request_key(body: dict[str, Any]) -> str:
    """A create body, canonical: the format made explicit, defaults dropped, keys sorted."""
    canonical = {"format": body.get("format") or "csv"}
    if body.get("start_from_hit_id"):
        canonical["start_from_hit_id"] = body["start_from_hit_id"]
    if body.get("start_from_day"):
        canonical["start_from_day"] = str(body["start_from_day"])[:10]
    return json.dumps(canonical, sort_keys=True, separators=(",", ":"))


def export_shape(target: Target) -> Shape | None:
    """ "create", "get" or "download" for the export operations; None for anything else."""
    path = target.path.rstrip("/")
    if target.method == "POST" and path.endswith("/export"):
        return "create"
    if target.method == "GET" and path.endswith("/download") and path_placeholders(path):
        return "download"
    if target.method == "GET" and path_placeholders(path) and path.rsplit("/", 2)[-2] == "export":
        return "get"
    return None


@dataclass(frozen=True)
class ExportOps:
    """The consumed export operations of one namespace."""

    create: Target
    get: Target
    download: Target

    @classmethod
    def find(cls, runtime: Runtime, namespace: str) -> ExportOps:
        found: dict[str, Target] = {}
        for ref, target in runtime.resolution.targets.items():
            if target.consumes.namespace == namespace and ref.count(".") == 1:
                shape = export_shape(target)
                if shape:
                    found.setdefault(shape, target)
        missing = {"create", "get", "download"} - set(found)
        if missing:
            raise SpecError(f"the capability lacks the GoatCounter export operation(s): {', '.join(sorted(missing))}")
        return cls(found["create"], found["get"], found["download"])

    @staticmethod
    def id_values(target: Target, export_id: int) -> dict[str, Any]:
        return {name: export_id for name in path_placeholders(target.path)}


@dataclass(frozen=True)
class Export:
    """GoatCounter's Export object, with the fields this package reads typed; `document` is it whole."""

    document: dict[str, Any]

    @classmethod
    def parse(cls, document: Any) -> Export:
        if not isinstance(document, dict) or not isinstance(document.get("id"), int):
            raise ExportError("GoatCounter did not answer with an export")
        return cls(document)

    @property
    def id(self) -> int:
        return int(self.document["id"])

    @property
    def status(self) -> Status:
        if self.document.get("error"):
            return "failed"
        return "finished" if self.document.get("finished_at") else "running"

    @property
    def error(self) -> str | None:
        return self.document.get("error") or None

    @property
    def format(self) -> str:
        """csv or json; v2.7.0 has no `format` field and makes only csv."""
        return str(self.document.get("format") or "csv")

    @property
    def hash(self) -> str | None:
        return self.document.get("hash") or None

    @property
    def num_rows(self) -> int | None:
        value = self.document.get("num_rows")
        return int(value) if value is not None else None

    @property
    def start_from_hit_id(self) -> int:
        return int(self.document.get("start_from_hit_id") or 0)

    @property
    def last_hit_id(self) -> int | None:
        value = self.document.get("last_hit_id")
        return int(value) if value is not None else None

    @property
    def start_from_day(self) -> date | None:
        value = self.document.get("start_from_day")
        return _utc(value).date() if value else None

    @property
    def created_day(self) -> date | None:
        """The UTC day the export was made: the last day whose statistics it may hold only in part."""
        value = self.document.get("created_at")
        return _utc(value).date() if value else None

    @property
    def is_empty_csv(self) -> bool:
        return self.format == "csv" and self.status == "finished" and self.num_rows == 0

    @property
    def size_bytes(self) -> float | None:
        """GoatCounter gives the size in MB, as text ("0.1")."""
        try:
            return float(self.document["size"]) * 1024 * 1024 if self.document.get("size") else None
        except ValueError:
            return None

    def summary(self) -> str:
        """A few lines a model can act on: status, size, and the cursor for the next incremental export."""
        if self.format == "json" and self.status == "finished":
            since = f" from {self.start_from_day}" if self.start_from_day else ""
            return (
                f"Export {self.id} (JSON: aggregate statistics{since}) is finished: {self.document.get('size')} MB. "
                "Read its tables with download-export (argument `table`, default hit_stats)."
            )
        if self.status == "failed":
            return f"Export {self.id} failed: {self.error}. Create a new export to try again."
        if self.status == "running":
            return (
                f"Export {self.id} is running (pageviews after hit {self.start_from_hit_id}). "
                "Call get-export-info again in a few seconds until it is finished."
            )
        return (
            f"Export {self.id} is finished: {self.num_rows} rows, {self.document.get('size')} MB "
            f"(hits {self.start_from_hit_id} < id <= {self.last_hit_id}). "
            f"Read it with download-export. Next incremental export: start_from_hit_id={self.last_hit_id}."
        )


def _utc(value: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(f"GoatCounter gave a time that cannot be read: {value!r}") from None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
