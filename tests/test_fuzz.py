"""Fuzzing, bounded and derandomized for CI, and the key-leak check's own test.

1. The REST API against its own `/openapi.json` (schemathesis): every operation, schema-valid and schema-invalid
   requests, through the app built in process and a RecordingProxy in front of the real GoatCounter test bed. No
   5xx (GoatCounter is healthy here, so not even a 502/504), every answer as the document describes it, and no
   create (POST /api/v0/export: GoatCounter charges the hour for every one, refused or not) behind any 4xx.
2. The MCP tools with arguments generated from their published input schemas (hypothesis), over the SDK's
   in-memory client: valid ones, and ones made invalid on purpose (wrong types, huge and negative numbers,
   floats, unknown fields, very long strings, nested junk). Every answer is a result, never a crash; an invalid
   one is an `isError` "Invalid arguments" result, and nothing at all is sent upstream for it.
3. The export file reader (`goatcounter/exportfile.py`) with malformed CSV, random bytes, truncated and corrupted
   gzip, and ZIPs with junk members or bad JSON lines: records, or an `IntegrityError` (an `InputError` only for a
   table that is not there), never another exception.

Each target runs a fixed number of examples from a fixed seed (`derandomize=True`, no example database), so the
same command on the same code draws the same inputs (hypothesis also draws from literals of the loaded modules:
this file alone draws another fixed set than the whole suite). The counts are printed at the end of the session
(`FUZZ_REPORT`, shown by conftest.py) and are what docs/reliability.md ("Fuzzing") quotes. The bugs these found
(docs/reliability.md, "Defects found") are fixed; the tests that reproduced them stay below as regression tests.
Two classes stay out of the fuzzers' inputs because a test of their own covers them (said where): fields past the
csv module's limit, and damaged ZIP headers. No warning filter is needed: schemathesis and hypothesis import
without warnings here.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import json
import re
import time
import zipfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core import NOT_SET
from schemathesis.generation.modes import GenerationMode
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.schemas import APIOperation, BaseSchema

from goatcounter_exports.app import App, build_app
from goatcounter_exports.errors import InputError, IntegrityError
from goatcounter_exports.goatcounter import exportfile
from goatcounter_exports.goatcounter.exportfile import (
    DIMENSION_TABLES,
    JSON_TABLES,
    STATS_TABLES,
    ExportFile,
    LocalExport,
    gunzip,
    split_header,
)
from goatcounter_exports.goatcounter.exports import Export
from goatcounter_exports.progress import no_progress
from goatcounter_exports.settings import Settings
from goatcounter_exports.spec import load_default
from goatcounter_exports.testbed import LocalGoatCounter
from mcp import Client

from .conftest import SEEDED_PATHS, service_env
from .support import FUZZ_REPORT, LEAKS, Leak, LeakCheck, RecordingProxy, goatcounter_binary, run_cli
from .test_hardening import SlowAnswers

KEY = "GOATCOUNTER_API_KEY"
EXAMPLES = 60  # per REST operation and mode, per MCP tool, per parser target
# Fixed seed, no example database (nothing written to the repository), no deadline (a real GoatCounter answers).
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)


def report(line: str) -> None:
    FUZZ_REPORT.append(line)


# -- 1. REST, against its own OpenAPI document ------------------------------------------------------------

BASE_URL = "http://127.0.0.1:8080"  # a Host the guard accepts (the ASGI test client's own, `testserver`, is 421)
JSON_BODY = {"Content-Type": "application/json"}  # the API refuses a POST without it (415, documented)
REST_OPERATIONS = ["POST /v1/export", "GET /v1/export/{id}", "GET /v1/export/{id}/download"]
# What the document promises: no server error, and every status, content type, header and body as documented;
# a request the document calls invalid is refused (4xx). Not `positive_data_acceptance`: a schema-valid request
# may be refused by design, and must be (1.0 where an integer is due, which JSON Schema counts as one and
# GoatCounter refuses after charging the hour; start_from_day on a CSV export; format json on v2.7.0).
REST_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


class InProcess:
    """The REST app as schemathesis calls it, on its own event-loop thread. Each ASGI lifespan (schemathesis
    starts one for a test and ends it with the test) builds an App, opens it (its upstream client and state
    store) on that loop, and closes it at the end; the state directory, with what it learnt, stays."""

    def __init__(self, build: Callable[[], App]) -> None:
        self.build = build
        self.app: App | None = None
        self.rest: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            assert self.rest is not None, "schemathesis starts the lifespan before the first request"
            await self.rest(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.app = self.build()
                await self.app.__aenter__()
                self.rest = self.app.rest_app()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.app is not None:
                    await self.app.__aexit__(None, None, None)
                self.app = self.rest = None
                await send({"type": "lifespan.shutdown.complete"})
                return


def settings_for(site_url: str, goatcounter: LocalGoatCounter, state_dir: Path) -> Settings:
    return Settings(site_url=site_url, secrets={KEY: goatcounter.export_key}, state_dir=state_dir)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGoatCounter]:
    """A real GoatCounter v2.7.0 of the fuzzers' own, seeded like the session's: they create a hundred exports or
    so, which other tests must not find there (a timed-out create is looked for among a few export ids only:
    see test_a_timed_out_create_is_found_on_a_site_with_many_exports)."""
    with LocalGoatCounter(goatcounter_binary(), tmp_path_factory.mktemp("fuzz-goatcounter")) as instance:
        instance.seed(SEEDED_PATHS)
        yield instance


@pytest.fixture(scope="module")
def rest(
    testbed: LocalGoatCounter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BaseSchema, RecordingProxy]]:
    """The REST API's document, loaded from the app itself, and the proxy that sees what reaches GoatCounter."""
    with RecordingProxy(testbed.url) as proxy:
        settings = settings_for(proxy.url, testbed, tmp_path_factory.mktemp("fuzz-rest"))
        app = InProcess(lambda: build_app(load_default(), settings))
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Host": "127.0.0.1"})
        try:
            yield schema, proxy
        finally:
            schemathesis_asgi.shutdown_lifespans()  # schemathesis' pytest plugin also ends them after each test


def operation(schema: BaseSchema, label: str) -> APIOperation:
    found = [result.ok() for result in schema.get_all_operations() if result.ok().label == label]
    assert found, f"the document has no {label}"
    return found[0]


def test_the_document_has_the_operations_fuzzed(rest: tuple[BaseSchema, RecordingProxy]) -> None:
    schema, _ = rest
    assert sorted(result.ok().label for result in schema.get_all_operations()) == sorted(REST_OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
@pytest.mark.parametrize("label", REST_OPERATIONS)
def test_rest_answers_every_request_as_its_document_says(
    rest: tuple[BaseSchema, RecordingProxy], label: str, mode: GenerationMode
) -> None:
    schema, proxy = rest
    target = operation(schema, label)
    statuses: Counter[int] = Counter()
    answers: list[str] = []
    upstream_calls = 0

    cases = target.as_strategy(generation_mode=mode)

    @FUZZ
    @given(case=cases)
    def one(case: Any) -> None:
        nonlocal upstream_calls
        before = len(proxy.requests)
        response = case.call(base_url=BASE_URL, headers=JSON_BODY)
        sent = proxy.requests[before:]
        statuses[response.status_code] += 1
        upstream_calls += len(sent)
        answers.append(response.content.decode("utf-8", "surrogateescape"))
        assert response.status_code < 500, f"{response.status_code} with a healthy upstream: {response.text[:300]}"
        if 400 <= response.status_code < 500:
            creates = [path for method, path, _ in sent if method == "POST"]
            assert creates == [], f"answered {response.status_code} after spending the hour on {creates}"
        case.validate_response(response, checks=REST_CHECKS, headers=JSON_BODY)

    one()
    LEAKS.output(f"the REST answers to fuzzing {label} ({mode.value})", "\n".join(answers))
    shown = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
    report(
        f"REST {label} {mode.value}: {statuses.total()} requests ({shown}), {upstream_calls} upstream calls, "
        "0 server errors, 0 creates behind a 4xx"
    )


# A body the document calls invalid, built to be so: a JSON value that is not an object, or an object with at
# least one bad field (negative, huge, float, bool, null or nested for the hit id; an unknown format; a time that
# is not RFC 3339, or no real day; an unknown field; nesting past the limit).
INT64_MAX = 2**63 - 1
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
JSON_JUNK = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# Past the 32 levels the API accepts; within the 250 or so the MCP client (pydantic) can serialize.
DEEP = st.integers(33, 250).map(nested)
BAD_HIT_ID = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=INT64_MAX + 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(),
    DEEP,
    JSON_JUNK.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool))),
)
BAD_FORMAT = st.one_of(
    st.text().filter(lambda v: v not in ("csv", "json")), JSON_JUNK.filter(lambda v: v not in ("csv", "json"))
)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
NOT_A_TIME = st.one_of(
    st.text().filter(lambda v: not RFC3339.match(v)),
    st.sampled_from(["2026-02-30T00:00:00Z", "2026-13-01T00:00:00Z", "2026-11-20T24:61:00Z", "2026-11-20", "now"]),
    st.integers(),
    st.none(),
)
UNKNOWN_FIELD = st.text(min_size=1).filter(lambda v: v not in ("start_from_hit_id", "format", "start_from_day"))


@st.composite
def invalid_bodies(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["not an object", "bad field", "unknown field", "too deep"]))
    if kind == "not an object":
        return draw(JSON_JUNK.filter(lambda v: not isinstance(v, dict)))
    body = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "start_from_hit_id": st.integers(0, INT64_MAX),
                "format": st.just("csv"),
            },
        )
    )
    if kind == "unknown field":
        body[draw(UNKNOWN_FIELD)] = draw(JSON_JUNK)
    elif kind == "too deep":
        body[draw(st.sampled_from(["start_from_hit_id", "format", "start_from_day"]))] = draw(DEEP)
    else:
        field, strategy = draw(
            st.sampled_from([("start_from_hit_id", BAD_HIT_ID), ("format", BAD_FORMAT), ("start_from_day", NOT_A_TIME)])
        )
        body[field] = draw(strategy)
    return body


def test_invalid_create_bodies_never_reach_goatcounter(rest: tuple[BaseSchema, RecordingProxy]) -> None:
    """Every kind of bad body the brief names, each many times: a 400 naming the problem, and nothing sent."""
    schema, proxy = rest
    create = operation(schema, "POST /v1/export")
    statuses: Counter[int] = Counter()
    answers: list[str] = []

    @FUZZ
    @given(body=invalid_bodies())
    def one(body: Any) -> None:
        before = len(proxy.requests)
        case = create.Case(body=body, media_type="application/json")
        response = case.call(base_url=BASE_URL, headers=JSON_BODY)
        statuses[response.status_code] += 1
        answers.append(response.text)
        assert response.status_code == 400, response.text[:300]
        assert "error" in response.json()
        assert proxy.requests[before:] == []
        case.validate_response(response, checks=REST_CHECKS[:-1], headers=JSON_BODY)

    one()
    LEAKS.output("the REST answers to fuzzing invalid create bodies", "\n".join(answers))
    report(f"REST POST /v1/export invalid bodies: {statuses.total()} requests (400: {statuses[400]}), 0 upstream calls")


def test_a_null_body_is_refused_before_goatcounter(rest: tuple[BaseSchema, RecordingProxy]) -> None:
    _, proxy = rest
    with schemathesis_asgi.get_client(operation(rest[0], "POST /v1/export").app) as client:
        before = len(proxy.requests)
        response = client.post(f"{BASE_URL}/v1/export", data=b"null", headers=JSON_BODY)
    assert response.status_code == 400, response.text
    assert [m for m, _, _ in proxy.requests[before:] if m == "POST"] == []


def test_a_create_without_a_body_is_answered_as_the_document_says(rest: tuple[BaseSchema, RecordingProxy]) -> None:
    schema, _ = rest
    case = operation(schema, "POST /v1/export").Case(body=NOT_SET)
    case.call_and_validate(base_url=BASE_URL, checks=[checks.status_code_conformance])


# -- 2. MCP tools, with generated arguments ------------------------------------------------------------------

MCP_TOOLS = ["create-csv-export", "get-export-info", "download-export", "export-pageviews", "pageview-stats"]


@dataclass
class McpTarget:
    runner: asyncio.Runner
    app: App
    tools: dict[str, dict[str, Any]]  # name -> published input schema
    proxy: RecordingProxy

    def call(self, name: str, arguments: dict[str, Any]) -> Any:
        async def once() -> Any:
            # raise_exceptions: an exception escaping the server surfaces here, as itself, instead of as an error
            async with Client(self.app.mcp_server(), raise_exceptions=True) as client:
                return await client.call_tool(name, arguments)

        return self.runner.run(once())


@pytest.fixture(scope="module")
def mcp(testbed: LocalGoatCounter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpTarget]:
    """The tools of an app built in process, over a proxy to the test bed, with a synced copy for pageview-stats."""
    with RecordingProxy(testbed.url) as proxy, asyncio.Runner() as runner:
        state = tmp_path_factory.mktemp("fuzz-mcp")
        synced = run_cli(["sync"], service_env(testbed, state, GOATCOUNTER_URL=proxy.url))
        assert synced.returncode == 0, synced.stderr
        app = build_app(load_default(), settings_for(proxy.url, testbed, state))
        runner.run(app.__aenter__())
        try:

            async def listed() -> dict[str, dict[str, Any]]:
                async with Client(app.mcp_server()) as client:
                    return {tool.name: dict(tool.input_schema) for tool in (await client.list_tools()).tools}

            yield McpTarget(runner, app, runner.run(listed()), proxy)
        finally:
            runner.run(app.__aexit__(None, None, None))


def conforms(value: Any, json_type: str | None) -> bool:
    """Whether a value has a JSON Schema type, strictly: an integer is no bool and no float (1.0 is refused)."""
    if json_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "object":
        return isinstance(value, dict)
    return True


LONG_TEXT = st.builds(lambda char, n: char * n, st.characters(), st.integers(1000, 200_000))


def valid_value(schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """A value a property's schema accepts (the kinds these tools publish)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "boolean":
        return st.booleans()
    if kind == "object":
        return valid_arguments(schema)
    if schema.get("format") == "date":
        return st.dates(date(2000, 1, 1), date(2100, 12, 31)).map(date.isoformat)
    if schema.get("format") == "date-time":
        moments = st.datetimes(datetime(2000, 1, 1), datetime(2100, 12, 31), timezones=st.just(UTC))
        return moments.map(lambda moment: moment.isoformat().replace("+00:00", "Z"))
    return st.text(max_size=min(schema.get("maxLength", 100), 100))


def invalid_value(schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """A value a property's schema refuses: of another type, out of range, not in the enum, too long, too deep."""
    kind = schema.get("type")
    options = [JSON_JUNK.filter(lambda v: not conforms(v, kind)), DEEP]
    if kind == "integer":
        options.append(st.floats(allow_nan=False, allow_infinity=False))
        if "minimum" in schema:
            options.append(st.integers(max_value=schema["minimum"] - 1))
        if "maximum" in schema:
            options.append(st.integers(min_value=schema["maximum"] + 1))
    if "enum" in schema:
        options += [st.text().filter(lambda v: v not in schema["enum"]), LONG_TEXT]
    elif kind == "string" and schema.get("format") in ("date", "date-time"):
        options += [NOT_A_TIME.filter(lambda v: isinstance(v, str)), st.just("2026-02-30"), LONG_TEXT]
    elif kind == "string" and "maxLength" in schema:
        options.append(LONG_TEXT.filter(lambda v: len(v) > schema["maxLength"]))
    if kind == "object" and schema.get("properties"):
        options.append(invalid_arguments(schema))
    return st.one_of(options)


def valid_arguments(schema: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {name: valid_value(properties[name]) for name in required},
        optional={name: valid_value(sub) for name, sub in properties.items() if name not in required},
    )


@st.composite
def invalid_arguments(draw: st.DrawFn, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Valid arguments, then one to three mutations that each make them invalid: a bad value, an unknown
    field, a required one left out."""
    properties = schema.get("properties", {})
    required = sorted(schema.get("required", []))
    arguments = dict(draw(valid_arguments(schema)))
    kinds = ["bad value", "unknown field", *(["missing"] if required else [])]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "bad value":
            name = draw(st.sampled_from(sorted(properties)))
            arguments[name] = draw(invalid_value(properties[name]))
        elif kind == "unknown field":
            arguments[draw(st.text(min_size=1).filter(lambda v: v not in properties))] = draw(JSON_JUNK)
        else:
            arguments.pop(draw(st.sampled_from(required)), None)
    return arguments


def test_the_fuzzed_tools_are_the_published_ones(mcp: McpTarget) -> None:
    assert sorted(mcp.tools) == sorted(MCP_TOOLS)


@pytest.mark.parametrize("tool", MCP_TOOLS)
def test_every_tool_answers_generated_arguments_with_a_result(mcp: McpTarget, tool: str) -> None:
    schema = mcp.tools[tool]
    tally: Counter[str] = Counter()
    texts: list[str] = []
    upstream_calls = 0

    @FUZZ
    @given(
        case=st.one_of(
            valid_arguments(schema).map(lambda arguments: (True, arguments)),
            invalid_arguments(schema).map(lambda arguments: (False, arguments)),
        )
    )
    def one(case: tuple[bool, dict[str, Any]]) -> None:
        nonlocal upstream_calls
        valid, arguments = case
        before = len(mcp.proxy.requests)
        result = mcp.call(tool, arguments)  # an exception here is the server failing: the test fails with it
        sent = mcp.proxy.requests[before:]
        upstream_calls += len(sent)
        text = result.content[0].text if result.content else ""
        texts.append(json.dumps(result.model_dump(mode="json")))  # every text, resource and structured value
        refused = result.is_error and text.startswith("Invalid arguments")
        tally[
            ("valid" if valid else "invalid") + (", refused" if refused else ", error" if result.is_error else "")
        ] += 1
        if not valid:
            assert refused, f"{tool} {arguments!r:.300}: {text[:300]}"
            assert sent == [], f"{tool} sent {[(m, p) for m, p, _ in sent]} for invalid arguments"
        elif refused:  # valid to the schema, refused by what the server knows: still before any create
            assert [p for m, p, _ in sent if m == "POST"] == [], text[:300]

    one()
    LEAKS.output(f"the MCP results of fuzzing {tool}", "\n".join(texts))
    shown = ", ".join(f"{what}: {n}" for what, n in sorted(tally.items()))
    report(f"MCP {tool}: {tally.total()} calls ({shown}), {upstream_calls} upstream calls, 0 crashes")


def test_a_refusal_that_says_nothing_was_sent_sent_nothing(mcp: McpTarget) -> None:
    created = mcp.call("create-csv-export", {})
    export_id = created.structured_content["id"]
    for _ in range(100):
        if mcp.call("get-export-info", {"id": export_id}).structured_content["state"] == "finished":
            break
        time.sleep(0.2)
    before = len(mcp.proxy.requests)
    result = mcp.call("download-export", {"id": export_id, "table": "paths"})
    sent = [(method, path) for method, path, _ in mcp.proxy.requests[before:]]
    assert result.is_error and "it has no tables" in result.content[0].text
    assert "Nothing was sent" not in result.content[0].text or sent == []


def test_a_timed_out_create_is_found_on_a_site_with_many_exports(tmp_path: Path) -> None:
    """What the fuzzers' hundred exports did to test_hardening's timed-out create, on a test bed of its own."""
    with LocalGoatCounter(goatcounter_binary(), tmp_path / "gc") as site:
        for _ in range(6):  # exports made before this installation's first (or by another one)
            assert site.request("POST", "/api/v0/export", key=site.export_key, body={}).status == 202
        port = int(site.url.rsplit(":", 1)[1])
        with SlowAnswers(port, delay=2.5) as slow, RecordingProxy(slow.url) as proxy:
            settings = Settings(
                site_url=proxy.url, secrets={KEY: site.export_key}, state_dir=tmp_path / "state", read_timeout=1.0
            )
            app = build_app(load_default(), settings)

            async def scenario() -> tuple[httpx.Response, httpx.Response]:
                async with app:
                    transport = httpx.ASGITransport(app=app.rest_app())
                    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=60) as client:
                        key = {"Idempotency-Key": "timed-out-once"}
                        first = await client.post("/v1/export", json={"start_from_hit_id": 3}, headers=key)
                        await asyncio.sleep(3)  # the key's try is over: its outcome is unknown, not in flight
                        retry = await client.post("/v1/export", json={"start_from_hit_id": 3}, headers=key)
                        return first, retry

            first, retry = asyncio.run(scenario())
    assert first.status_code == 504
    assert retry.status_code == 202 and retry.headers.get("idempotent-replayed") == "true", retry.text
    assert proxy.paths("POST") == ["/api/v0/export"]  # one create, ever


# -- 3. the export file reader ----------------------------------------------------------------------------------

# GoatCounter's CSV export, format version 2
HEADER = (
    "2Path,Title,Event,UserAgent,Browser,System,Session,Bot,Referrer,Referrer scheme,"
    "Screen size,Location,FirstVisit,Date"
)
# CSV text made of the characters that matter to a CSV reader ("\r" too: a line may end with it, as in a file
# opened with newline=""); fields stay far below csv's 131072-character limit (a test of its own goes past it).
CSV_TEXT = st.text(alphabet=st.sampled_from('a,"\n\r \t\x00é/\\'), max_size=300)
CSV_FILES = st.one_of(CSV_TEXT, CSV_TEXT.map(lambda body: f"{HEADER}\n{body}"), st.just(""))
PIECES = st.lists(st.integers(1, 64), min_size=1, max_size=8)  # how the download arrives, in chunks of these sizes


def chopped(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces, at, turn = [], 0, 0
    while at < len(data):
        size = sizes[turn % len(sizes)]
        pieces.append(data[at : at + size])
        at, turn = at + size, turn + 1
    return pieces


class Download:
    """What ExportFile reads: a response's headers and its body in chunks."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.headers: dict[str, str] = {}
        self.pieces = pieces

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def export_of(data: bytes, *, right_hash: bool = True, export_format: str = "csv") -> Export:
    digest = hashlib.sha256(data if right_hash else data + b"x").hexdigest()
    return Export({"id": 7, "format": export_format, "finished_at": "2026-11-20T00:00:00Z", "hash": f"sha256-{digest}"})


def stream_records(data: bytes, sizes: list[int], *, right_hash: bool = True) -> list[list[str]]:
    async def read() -> list[list[str]]:
        file = ExportFile(export_of(data, right_hash=right_hash), Download(chopped(data, sizes)), no_progress)  # type: ignore[arg-type]
        return [record async for record in file.records()]

    return asyncio.run(read())


def local_records(tmp: Path, data: bytes) -> list[list[str]]:
    path = tmp / "export.csv.gz"
    path.write_bytes(data)
    return list(LocalExport(export_of(data), path).csv_records())


def damaged(data: bytes, how: str, where: int, junk: bytes) -> bytes:
    if not data:
        return junk
    at = where % len(data)
    if how == "truncated":
        return data[:at]
    if how == "flipped":
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    if how == "junk inserted":
        return data[:at] + junk + data[at:]
    return data + junk  # junk appended


DAMAGE = st.tuples(
    st.sampled_from(["truncated", "flipped", "junk inserted", "junk appended"]),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=40),
)


PARSED: dict[str, Counter[str]] = {}  # parser target -> outcome -> inputs


def parsed(target: str, outcome: str) -> None:
    PARSED.setdefault(target, Counter())[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def report_the_parsers() -> Iterator[None]:
    yield
    for target, outcomes in PARSED.items():
        shown = ", ".join(f"{what}: {n}" for what, n in sorted(outcomes.items()))
        report(f"parser {target}: {outcomes.total()} inputs ({shown}), 0 other exceptions")


@pytest.mark.fast
@FUZZ
@given(
    header=st.builds(
        lambda first, rest: [first, *rest],
        st.one_of(st.text(max_size=20), st.from_regex(r"\A[0-9]{0,3}[A-Za-z ]{0,8}\Z"), st.just("2Path")),
        st.lists(st.text(max_size=20), max_size=5),
    )
    | st.just([])
)
def test_split_header_reads_version_2_or_refuses(header: list[str]) -> None:
    try:
        version, columns = split_header(header)
    except IntegrityError:
        parsed("split_header", "IntegrityError")
        assert not header or not header[0] or not header[0].startswith("2") or header[0][1:2].isdigit()
        return
    parsed("split_header", "version 2")
    assert version == "2" and columns == [header[0][1:], *header[1:]]


@pytest.mark.fast
@FUZZ
@given(text=CSV_TEXT, sizes=PIECES)
def test_the_streamed_records_do_not_depend_on_where_the_pieces_end(text: str, sizes: list[int]) -> None:
    """A quoted field may span lines and pieces of the download: the records are the file's, wherever the pieces
    end (a stored gzip, so the CSV arrives in pieces as small as the download's; `RecordStream` and its successor
    are read through here, as the download reads them)."""
    data = gzip.compress(text.encode(), compresslevel=0, mtime=0)
    assert stream_records(data, sizes) == list(csv.reader(io.StringIO(text, newline="")))
    parsed("ExportFile.records, in pieces", "the file's records")


@pytest.mark.fast
@FUZZ
@given(content=st.binary(max_size=2000), sizes=PIECES, damage=DAMAGE, intact=st.sampled_from([True, False]))
def test_gunzip_inflates_a_gzip_stream_or_refuses_it(
    content: bytes, sizes: list[int], damage: tuple[str, int, bytes], intact: bool
) -> None:
    packed = gzip.compress(content, mtime=0)
    data = packed if intact else damaged(packed, *damage)

    async def inflate() -> bytes:
        async def chunks() -> AsyncIterator[bytes]:
            for piece in chopped(data, sizes):
                yield piece

        return b"".join([piece async for piece in gunzip(chunks(), piece=97)])

    try:
        out = asyncio.run(inflate())
    except IntegrityError:
        parsed("gunzip", "IntegrityError")
        assert not intact
        return
    parsed("gunzip", "inflated" if intact else "damaged, inflated")
    assert out == content or not intact  # a damaged copy may still inflate (junk after the end is not read)


@pytest.mark.fast
@FUZZ
@given(
    text=CSV_FILES,
    sizes=PIECES,
    damage=DAMAGE,
    case=st.sampled_from(["intact", "damaged", "random bytes", "not utf-8", "wrong hash"]),
    junk=st.binary(max_size=300),
)
def test_both_csv_readers_give_the_same_records_or_an_integrity_error(
    tmp_path_factory: pytest.TempPathFactory,
    text: str,
    sizes: list[int],
    damage: tuple[str, int, bytes],
    case: str,
    junk: bytes,
) -> None:
    """`ExportFile.records` (the download, as it streams) and `LocalExport.csv_records` (the verified copy)."""
    data = {
        "intact": gzip.compress(text.encode(), mtime=0),
        "damaged": damaged(gzip.compress(text.encode(), mtime=0), *damage),
        "random bytes": junk,
        "not utf-8": gzip.compress(text.encode() + b"\xff\xfe\xc3(", mtime=0),
        "wrong hash": gzip.compress(text.encode(), mtime=0),
    }[case]
    outcomes = []
    for read in (
        lambda: stream_records(data, sizes, right_hash=case != "wrong hash"),
        lambda: local_records(tmp_path_factory.mktemp("csv"), data),
    ):
        try:
            outcomes.append(read())
        except IntegrityError:
            outcomes.append(None)
    for reader, outcome in zip(("ExportFile.records", "LocalExport.csv_records"), outcomes, strict=True):
        parsed(reader, f"{case}: {'IntegrityError' if outcome is None else 'records'}")
    local = LocalExport(export_of(data), tmp_path_factory.mktemp("csv") / "export.csv.gz")
    local.path.write_bytes(data)
    try:
        page = exportfile._page(local, 1, 5, None)  # the page MCP's download-export reads
        parsed("a page of a CSV export", "rows")
        assert outcomes[1] is not None and page.rows == outcomes[1][2:7]
    except IntegrityError:
        parsed("a page of a CSV export", "IntegrityError")
    with pytest.raises(InputError):  # a table, of a CSV export
        exportfile._page(local, 0, 5, "paths")
    if case == "intact":
        assert outcomes[0] == outcomes[1] == list(csv.reader(io.StringIO(text, newline="")))
    elif case in ("not utf-8", "wrong hash"):
        assert outcomes[0] is None
    if outcomes[0] is not None and outcomes[1] is not None:
        assert outcomes[0] == outcomes[1]


def zip_of(members: Mapping[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, content in members.items():
            archive.writestr(zipfile.ZipInfo(name, (2026, 11, 20, 0, 0, 0)), content, compress_type=method)
    return buffer.getvalue()


def data_regions(data: bytes) -> list[tuple[int, int]]:
    """Where each member's (compressed) bytes lie in a ZIP: damage there, and not in its headers."""
    regions = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_length, extra_length = (
                int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
                int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
            )
            start = info.header_offset + 30 + name_length + extra_length
            regions.append((start, start + info.compress_size))
    return regions


JSON_ROW = st.dictionaries(
    st.sampled_from(["id", "path", "hour", "path_id", "ref_id", "count", "day", "x"]), JSON_SCALARS, max_size=5
)
JSONL_LINE = st.one_of(
    JSON_ROW.map(lambda row: json.dumps(row).encode()),
    JSON_JUNK.map(lambda value: json.dumps(value).encode()),  # arrays, numbers, strings: not objects
    st.binary(max_size=30),  # not JSON, not UTF-8
    st.just(b""),
)
TABLE_NAMES = [*JSON_TABLES, "notes", "hit_stats.jsonl.bak"]
INFO = st.one_of(
    st.builds(
        lambda v: json.dumps({"export_version": v}).encode(), st.sampled_from(["1", "1.0", "1.2", "2.0", "", "x"])
    ),
    st.builds(lambda v: json.dumps({"export_version": v}).encode(), JSON_SCALARS),
    JSON_JUNK.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=40),
)


@st.composite
def json_exports(draw: st.DrawFn) -> bytes:
    """A JSON export ZIP: every table or some, junk members, info.json good or bad, lines good or bad; then, maybe,
    damaged: in a member's bytes, cut short, or with junk around it. (Damage to its headers: a test of its own.)"""
    folder = draw(st.sampled_from(["", "goatcounter-export-x/"]))
    members: dict[str, bytes] = {}
    if draw(st.booleans()):
        members[folder + "info.json"] = draw(INFO)
    for table in draw(st.lists(st.sampled_from(TABLE_NAMES), unique=True, max_size=len(TABLE_NAMES))):
        members[f"{folder}{table}.jsonl"] = b"\n".join(draw(st.lists(JSONL_LINE, max_size=6)))
    if draw(st.booleans()):
        members[draw(st.text(min_size=1, max_size=20))] = draw(st.binary(max_size=50))
    data = zip_of(members, draw(st.sampled_from([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])))
    how = draw(st.sampled_from(["intact", "member bytes", "truncated", "junk before", "junk after", "random"]))
    regions = [(start, end) for start, end in data_regions(data) if end > start]
    if how == "member bytes" and regions:
        start, end = draw(st.sampled_from(regions))
        at = draw(st.integers(start, end - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif how == "truncated":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "junk before":
        data = draw(st.binary(min_size=1, max_size=50)) + data
    elif how == "junk after":
        data = data + draw(st.binary(min_size=1, max_size=50))
    elif how == "random":
        data = draw(st.binary(max_size=500))
    return data


def complete_export() -> dict[str, bytes]:
    members = {"x/info.json": b'{"export_version": "1.0"}'}
    members.update({f"x/{table}.jsonl": b'{"id": 1, "count": 2}\n' for table in [*DIMENSION_TABLES, *STATS_TABLES]})
    return members


def local_zip(tmp: Path, data: bytes) -> LocalExport:
    path = tmp / "export.zip"
    path.write_bytes(data)
    return LocalExport(export_of(data, export_format="json"), path)


@pytest.mark.fast
@FUZZ
@given(
    data=st.one_of(json_exports(), st.just(zip_of(complete_export()))),
    table=st.sampled_from([*JSON_TABLES, "nope"]),
    offset=st.integers(0, 10),
    limit=st.integers(1, 10),
)
def test_the_json_export_reader_gives_rows_or_an_integrity_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, table: str, offset: int, limit: int
) -> None:
    """`LocalExport.info`, `.tables` and `.rows`, and the page MCP's download-export reads from them, which may
    also answer InputError: for a table the export does not have (said in its docstring and the tool's)."""
    local = local_zip(tmp_path_factory.mktemp("zip"), data)
    refused = 0
    for read in (local.info, local.tables, lambda: list(local.rows(table))):
        try:
            read()
        except IntegrityError:  # anything else fails the test
            refused += 1
    parsed("LocalExport.info, .tables, .rows", f"{3 - refused} of 3 read" if refused < 3 else "IntegrityError")
    try:
        page = exportfile._page(local, offset, limit, table)
    except IntegrityError:
        parsed("a page of a JSON export", "IntegrityError")
    except InputError as exc:
        assert exc.field == "table" and table not in local.tables()
        parsed("a page of a JSON export", "InputError: no such table")
    else:
        assert page.table == table and len(page.rows) <= limit and page.offset == offset
        parsed("a page of a JSON export", "rows")


# The bugs the fuzzers found, one test each (the fuzzers' inputs leave these out, as said above).

DEEP_JSON = b"[" * 100_000


@pytest.mark.fast
@pytest.mark.parametrize("member", ["info.json", "hit_stats.jsonl"])
def test_a_json_export_nested_too_deeply_is_an_integrity_error(tmp_path: Path, member: str) -> None:
    members = complete_export()
    members[f"x/{member}"] = DEEP_JSON + b"\n"
    local = local_zip(tmp_path, zip_of(members))
    with pytest.raises(IntegrityError):
        local.info()
        list(local.rows("hit_stats"))


def with_headers(data: bytes, *, method: int | None = None, flags: int = 0, version: int | None = None) -> bytes:
    """The ZIP with, in every member's local and central header alike, the compression method or the version
    needed to extract replaced, or general-purpose flags added: what a damaged or hostile file may say."""
    damaged_zip = bytearray(data)
    # signature, then the offsets of: version needed, flags, method
    for signature, version_at, flag_at, method_at in ((b"PK\x03\x04", 4, 6, 8), (b"PK\x01\x02", 6, 8, 10)):
        at = damaged_zip.find(signature)
        while at >= 0:
            damaged_zip[at + flag_at : at + flag_at + 2] = (
                int.from_bytes(damaged_zip[at + flag_at : at + flag_at + 2], "little") | flags
            ).to_bytes(2, "little")
            if method is not None:
                damaged_zip[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
            if version is not None:
                damaged_zip[at + version_at : at + version_at + 2] = version.to_bytes(2, "little")
            at = damaged_zip.find(signature, at + 4)
    return bytes(damaged_zip)


HEADER_DAMAGE = {  # each found by flipping header bytes of a good export; all refused with another exception
    "compression method 99 (AES)": lambda data: with_headers(data, method=99),  # NotImplementedError
    "bzip2 named, deflate inside": lambda data: with_headers(data, method=12),  # OSError: Invalid data stream
    "needs zip version 9.9": lambda data: with_headers(data, version=99),  # NotImplementedError
    "encrypted": lambda data: with_headers(data, flags=0x1),  # RuntimeError: password required
    "a UTF-8 name that is not UTF-8": lambda data: with_headers(  # UnicodeDecodeError, from zipfile.ZipFile()
        data.replace(b"x/info.json", b"x/inf\xff.json"), flags=0x800
    ),
}


@pytest.mark.fast
@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_a_json_export_zip_it_cannot_open_is_an_integrity_error(tmp_path: Path, damage: str) -> None:
    local = local_zip(tmp_path, HEADER_DAMAGE[damage](zip_of(complete_export())))
    for read in (local.info, local.tables, lambda: list(local.rows("hit_stats"))):
        with pytest.raises(IntegrityError):
            read()


@pytest.mark.fast
@pytest.mark.parametrize("reader", ["ExportFile.records", "LocalExport.csv_records"])
def test_a_csv_field_past_the_csv_limit_is_read_or_an_integrity_error(tmp_path: Path, reader: str) -> None:
    data = gzip.compress(f"{HEADER}\n/{'a' * 200_000},title\n".encode(), mtime=0)
    try:
        records = stream_records(data, [65536]) if reader == "ExportFile.records" else local_records(tmp_path, data)
    except IntegrityError:
        return
    assert records[1][0] == "/" + "a" * 200_000


@pytest.mark.fast
def test_a_bare_carriage_return_is_read_alike_by_both_csv_readers(tmp_path: Path) -> None:
    """Found by the fuzzer: the streamed reader once split lines at "\n" only and raised csv's own error for a
    "\r" in an unquoted field, which the local copy's reader takes for a line end."""
    data = gzip.compress(f"{HEADER}\n/a\rb,title\n".encode(), mtime=0)
    assert stream_records(data, [65536]) == local_records(tmp_path, data) == [HEADER.split(","), ["/a"], ["b", "title"]]


# -- 4. the key-leak check's own tests -----------------------------------------------------------------------------

PLANTED = "planted-secret-0123456789"


@pytest.mark.fast
def test_the_leak_check_finds_a_planted_secret_and_names_its_owner_not_the_secret(tmp_path: Path) -> None:
    """A LeakCheck of its own (the session's is left alone, so the session does not fail)."""
    check = LeakCheck()
    check.secret(PLANTED, "planted key of this test")
    check.secret("short", "a value too short to search for")
    state = tmp_path / "state"
    (state / "exports").mkdir(parents=True)
    (state / "state.sqlite3").write_bytes(b"SQLite format 3\x00" + b"\x00" * 5000 + PLANTED.encode() + b"\x01")
    (state / "exports" / "1.csv.gz").write_bytes(gzip.compress(b"clean"))
    big = state / "big.bin"  # the secret across the scanner's piece boundary
    big.write_bytes(b"\x00" * (1024 * 1024 - 10) + PLANTED.encode())
    goatcounter = state / "gc"  # GoatCounter's own database holds the keys by design: never scanned
    goatcounter.mkdir()
    (goatcounter / "db.sqlite3").write_bytes(PLANTED.encode())
    check.ignore(goatcounter)
    database = tmp_path / "copy.sqlite3"
    database.write_bytes(b"clean")
    (tmp_path / "copy.sqlite3-wal").write_bytes(PLANTED.encode())
    check.watch(state, "a state directory")
    check.watch(database, "a database")
    check.output("the output of a clean run", "nothing to see")
    check.output("the output of a leaky run", lambda: f"error: Bearer {PLANTED} refused")
    leaks = check.scan()
    assert sorted(leaks, key=str) == sorted(
        [
            Leak("planted key of this test", str(state / "state.sqlite3")),
            Leak("planted key of this test", str(big)),
            Leak("planted key of this test", str(tmp_path / "copy.sqlite3-wal")),
            Leak("planted key of this test", "the output of a leaky run"),
        ],
        key=str,
    )
    assert all(PLANTED not in str(leak) for leak in leaks)
    assert str(leaks[0]).startswith("the planted key of this test appears in ")
    assert check.scanned_files == 5


def test_the_session_check_knows_every_goatcounter_key_and_what_each_run_was_given(
    goatcounter: LocalGoatCounter, tmp_path: Path
) -> None:
    """The wiring: conftest registered the test bed's keys when it started; run_cli registers what it runs."""
    for name in ("export_key", "noexport_key", "siteread_key"):
        assert LEAKS.secrets[getattr(goatcounter.site, name)].startswith(f"{name} of site 127.0.0.1 ")
    assert any(goatcounter.workdir == ignored for ignored in LEAKS.ignored)
    token, state = "a-token-given-to-serve-0123", tmp_path / "state"
    env = {"GOATCOUNTER_EXPORTS_STATE_DIR": str(state), "GOATCOUNTER_EXPORTS_DB": str(tmp_path / "db.sqlite3")}
    outputs = len(LEAKS.outputs)
    run_cli(["export", "--help", "-o", str(tmp_path / "out.csv"), f"--auth-token={token}"], env)
    assert LEAKS.secrets[token].startswith("--auth-token given to `goatcounter-exports export` run by tests/")
    assert len(LEAKS.outputs) == outputs + 2  # its stdout and stderr
    assert {state, tmp_path / "db.sqlite3", tmp_path / "out.csv"} <= set(LEAKS.places)
