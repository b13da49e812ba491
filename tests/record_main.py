"""Record a real GoatCounter main build for tests/replay.py: the cassette, the export files and the truth.

    .venv/bin/python -m tests.record_main --binary PATH --out tests/fixtures/main
    scripts/record-main-fixtures                     # the same, with the binary from the install cache

Starts LocalGoatCounter(main binary, collect_hits=False: a default goatcounter.com-like site, "Individual
pageviews" off) with NO_RATELIMIT (api2 lifted), makes the requests below itself, each with
`Content-Type: application/json` like the service's client, and records every request and answer in order:

    a. GET /status, GET /api.json                          (no auth)
    b. GET /api/v0/me with the never-used export key      (main: 404 {"error":"not found"}), again (200);
       the same with the site_read key
    c. GET /api/v0/sites/{id} with the export key (403), with the site_read key (200: `setttings.collect`)
    d. main_scenario.seed; POST /api/v0/export {"format":"json"}, every poll of GET /api/v0/export/{id}
       until finished_at is set, GET .../download (a ZIP); truth-1
    e. main_scenario.seed_more (today); >1 s later POST {"format":"json","start_from_day":"<D>T00:00:00Z"}
       with D the UTC day of phase 1's created_at; polls; download; truth-2
    f. POST {"format":"csv","start_from_hit_id":0} and >1 s later {"format":"csv"}: polls, downloads
       (Individual pageviews is off: 20-byte gzips of nothing)
    g. GET /api/v0/export/1 with `Bearer nope` (401)

Truth (truth.json, never served): GoatCounter's visitors per (UTC day, path) from its database, and its
answer to GET /api/v0/stats/hits with a stats key, after each phase. Before writing anything the recorder
checks that truth, the scenario's expectation, the stats API and the export files agree, and that no
token or machine path is left in what it writes; then it replaces the output directory as a whole.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from goatcounter_exports.settings import default_cache_dir
from goatcounter_exports.testbed import (
    MAIN_BINARY_NAME,
    MAIN_COMMIT,
    NO_RATELIMIT,
    HTTPResult,
    LocalGoatCounter,
    find_binary,
)

from . import main_scenario
from .replay import (
    CASSETTE_FORMAT,
    CASSETTE_NAME,
    EXPORT_KEY,
    FIXTURES,
    KEPT_HEADERS,
    SITEREAD_KEY,
    STATS_KEY,
    TRUTH_NAME,
)

SERVER_TMP = "/var/goatcounter/tmp"  # replaces the recording machine's export directory in `path`
SERVER_ROOT = "/var/goatcounter"  # replaces the rest of the recording's work directory, should it appear
UNKNOWN_KEY = "nope"
POLL_INTERVAL = 0.25
POLL_TIMEOUT = 60.0
SAME_SECOND_GAP = 1.2  # exports made in one second share a file name on main
COMMAND = ".venv/bin/python -m tests.record_main --binary PATH --out tests/fixtures/main"


class RecordingError(RuntimeError):
    """The recording could not be made, or disagrees with GoatCounter's own truth: nothing is written."""


class Recorder:
    """Makes requests to a LocalGoatCounter and keeps each (request, answer), scrubbed, in order."""

    def __init__(self, gc: LocalGoatCounter, secrets: Mapping[str, str]) -> None:
        self.gc = gc
        self.secrets = dict(secrets)  # real token -> placeholder
        self.interactions: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}

    def call(self, method: str, path: str, *, key: str | None = None, body: Any = None) -> HTTPResult:
        result = self.gc.request(method, path, key=key, body=body)
        token = None if key is None else self.secrets.get(key, key)
        request = {"method": method, "path": path, "token": token, "body": body}
        self.interactions.append({"request": request, "response": self._response(path, result)})
        return result

    def scrub(self, text: str) -> str:
        """The text without real tokens or the paths of this machine."""
        for real, placeholder in self.secrets.items():
            text = text.replace(real, placeholder)
        text = text.replace(str(self.gc.export_dir), SERVER_TMP)
        return text.replace(str(self.gc.workdir), SERVER_ROOT)

    def _response(self, path: str, result: HTTPResult) -> dict[str, Any]:
        headers = {name: result.headers[name] for name in KEPT_HEADERS if name in result.headers}
        lower = {name.lower(): value for name, value in result.headers.items()}
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        content_type = lower.get("content-type", "")
        response: dict[str, Any] = {"status": result.status, "headers": headers, "chunked": chunked}
        text = None if _is_binary(content_type) else _utf8(result.body)
        if text is None:
            name = _file_name(path, lower.get("content-disposition", ""), result.body)
            self.files[name] = result.body
            response["body_file"] = name
            response["body_sha256"] = hashlib.sha256(result.body).hexdigest()
        else:
            scrubbed = self.scrub(text)
            response["body"] = scrubbed
            if "Content-Length" in headers:
                headers["Content-Length"] = str(len(scrubbed.encode()))
        return response


def record(binary: Path, out: Path, *, keep_workdir: bool = False, log: Callable[[str], None] = print) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="record-main-"))
    try:
        gc = LocalGoatCounter(binary, workdir / "goatcounter", collect_hits=False, stats_key=True)
        with gc:
            log(f"GoatCounter {gc.version} on {gc.base} (-ratelimit {gc.ratelimit_flag})")
            written = _record(gc, log)
        _write(out, written, log)
    finally:
        if keep_workdir:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _record(gc: LocalGoatCounter, log: Callable[[str], None]) -> dict[str, Any]:
    if gc.ratelimit != NO_RATELIMIT or "api2:" not in (gc.ratelimit_flag or ""):
        raise RecordingError(f"not a main build with api2 lifted: -ratelimit {gc.ratelimit_flag}")
    stats_key = gc.site.stats_key
    if stats_key is None:
        raise RecordingError("LocalGoatCounter made no stats key")
    rec = Recorder(gc, {gc.export_key: EXPORT_KEY, gc.siteread_key: SITEREAD_KEY, stats_key: STATS_KEY})
    site_id = gc.site.site_id
    today = main_scenario.utc_today()
    surprises: list[str] = []

    # a. No auth.
    status = rec.call("GET", "/status").json()
    rec.call("GET", "/api.json")

    # b. A never-used token's first request (main answers 404), then the retry.
    for key in (gc.export_key, gc.siteread_key):
        first = rec.call("GET", "/api/v0/me", key=key)
        if first.status != 200:
            retry = rec.call("GET", "/api/v0/me", key=key)
            if retry.status != 200:
                raise RecordingError(f"GET /api/v0/me answered {first.status}, then {retry.status}")
        if first.status != 404:
            surprises.append(f"a never-used token's first GET /api/v0/me answered {first.status}, not 404")

    # c. The site, without and with site_read.
    rec.call("GET", f"/api/v0/sites/{site_id}", key=gc.export_key)
    site = rec.call("GET", f"/api/v0/sites/{site_id}", key=gc.siteread_key)
    collect = site.json().get("setttings", {}).get("collect")
    log(f"site {site_id}: setttings.collect = {collect}")

    _warm(gc, stats_key)  # the stats key is used for the truth only: its first-use 404 is not recorded

    # d. Phase 1.
    seeded1 = main_scenario.seed(gc, today=today)
    log(f"phase 1: {seeded1.pageviews} pageviews, {seeded1.total_visitors} visitors seeded")
    export1 = _export(rec, gc, {"format": "json"})
    day = str(export1["created_at"])[:10]
    if day != today.isoformat():
        raise RecordingError(f"the UTC day changed during the recording ({today} -> {day}): run it again")
    phase1 = _truth(gc, stats_key, today, seeded1.visitors, export1, surprises)
    phase1["pageviews_sent"] = seeded1.pageviews
    _check_zip(rec.files[_download_name(rec, export1["id"])], phase1["visitors"], None, surprises)

    # e. Phase 2: re-export from D, the last synced day.
    seeded2 = main_scenario.seed_more(gc, today=today)
    log(f"phase 2: {seeded2.pageviews} pageviews, {seeded2.total_visitors} visitors seeded (today)")
    time.sleep(SAME_SECOND_GAP)
    start_from_day = f"{day}T00:00:00Z"
    export2 = _export(rec, gc, {"format": "json", "start_from_day": start_from_day})
    both = _sum_visitors(seeded1.visitors, seeded2.visitors)
    phase2 = _truth(gc, stats_key, today, both, export2, surprises)
    phase2["start_from_day"] = start_from_day
    phase2["new_visitors"] = seeded2.visitors
    phase2["pageviews_sent"] = seeded2.pageviews
    _check_zip(rec.files[_download_name(rec, export2["id"])], phase2["visitors"], day, surprises)

    # f. CSV on a site without Individual pageviews.
    time.sleep(SAME_SECOND_GAP)
    csv1 = _export(rec, gc, {"format": "csv", "start_from_hit_id": 0})
    time.sleep(SAME_SECOND_GAP)
    csv2 = _export(rec, gc, {"format": "csv"})

    # g. An unknown token.
    rec.call("GET", "/api/v0/export/1", key=UNKNOWN_KEY)

    if surprises:
        raise RecordingError("the recording disagrees with GoatCounter's truth:\n  " + "\n  ".join(surprises))
    recorded_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    goatcounter = {
        "commit": MAIN_COMMIT,
        "version": status.get("version"),
        "go": status.get("go"),
        "database": status.get("database"),
        "binary": gc.binary.name,
        "ratelimit": gc.ratelimit_flag,
    }
    cassette = {
        "format": CASSETTE_FORMAT,
        "goatcounter": goatcounter,
        "recorded_at": recorded_at,
        "site_id": site_id,
        "tokens": {
            EXPORT_KEY: "export, count (permissions 6)",
            SITEREAD_KEY: "export, count, site_read (permissions 14)",
            STATS_KEY: "export, count, site_read, stats (permissions 78); used for truth.json only",
            UNKNOWN_KEY: "not a token: main answers 401 unknown token",
        },
        "interactions": rec.interactions,
    }
    truth = {
        "goatcounter": goatcounter,
        "recorded_at": recorded_at,
        "today": today.isoformat(),
        "D": day,
        "site_id": site_id,
        "phase1": phase1,
        "phase2": phase2,
        "csv": {"export_ids": [csv1["id"], csv2["id"]]},
    }
    texts = {
        CASSETTE_NAME: json.dumps(cassette, indent=2, ensure_ascii=False) + "\n",
        TRUTH_NAME: rec.scrub(json.dumps(truth, indent=2, ensure_ascii=False)) + "\n",
        "README.md": _readme(goatcounter, recorded_at, today, day, seeded1, seeded2, phase1, phase2, rec),
    }
    _check_clean(gc, rec, texts)
    return {"texts": texts, "files": rec.files, "summary": _summary(rec, phase1, phase2, day)}


def _warm(gc: LocalGoatCounter, key: str) -> None:
    for _ in range(3):
        if gc.request("GET", "/api/v0/me", key=key).status == 200:
            return
    raise RecordingError("the stats key never answered 200")


def _export(rec: Recorder, gc: LocalGoatCounter, body: dict[str, Any]) -> dict[str, Any]:
    """POST /api/v0/export, every poll until finished_at is set, and the download: all recorded."""
    created = rec.call("POST", "/api/v0/export", key=gc.export_key, body=body)
    if created.status != 202:
        raise RecordingError(f"POST /api/v0/export {body} answered {created.status}: {created.body[:300]!r}")
    export_id = int(created.json()["id"])
    deadline = time.monotonic() + POLL_TIMEOUT
    while True:
        polled = rec.call("GET", f"/api/v0/export/{export_id}", key=gc.export_key)
        export: dict[str, Any] = polled.json()
        if polled.status != 200 or export.get("error"):
            raise RecordingError(f"export {export_id}: {polled.status} {export}")
        if export.get("finished_at"):
            break
        if time.monotonic() > deadline:
            raise RecordingError(f"export {export_id} did not finish in {POLL_TIMEOUT:.0f}s")
        time.sleep(POLL_INTERVAL)
    download = rec.call("GET", f"/api/v0/export/{export_id}/download", key=gc.export_key)
    if download.status != 200:
        raise RecordingError(f"download of export {export_id} answered {download.status}")
    digest = "sha256-" + hashlib.sha256(download.body).hexdigest()
    if digest != export.get("hash"):
        raise RecordingError(f"export {export_id}: the file's {digest} is not the export's hash {export.get('hash')}")
    return export


def _truth(
    gc: LocalGoatCounter,
    stats_key: str,
    today: date,
    expected: dict[str, dict[str, int]],
    export: Mapping[str, Any],
    surprises: list[str],
) -> dict[str, Any]:
    visitors = main_scenario.visitors_by_day_path(gc)
    if visitors != expected:
        surprises.append(f"hit_counts {visitors} != the scenario's visitors {expected}")
    start = (today - timedelta(days=7)).isoformat()
    query = f"/api/v0/stats/hits?start={start}T00:00:00Z&end={today.isoformat()}T23:59:59Z&limit=100"
    answer = gc.request("GET", query, key=stats_key)
    if answer.status != 200:
        raise RecordingError(f"GET {query} answered {answer.status}: {answer.body[:300]!r}")
    stats = answer.json()
    daily = _nest(
        Counter({(d["day"], h["path"]): int(d["daily"]) for h in stats["hits"] for d in h["stats"] if int(d["daily"])})
    )
    if daily != visitors:
        surprises.append(f"stats/hits daily {daily} != hit_counts {visitors}")
    return {
        "export_id": export["id"],
        "export_created_at": export["created_at"],
        "export_hash": export["hash"],
        "visitors": visitors,
        "total_visitors": main_scenario.total(visitors),
        "stats_hits_request": query,
        "stats_hits": stats,
    }


def _check_zip(
    data: bytes, visitors: Mapping[str, Mapping[str, int]], from_day: str | None, surprises: list[str]
) -> None:
    """hit_stats.jsonl (summed per day and path) against the truth, from `from_day` on when given."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = {Path(name).name: name for name in archive.namelist()}
        paths = {
            row["id"]: row["path"] for row in _jsonl(archive.read(members["paths.jsonl"])) if isinstance(row, dict)
        }
        counts: Counter[tuple[str, str]] = Counter()
        for row in _jsonl(archive.read(members["hit_stats.jsonl"])):
            counts[(str(row["hour"])[:10], paths[row["path_id"]])] += int(row["count"])
    want = {day: dict(p) for day, p in visitors.items() if from_day is None or day >= from_day}
    got = _nest(counts)
    if got != want:
        surprises.append(f"the export's hit_stats {got} != hit_counts {want} (from {from_day})")


def _check_clean(gc: LocalGoatCounter, rec: Recorder, texts: Mapping[str, str]) -> None:
    """No real token or path of this machine in what is written (text, or inside the export files)."""
    forbidden = [*rec.secrets, str(gc.workdir), str(gc.export_dir)]
    blobs = {name: text.encode() for name, text in texts.items()}
    for name, data in rec.files.items():
        blobs[name] = data
        if data[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    blobs[f"{name}:{member}"] = archive.read(member)
    for name, blob in blobs.items():
        for secret in forbidden:
            if secret.encode() in blob:
                raise RecordingError(f"{name} still holds a token or a path of this machine")


def _write(out: Path, written: Mapping[str, Any], log: Callable[[str], None]) -> None:
    """Replace `out` as a whole: everything is first written beside it, then swapped in."""
    out = out.resolve()
    staging = out.with_name(f".{out.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, text in written["texts"].items():
        (staging / name).write_text(text, encoding="utf-8")
    for name, data in written["files"].items():
        (staging / name).write_bytes(data)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log(written["summary"])
    log(f"written: {out}")


def _summary(rec: Recorder, phase1: Mapping[str, Any], phase2: Mapping[str, Any], day: str) -> str:
    lines = ["requests recorded (method, path, token, body -> status):"]
    for i, interaction in enumerate(rec.interactions, 1):
        request, response = interaction["request"], interaction["response"]
        body = "" if request["body"] is None else json.dumps(request["body"], separators=(",", ":"))
        lines.append(
            f"  {i:2}. {request['method']} {request['path']} {request['token'] or '-'} {body} -> {response['status']}"
        )
    lines.append(f"D = {day}")
    for name, phase in (("phase 1", phase1), ("phase 2", phase2)):
        lines.append(f"{name}: export {phase['export_id']}, {phase['total_visitors']} visitors {phase['visitors']}")
    return "\n".join(lines)


def _readme(
    goatcounter: Mapping[str, Any],
    recorded_at: str,
    today: date,
    day: str,
    seeded1: main_scenario.Seeded,
    seeded2: main_scenario.Seeded,
    phase1: Mapping[str, Any],
    phase2: Mapping[str, Any],
    rec: Recorder,
) -> str:
    files = "\n".join(
        f"- `{name}`: {len(data)} bytes, sha256 `{hashlib.sha256(data).hexdigest()}`"
        for name, data in sorted(rec.files.items())
    )
    return f"""# GoatCounter main, recorded

Made by `tests/record_main.py` on {recorded_at} (the scenario's "today" was {today.isoformat()}, UTC), against a
real GoatCounter main build: commit `{goatcounter["commit"]}`, version `{goatcounter["version"]}`,
{goatcounter["go"]}, {goatcounter["database"]}, binary `{goatcounter["binary"]}` (`scripts/install-goatcounter main`
with `GOATCOUNTER_MAIN_SRC`). CI cannot build main; `tests/replay.py` serves these answers on a real socket.

Re-record (needs the main binary; writes this directory anew, commits nothing):

    scripts/record-main-fixtures
    {COMMAND}

## What was recorded

A LocalGoatCounter with `collect_hits=False` (site `collect` = 190: a default goatcounter.com-like site, Individual
pageviews off, so GoatCounter keeps statistics, which count visitors) and
`-ratelimit {goatcounter["ratelimit"]}`.
Every request carries `Content-Type: application/json`. `cassette.json` holds the requests and answers in order
(status, the headers that matter, the body; binary bodies are the files below, named by export id):

- a. `GET /status`, `GET /api.json` (no auth)
- b. `GET /api/v0/me` with the never-used export key (main: 404 `{{"error":"not found"}}`), again (200); the same
  with the site_read key
- c. `GET /api/v0/sites/{{id}}` with the export key (403) and the site_read key (200, `setttings.collect`)
- d. phase 1, `tests/main_scenario.py` `seed`: {seeded1.pageviews} pageviews, {seeded1.total_visitors} visitors
  on today-3, today-2, today-1 and two early today; `POST /api/v0/export {{"format":"json"}}` (export
  {phase1["export_id"]}), each poll of `GET /api/v0/export/{{id}}` until `finished_at`, the download (a ZIP)
- e. phase 2, `seed_more`: {seeded2.pageviews} pageviews, {seeded2.total_visitors} visitors, today only (new paths
  `/changelog` and the event `download-click`); `POST /api/v0/export
  {{"format":"json","start_from_day":"{day}T00:00:00Z"}}` (export {phase2["export_id"]}; D = {day}, the UTC day of
  phase 1's `created_at`), polls, download
- f. `POST /api/v0/export {{"format":"csv","start_from_hit_id":0}}` and `{{"format":"csv"}}`: polls, downloads
  (20-byte gzips of nothing: no `hits` are kept)
- g. `GET /api/v0/export/1` with `Bearer nope`: 401

`truth.json` is never served: GoatCounter's visitors per (UTC day, path) from its `hit_counts` table and its
answer to `GET /api/v0/stats/hits` (with a stats key) after each phase ({phase1["total_visitors"]} visitors after
phase 1, {phase2["total_visitors"]} after phase 2), the export ids and D. The recorder checked that these agree
with the scenario, with each other and with the exports' `hit_stats.jsonl`, and that each file's SHA-256 is its
export's `hash`.

## Tokens and paths are placeholders

The tokens are replaced everywhere by `{EXPORT_KEY}` (export, count), `{SITEREAD_KEY}` (export, count,
site_read) and `{STATS_KEY}` (also stats; used for truth.json only); `nope` is no token. The export
objects' server-side `path` has its directory replaced by `{SERVER_TMP}`. Answers are otherwise as main gave them
(the export files byte for byte).

## Files

- `cassette.json`, `truth.json`, this README
{files}
"""


def _download_name(rec: Recorder, export_id: int) -> str:
    for interaction in rec.interactions:
        if interaction["request"]["path"] == f"/api/v0/export/{export_id}/download":
            return str(interaction["response"]["body_file"])
    raise RecordingError(f"no download of export {export_id} recorded")


def _file_name(path: str, disposition: str, body: bytes) -> str:
    parts = path.strip("/").split("/")
    if len(parts) == 5 and parts[:3] == ["api", "v0", "export"] and parts[4] == "download":
        return f"export-{parts[3]}" + (".zip" if ".zip" in disposition else ".csv.gz")
    return hashlib.sha256(body).hexdigest() + ".bin"


def _is_binary(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind in ("application/gzip", "application/zip", "application/octet-stream", "application/x-gzip")


def _utf8(body: bytes) -> str | None:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl(data: bytes) -> list[Any]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _sum_visitors(*parts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    counts: Counter[tuple[str, str]] = Counter()
    for part in parts:
        for day, paths in part.items():
            for path, n in paths.items():
                counts[(day, path)] += n
    return _nest(counts)


def _nest(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for (day, path), n in sorted(counts.items()):
        nested.setdefault(day, {})[path] = n
    return nested


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.record_main", description=__doc__.split("\n")[0])
    parser.add_argument("--binary", type=Path, help=f"GoatCounter main (default: the cache's {MAIN_BINARY_NAME})")
    parser.add_argument("--out", type=Path, default=FIXTURES, help="the fixtures directory (replaced as a whole)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep GoatCounter's database and log")
    args = parser.parse_args(argv)
    try:
        binary = find_binary(args.binary, cache_dir=default_cache_dir(os.environ), name=MAIN_BINARY_NAME)
        record(binary, args.out, keep_workdir=args.keep_workdir)
    except RecordingError as err:
        print(f"record_main: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
