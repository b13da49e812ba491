"""The runtime: turns an adapter's call of a binding into an upstream request, and back.

Adapters hand it raw inputs (path and query strings, tool arguments); it validates
them against the binding's input schema, resolves `with`, fills the path, adds
authentication from the spec's binds, lets extensions adjust the request, and
sends it through the one `UpstreamClient`. It knows nothing of Starlette, MCP or
GoatCounter: API-specific knowledge arrives as `Extension` objects.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import jsonschema

from .errors import ConfigError, InputError
from .settings import Settings
from .spec import expressions as ex
from .spec.models import Authentication, Consumes, OutputParameter, Spec
from .spec.resolve import AdapterInput, AdapterKind, Binding, Target, resolve
from .upstream import UpstreamClient, UpstreamRequest, UpstreamResponse

if TYPE_CHECKING:
    from .errors import ApiError
    from .outcome import ExtraTool, Outcome, ToolSchema

JSON_TYPES = {"string", "number", "integer", "boolean", "array", "object"}


@dataclass(frozen=True)
class CallContext:
    """What an adapter knows about a call beyond its inputs."""

    idempotency_key: str | None = None


class Answered(Exception):
    """Raised by an extension's `prepare` to answer a call itself (a local 429, an idempotent replay)."""

    def __init__(self, status: int, document: Any, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.document = document
        self.headers = dict(headers or {})
        super().__init__(status)


class Extension(Protocol):
    """API-specific knowledge plugged into the generic runtime (see goatcounter.profile)."""

    def base_uri(self, consumes: Consumes, settings: Settings) -> str | None:
        """A base URI for this consumed API from settings, or None to leave it to the generic rules."""

    def input_schema(self, binding: Binding, adapter_input: AdapterInput) -> dict[str, Any] | None:
        """Extra JSON Schema for one input (ranges, body fields), or None."""

    async def prepare(
        self, runtime: Runtime, target: Target, request: UpstreamRequest, context: CallContext
    ) -> UpstreamRequest:
        """Adjust a request just before it is sent (may ask the upstream first, e.g. its version).
        Raise `Answered` to answer the call here instead of sending it."""

    async def observe(
        self,
        runtime: Runtime,
        target: Target,
        request: UpstreamRequest,
        response: UpstreamResponse,
        context: CallContext,
    ) -> None:
        """Look at an upstream answer before the adapter gets it (e.g. to record rate-limit headers)."""

    def openapi_responses(self, binding: Binding) -> dict[str, Any] | None:
        """OpenAPI responses this API really gives for a binding (status -> response object)."""

    def openapi_schemas(self) -> dict[str, Any]:
        """Named schemas the responses above refer to."""

    def tool_schema(self, binding: Binding) -> ToolSchema | None:
        """Extra tool arguments and an output schema for a tool this extension shapes, or None."""

    async def run_tool(
        self, runtime: Runtime, binding: Binding, inputs: dict[str, Any], extras: dict[str, Any]
    ) -> Outcome | None:
        """Run a tool call this extension knows better than the generic runtime, or None to leave it."""

    def explain_error(self, consumes: Consumes, error: ApiError) -> str | None:
        """The upstream's error message plus what to do about it, for a model or a person."""

    def extra_tools(self, runtime: Runtime) -> list[ExtraTool]:
        """Tools this extension adds beside the spec's (workflows, questions over local data)."""


class Runtime:
    def __init__(
        self,
        spec: Spec,
        settings: Settings,
        *,
        client: UpstreamClient | None = None,
        extensions: Sequence[Extension] = (),
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.extensions = tuple(extensions)
        self.client = client or UpstreamClient(
            connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout
        )
        self.resolution = resolve(spec)
        self._schemas: dict[tuple[str, str], dict[str, Any]] = {}
        self._validators: dict[tuple[str, str], jsonschema.Draft202012Validator] = {}
        self._base_uris = {c.namespace: self._base_uri(c) for c in spec.capability.consumes}
        self._binds = {b.namespace: b.keys for b in spec.all_binds}  # templates look here on every request

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        await self.client.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    def check_bound_variables(self) -> None:
        """Fail fast, in one line, when a variable the spec binds is not set."""
        for bind in self.spec.all_binds:
            for variable, provider_key in bind.keys.items():
                if not self.settings.environ.get(provider_key):
                    raise ConfigError(
                        f"{provider_key} is not set: the capability binds it as {bind.namespace}.{variable}; "
                        f"set it first, e.g. `export {provider_key}=...`"
                    )

    # -- bindings --------------------------------------------------------------------------

    def bindings(self, kind: AdapterKind, namespace: str | None = None) -> list[Binding]:
        return [
            b for b in self.resolution.bindings if b.kind == kind and (namespace is None or b.namespace == namespace)
        ]

    def base_uri(self, namespace: str) -> str:
        return self._base_uris[namespace]

    def input_schema(self, binding: Binding) -> dict[str, Any]:
        """The JSON Schema of a binding's inputs, as adapters publish and validate them."""
        key = (binding.namespace, binding.name)
        if key not in self._schemas:
            properties: dict[str, Any] = {}
            for item in binding.inputs:
                schema: dict[str, Any] = {"type": item.type} if item.type in JSON_TYPES else {}
                if item.description:
                    schema["description"] = item.description
                for extension in self.extensions:
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
        """Check (and, for values that arrived as text, convert) inputs. Raises InputError."""
        schema = self.input_schema(binding)
        values = dict(raw)
        if from_strings:
            for item in binding.inputs:
                if isinstance(values.get(item.name), str) and item.location != "body":
                    values[item.name] = _from_text(values[item.name], item)
        validator = self._validators.get((binding.namespace, binding.name))
        if validator is None:  # built once per binding: compiling costs far more than validating
            validator = self._validators[(binding.namespace, binding.name)] = jsonschema.Draft202012Validator(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(values))
        if error is not None:
            field = ".".join(str(p) for p in error.absolute_path) or None
            if error.validator == "additionalProperties" and not error.absolute_path:
                message = f"unexpected input: {error.message.split('(')[-1].rstrip(')')}"
            else:
                message = f"{field}: {_short(error)}" if field else _short(error)
            raise InputError(message, field=field)
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

    @asynccontextmanager
    async def call(
        self,
        binding: Binding,
        raw: Mapping[str, Any],
        *,
        from_strings: bool = False,
        context: CallContext = CallContext(),
    ) -> AsyncIterator[UpstreamResponse]:
        """Validate, build, prepare and send; yield the upstream response with its body unread."""
        inputs = self.validate(binding, raw, from_strings=from_strings)
        async with self.call_target(binding.target, self.resolve_with(binding, inputs), context) as response:
            yield response

    @asynccontextmanager
    async def call_target(
        self,
        target: Target,
        values: Mapping[str, Any],
        context: CallContext = CallContext(),
    ) -> AsyncIterator[UpstreamResponse]:
        """Call a consumed operation with its own input values (extensions' workflows use this)."""
        request = self.build_request(target, values)
        try:
            for extension in self.extensions:
                request = await extension.prepare(self, target, request, context)
        except Answered as answer:
            yield UpstreamResponse.local(answer.status, answer.document, answer.headers, request.host)
            return
        async with self.client.stream(request) as response:
            for extension in self.extensions:
                await extension.observe(self, target, request, response, context)
            yield response

    def map_output(self, outputs: Sequence[OutputParameter], document: Any) -> Any:
        """Apply a binding's output mapping to a JSON answer (`$.` alone returns it whole)."""
        if not outputs:
            return document
        if len(outputs) == 1 and not outputs[0].name:
            return _map_one(outputs[0], document)
        return {o.name or f"output{i}": _map_one(o, document) for i, o in enumerate(outputs)}

    # -- internals -------------------------------------------------------------------------

    def _base_uri(self, consumes: Consumes) -> str:
        for extension in self.extensions:
            uri = extension.base_uri(consumes, self.settings)
            if uri:
                return uri.rstrip("/")
        return (self.settings.base_uri_override(consumes.namespace) or consumes.base_uri).rstrip("/")

    def _lookup(self, name: str, inputs: Mapping[str, Any], binding: Binding | None) -> str:
        binds = self._binds
        namespaces = {*binds, "rest", "tools", *([binding.namespace] if binding else [])}
        namespace, variable = ex.split_dotted(name, namespaces)
        if namespace in binds or namespace is None:
            for bind_ns, keys in binds.items():
                if (namespace in (None, bind_ns)) and variable in keys:
                    value = self.settings.environ.get(keys[variable])
                    if not value:
                        raise ConfigError(f"{keys[variable]} is not set (bound as {bind_ns}.{variable})")
                    return value
        if variable in inputs:
            return _as_text(inputs[variable])
        return ""

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


def _short(error: jsonschema.ValidationError) -> str:
    if error.validator == "type":
        return f"must be of type {error.validator_value}, got {json.dumps(error.instance)[:60]}"
    if error.validator == "required":
        return error.message.replace("'", "", 2)
    return error.message[:200]
