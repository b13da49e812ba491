"""The runtime: turns an adapter's call of a binding into an upstream request, and back.

Adapters hand it raw inputs (path and query strings, tool arguments); it validates
them against the binding's input schema, resolves `with`, fills the path, adds
authentication from the spec's binds, lets extensions adjust the request, and
sends it through the one `UpstreamClient`. It knows nothing of Starlette, MCP or
GoatCounter: API-specific knowledge of the request path arrives as `Extension`s,
each for one consumed namespace. Adapters have hooks of their own (adapters/).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from .errors import ConfigError, GoatcounterExportsError, UpstreamError
from .spec import expressions as ex
from .spec.models import Authentication, OutputParameter, Spec
from .spec.resolve import AdapterInput, AdapterKind, Binding, Target, resolve
from .upstream import UpstreamClient, UpstreamRequest, UpstreamResponse
from .validation import Validator

JSON_TYPES = {"string", "number", "integer", "boolean", "array", "object"}
MEMO_TYPES = (str, int, bool, type(None))  # inputs of only these (and few) are remembered once valid
MEMO_FIELDS = 8
MEMO_SIZE = 4096


@dataclass(frozen=True)
class CallContext:
    """What an adapter knows about a call beyond its inputs."""

    idempotency_key: str | None = None


class Extension(Protocol):
    """Knowledge of one consumed API on the request path (see goatcounter.profile)."""

    def input_schema(self, binding: Binding, adapter_input: AdapterInput) -> dict[str, Any] | None:
        """Extra JSON Schema for one input (ranges, body fields), or None."""

    async def prepare(
        self, runtime: Runtime, target: Target, request: UpstreamRequest, context: CallContext
    ) -> UpstreamRequest | UpstreamResponse:
        """The request to send, adjusted (may ask the upstream first, e.g. its version); or an answer
        made here instead of sending it (a local 429, an idempotent replay)."""

    async def observe(
        self,
        runtime: Runtime,
        target: Target,
        request: UpstreamRequest,
        response: UpstreamResponse,
        context: CallContext,
    ) -> None:
        """Look at an upstream answer before the adapter gets it (e.g. to record rate-limit headers)."""

    async def failed(
        self,
        runtime: Runtime,
        target: Target,
        request: UpstreamRequest,
        error: GoatcounterExportsError,
        context: CallContext,
    ) -> None:
        """Learn that a request got no answer (unreachable, timed out): did it happen upstream or not?"""


# Told of every upstream answer: (operation, status, seconds to its headers). The app feeds its metrics.
Observer = Callable[[str, int, float], None]


def check_secret(name: str, value: str | None, binding: str) -> str:
    """A bound variable's value, refused at start when it is missing or could not be sent in a header."""
    if not value:
        raise ConfigError(
            f"{name} is not set: the capability binds it as {binding}; set it first, e.g. `export {name}=...`"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{name} contains a control character (a pasted newline?); set it again without it")
    return value


class Runtime:
    def __init__(
        self,
        spec: Spec,
        *,
        client: UpstreamClient,
        secrets: Mapping[str, str],
        base_uris: Mapping[str, str] | None = None,
        extensions: Mapping[str, Sequence[Extension]] | None = None,
        observer: Observer | None = None,
    ) -> None:
        """`secrets` holds the bound variables' values (a missing one is a ConfigError here, at start);
        `base_uris` overrides a consumed namespace's `baseUri`; `extensions` are keyed by namespace."""
        self.spec = spec
        self.client = client
        self.observer = observer
        self.resolution = resolve(spec)
        self._extensions = {namespace: tuple(found) for namespace, found in (extensions or {}).items()}
        self._schemas: dict[tuple[str, str], dict[str, Any]] = {}
        self._validators: dict[tuple[str, str], Validator] = {}
        self._valid: dict[tuple[object, ...], dict[str, Any]] = {}  # inputs that passed (validate's memo)
        overrides = base_uris or {}
        self._base_uris = {
            c.namespace: (overrides.get(c.namespace) or c.base_uri).rstrip("/") for c in spec.capability.consumes
        }
        # Templates look here on every request: bind namespace -> variable -> value, resolved once.
        self._binds = {
            bind.namespace: {
                variable: check_secret(name, secrets.get(name), f"{bind.namespace}.{variable}")
                for variable, name in bind.keys.items()
            }
            for bind in spec.all_binds
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        await self.client.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    # -- bindings --------------------------------------------------------------------------

    def bindings(self, kind: AdapterKind, namespace: str | None = None) -> list[Binding]:
        return [
            b for b in self.resolution.bindings if b.kind == kind and (namespace is None or b.namespace == namespace)
        ]

    def base_uri(self, namespace: str) -> str:
        return self._base_uris[namespace]

    def extensions(self, namespace: str) -> tuple[Extension, ...]:
        return self._extensions.get(namespace, ())

    def input_schema(self, binding: Binding) -> dict[str, Any]:
        """The JSON Schema of a binding's inputs, as adapters publish and validate them."""
        key = (binding.namespace, binding.name)
        if key not in self._schemas:
            properties: dict[str, Any] = {}
            for item in binding.inputs:
                schema: dict[str, Any] = {"type": item.type} if item.type in JSON_TYPES else {}
                if item.description:
                    schema["description"] = item.description
                for extension in self.extensions(binding.target.consumes.namespace):
                    schema.update(extension.input_schema(binding, item) or {})
                properties[item.name] = schema
            self._schemas[key] = {
                "type": "object",
                "properties": properties,
                "required": [i.name for i in binding.inputs if i.required],
                "additionalProperties": False,
            }
        return self._schemas[key]

    def validate(self, binding: Binding, raw: Mapping[str, Any], *, from_strings: bool = False) -> dict[str, Any]:
        """Check (and, for values that arrived as text, convert) inputs. Raises InputError.

        Inputs of a few plain values (a path's `id`, a query's text) that passed once pass again without being
        checked again: they are remembered (MEMO_SIZE of them, the oldest forgotten first)."""
        memo = None
        if len(raw) <= MEMO_FIELDS and all(type(v) in MEMO_TYPES for v in raw.values()):
            memo = (binding.namespace, binding.name, from_strings, tuple(sorted(raw.items())))
            known = self._valid.get(memo)
            if known is not None:
                return dict(known)
        values = self._validate(binding, raw, from_strings)
        if memo is not None and all(type(v) in (*MEMO_TYPES, float) for v in values.values()):  # nothing shared
            if len(self._valid) >= MEMO_SIZE:
                self._valid.pop(next(iter(self._valid)))
            self._valid[memo] = dict(values)
        return values

    def _validate(self, binding: Binding, raw: Mapping[str, Any], from_strings: bool) -> dict[str, Any]:
        values = dict(raw)
        if from_strings:
            for item in binding.inputs:
                if isinstance(values.get(item.name), str) and item.location != "body":
                    values[item.name] = _from_text(values[item.name], item)
        key = (binding.namespace, binding.name)
        validator = self._validators.get(key)
        if validator is None:
            validator = self._validators[key] = Validator(self.input_schema(binding))
        validator.check(values)
        return values

    # -- calling ---------------------------------------------------------------------------

    def resolve_with(self, binding: Binding, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The consumed operation's input values, from the binding's `with` and the adapter inputs."""
        values: dict[str, Any] = {}
        for name, source in binding.sources.items():
            if isinstance(source, ex.InputRef):
                if source.name in inputs and inputs[source.name] is not None:
                    values[name] = inputs[source.name]
            elif isinstance(source, ex.Template):
                values[name] = self._render(source.text, inputs, binding)
            else:
                values[name] = source.value
        return values

    def build_request(self, target: Target, values: Mapping[str, Any]) -> UpstreamRequest:
        """Fill the consumed path, query, headers and body from `values`, and add authentication."""
        values = {
            **{p.name: self._render(p.value, values, None) for p in target.inputs if p.value is not None},
            **values,
        }
        path_values: dict[str, str] = {}
        params: list[tuple[str, str]] = []
        headers: dict[str, str] = {}
        body: bytes | None = None
        for name, value in values.items():
            declared = target.input(name)
            location = declared.location if declared and declared.location else "path"
            if name in ex.path_placeholders(target.path):
                location = "path"
            if location == "path":
                path_values[name] = quote(_as_text(value), safe="")
            elif location == "query":
                params.append((name, _as_text(value)))
            elif location == "header":
                headers[name] = _as_text(value)
            elif location == "body":
                body = json.dumps(value, separators=(",", ":")).encode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers.setdefault("Accept", "application/json, */*;q=0.5")
        url = self.base_uri(target.consumes.namespace) + ex.fill_path(target.path, path_values)
        auth = target.consumes.authentication
        if auth is not None:
            self._apply_auth(auth, headers, params)
        return UpstreamRequest(target.method, url, tuple(params), headers, body)

    def request_to(
        self, namespace: str, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> UpstreamRequest:
        """A request to a path of a consumed API that the spec does not declare (an extension's own probe),
        with the namespace's base URI and authentication."""
        consumes = next(c for c in self.spec.capability.consumes if c.namespace == namespace)
        all_headers = {"Accept": "application/json, */*;q=0.5", **(headers or {})}
        params: list[tuple[str, str]] = []
        if consumes.authentication is not None:
            self._apply_auth(consumes.authentication, all_headers, params)
        return UpstreamRequest(method, self.base_uri(namespace) + path, tuple(params), all_headers)

    @asynccontextmanager
    async def call(
        self,
        binding: Binding,
        raw: Mapping[str, Any],
        *,
        from_strings: bool = False,
        context: CallContext = CallContext(),
    ) -> AsyncIterator[UpstreamResponse]:
        """Validate, then send; yield the upstream response with its body unread."""
        inputs = self.validate(binding, raw, from_strings=from_strings)
        async with self.send(binding, inputs, context) as response:
            yield response

    @asynccontextmanager
    async def send(
        self, binding: Binding, inputs: Mapping[str, Any], context: CallContext = CallContext()
    ) -> AsyncIterator[UpstreamResponse]:
        """Send inputs an adapter has already validated against `input_schema` (or a schema built on it)."""
        async with self.call_target(binding.target, self.resolve_with(binding, inputs), context) as response:
            yield response

    @asynccontextmanager
    async def call_target(
        self,
        target: Target,
        values: Mapping[str, Any],
        context: CallContext = CallContext(),
    ) -> AsyncIterator[UpstreamResponse]:
        """Call a consumed operation with its own input values (workflows use this)."""
        request = self.build_request(target, values)
        extensions = self.extensions(target.consumes.namespace)
        for extension in extensions:
            prepared = await extension.prepare(self, target, request, context)
            if isinstance(prepared, UpstreamResponse):  # answered here, nothing sent
                yield prepared
                return
            request = prepared
        started = time.monotonic()
        try:
            async with self.client.stream(request) as response:
                if self.observer is not None:
                    self.observer(target.ref, response.status, time.monotonic() - started)
                for extension in extensions:
                    await extension.observe(self, target, request, response, context)
                yield response
        except UpstreamError as error:
            for extension in extensions:
                await extension.failed(self, target, request, error, context)
            raise

    def map_output(self, outputs: Sequence[OutputParameter], document: Any) -> Any:
        """Apply a binding's output mapping to a JSON answer (`$.` alone returns it whole)."""
        if not outputs:
            return document
        if len(outputs) == 1 and not outputs[0].name:
            return _map_one(outputs[0], document)
        return {o.name or f"output{i}": _map_one(o, document) for i, o in enumerate(outputs)}

    # -- internals -------------------------------------------------------------------------

    def _lookup(self, name: str, inputs: Mapping[str, Any], binding: Binding | None) -> str:
        binds = self._binds
        namespaces = {*binds, "rest", "tools", *([binding.namespace] if binding else [])}
        namespace, variable = ex.split_dotted(name, namespaces)
        if namespace in binds or namespace is None:
            for bind_ns, values in binds.items():
                if namespace in (None, bind_ns) and variable in values:
                    return values[variable]
        if variable in inputs:
            return _as_text(inputs[variable])
        return ""

    def render_secret(self, text: str) -> str:
        """A `{{env.NAME}}` template (or plain text) rendered from the binds: an exposed adapter's credential."""
        return self._render(text, {}, None)

    def _render(self, text: str, inputs: Mapping[str, Any], binding: Binding | None) -> str:
        return ex.render(text, lambda name: self._lookup(name, inputs, binding))

    def _apply_auth(self, auth: Authentication, headers: dict[str, str], params: list[tuple[str, str]]) -> None:
        def render(text: str | None) -> str:
            return self._render(text or "", {}, None)

        if auth.type == "bearer":
            headers["Authorization"] = f"Bearer {render(auth.token)}"
        elif auth.type == "basic":
            pair = f"{render(auth.username)}:{render(auth.password)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        elif auth.type == "apikey":
            name, value = auth.key or "X-Api-Key", render(auth.value)
            if auth.placement == "query":
                params.append((name, value))
            else:
                headers[name] = value


def _map_one(output: OutputParameter, document: Any) -> Any:
    if output.value is not None and output.mapping is None and not output.value.startswith("$"):
        return output.value  # a static value
    if output.properties:
        return {name: _map_one(child, document) for name, child in output.properties.items()}
    return ex.jsonpath_get(document, output.mapping or output.value or "$")


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _from_text(text: str, item: AdapterInput) -> Any:
    """Convert a path/query/header string to its declared type; leave it as is when it does not parse."""
    try:
        if item.type == "integer" and text.strip().lstrip("+-").isdigit():
            return int(text)
        if item.type == "number":
            return float(text)
        if item.type == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if item.type in ("object", "array"):
            return json.loads(text)
    except ValueError:
        pass
    return text
