"""Resolve a `Spec` into bindings: what each exposed route or tool calls, and with what.

This is where the project's reading of the seed lives (see shared/naftiko/spec-notes.md):
`rest.<name>` and `tools.<name>` are adapter inputs, `{id}` and `{{id}}` are both
path placeholders, and a route or tool that declares no inputs gets those of the
consumed operation its `with` feeds. Problems are collected, not raised, so lint
can report them all; the loader refuses a document with any error among them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal as TypingLiteral

from . import expressions as ex
from .models import (
    ConsumedOperation,
    ConsumedResource,
    Consumes,
    Hints,
    InputParameter,
    McpExpose,
    OutputParameter,
    ParamType,
    RestExpose,
    Spec,
    WithValue,
    format_path,
)

Key = tuple[str | int, ...]
AdapterKind = TypingLiteral["rest", "mcp"]
InputLocation = TypingLiteral["path", "query", "header", "body"]
ADAPTER_PREFIX: dict[AdapterKind, str] = {"rest": "rest", "mcp": "tools"}


@dataclass(frozen=True)
class Problem:
    level: TypingLiteral["error", "warning"]
    key: Key
    message: str

    @property
    def path(self) -> str:
        return format_path(self.key)


@dataclass(frozen=True)
class Target:
    """A consumed operation with everything needed to call it."""

    ref: str
    consumes: Consumes
    resource: ConsumedResource
    operation: ConsumedOperation
    inputs: tuple[InputParameter, ...]

    @property
    def method(self) -> str:
        return self.operation.method

    @property
    def path(self) -> str:
        return self.resource.path

    def input(self, name: str) -> InputParameter | None:
        return next((p for p in self.inputs if p.name == name), None)


@dataclass(frozen=True)
class AdapterInput:
    """One input an exposed route or tool accepts."""

    name: str
    location: InputLocation
    type: ParamType | None
    description: str
    required: bool
    feeds: str | None = None  # the consumed input it is passed to, when passed straight through


@dataclass(frozen=True)
class Binding:
    """An exposed REST operation or MCP tool, resolved to its consumed operation."""

    kind: AdapterKind
    namespace: str
    name: str
    description: str
    target: Target
    sources: dict[str, ex.Source]
    inputs: tuple[AdapterInput, ...]
    outputs: tuple[OutputParameter, ...]
    key: Key
    method: str = ""
    path: str = ""
    hints: Hints = field(default_factory=Hints)

    def input(self, name: str) -> AdapterInput | None:
        return next((i for i in self.inputs if i.name == name), None)


@dataclass
class Resolution:
    targets: dict[str, Target] = field(default_factory=dict)
    bindings: list[Binding] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def error(self, key: Key, message: str) -> None:
        self.problems.append(Problem("error", key, message))

    def warning(self, key: Key, message: str) -> None:
        self.problems.append(Problem("warning", key, message))


def resolve(spec: Spec) -> Resolution:
    result = Resolution()
    bound = {b.namespace: set(b.keys) for b in spec.all_binds}
    _resolve_targets(spec, result, bound)
    seen_ports: dict[int, str] = {}
    for index, expose in enumerate(spec.capability.exposes):
        key: Key = ("capability", "exposes", index)
        if expose.authentication is not None:
            for attr in ("token", "key", "value", "username", "password"):
                text = getattr(expose.authentication, attr)
                if isinstance(text, str):
                    _check_template_names(text, (*key, "authentication", attr), result, bound, adapter_inputs=None)
        if expose.port is not None:
            if expose.port in seen_ports:
                result.error((*key, "port"), f"port {expose.port} is already used by '{seen_ports[expose.port]}'")
            seen_ports[expose.port] = expose.namespace
        if isinstance(expose, RestExpose):
            _resolve_rest(expose, key, result, bound)
        else:
            _resolve_mcp(expose, key, result, bound)
    return result


def _resolve_targets(spec: Spec, result: Resolution, bound: dict[str, set[str]]) -> None:
    for c_index, consumes in enumerate(spec.capability.consumes):
        c_key: Key = ("capability", "consumes", c_index)
        if consumes.authentication is not None:
            for attr in ("token", "key", "value", "username", "password"):
                text = getattr(consumes.authentication, attr)
                if isinstance(text, str):
                    _check_template_names(text, (*c_key, "authentication", attr), result, bound, adapter_inputs=None)
        for r_index, resource in enumerate(consumes.resources):
            for o_index, operation in enumerate(resource.operations):
                o_key: Key = (*c_key, "resources", r_index, "operations", o_index)
                inputs = (*consumes.input_parameters, *resource.input_parameters, *operation.input_parameters)
                target = Target(f"{consumes.namespace}.{operation.name}", consumes, resource, operation, inputs)
                if target.ref in result.targets:
                    result.error((*o_key, "name"), f"operation '{target.ref}' is declared twice")
                result.targets[target.ref] = target
                result.targets[f"{consumes.namespace}.{resource.name}.{operation.name}"] = target
                for placeholder in ex.path_placeholders(resource.path):
                    if target.input(placeholder) is None:
                        result.warning(
                            (*c_key, "resources", r_index, "path"),
                            f"path placeholder '{placeholder}' has no declared input parameter",
                        )
                for p_index, output in enumerate(operation.output_parameters):
                    if output.value is not None and not ex.is_jsonpath(output.value):
                        key = (*o_key, "outputParameters", p_index, "value")
                        result.error(key, f"not a JSONPath: {output.value!r}")


def _resolve_rest(expose: RestExpose, key: Key, result: Resolution, bound: dict[str, set[str]]) -> None:
    routes: set[tuple[str, str]] = set()
    for r_index, resource in enumerate(expose.resources):
        placeholders = ex.path_placeholders(resource.path)
        used: set[str] = set()
        for o_index, operation in enumerate(resource.operations):
            o_key: Key = (*key, "resources", r_index, "operations", o_index)
            route = (operation.method, ex.PLACEHOLDER.sub(lambda m: "{" + m.group(1) + "}", resource.path))
            if route in routes:
                result.error((*o_key, "method"), f"route {route[0]} {route[1]} is declared twice")
            routes.add(route)
            declared = (*resource.input_parameters, *operation.input_parameters)
            binding = _bind(
                "rest",
                expose.namespace,
                operation.name or f"{operation.method.lower()}-{resource.name}",
                operation.description or resource.description,
                operation.call,
                operation.with_,
                declared,
                placeholders,
                operation.output_parameters,
                o_key,
                result,
                bound,
            )
            if binding is not None:
                result.bindings.append(replace(binding, method=operation.method, path=route[1]))
                used.update(i.name for i in binding.inputs if i.location == "path")
        for name in placeholders:
            if name not in used:
                result.warning((*key, "resources", r_index, "path"), f"path placeholder '{name}' is not used")


def _resolve_mcp(expose: McpExpose, key: Key, result: Resolution, bound: dict[str, set[str]]) -> None:
    names: set[str] = set()
    for t_index, tool in enumerate(expose.tools):
        t_key: Key = (*key, "tools", t_index)
        if tool.name in names:
            result.error((*t_key, "name"), f"tool '{tool.name}' is declared twice")
        names.add(tool.name)
        binding = _bind(
            "mcp",
            expose.namespace,
            tool.name,
            tool.description,
            tool.call,
            tool.with_,
            tool.input_parameters,
            [],
            tool.output_parameters,
            t_key,
            result,
            bound,
        )
        if binding is not None:
            result.bindings.append(replace(binding, hints=tool.hints))


def _bind(
    kind: AdapterKind,
    namespace: str,
    name: str,
    description: str,
    call: str,
    with_: dict[str, WithValue] | None,
    declared: Iterable[InputParameter],
    path_names: list[str],
    outputs: tuple[OutputParameter, ...],
    key: Key,
    result: Resolution,
    bound: dict[str, set[str]],
) -> Binding | None:
    target = result.targets.get(call)
    if target is None:
        known = ", ".join(sorted(k for k in result.targets if k.count(".") == 1)) or "none"
        result.error((*key, "call"), f"call '{call}' does not resolve to a consumed operation (known: {known})")
        return None
    prefix = ADAPTER_PREFIX[kind]
    if with_ is None:
        # No `with`: each consumed input is fed by the adapter input of the same name.
        raw: dict[str, WithValue] = {p.name: f"{prefix}.{p.name}" for p in target.inputs if p.value is None}
    else:
        raw = dict(with_)
    sources: dict[str, ex.Source] = {}
    for target_name, value in raw.items():
        if target.input(target_name) is None and target_name not in ex.path_placeholders(target.path):
            result.error((*key, "with", target_name), f"'{target_name}' is not an input of '{target.ref}'")
            continue
        other = ADAPTER_PREFIX["mcp" if kind == "rest" else "rest"]
        if ex.looks_like_reference(value) == other:
            result.error((*key, "with", target_name), f"'{value}' refers to the {other} adapter from a {kind} binding")
            continue
        sources[target_name] = ex.parse_source(value, namespace)
        if isinstance(sources[target_name], ex.Literal) and ex.looks_like_reference(value):
            result.warning(
                (*key, "with", target_name), f"'{value}' names no known namespace and is passed as a literal string"
            )
    inputs = _adapter_inputs(kind, target, sources, list(declared), path_names, key, result)
    input_names = {i.name for i in inputs}
    for target_name, source in sources.items():
        if isinstance(source, ex.InputRef) and source.name not in input_names:
            result.error((*key, "with", target_name), f"'{raw[target_name]}' names no input of '{name}'")
        if isinstance(source, ex.Template):
            _check_template_names(source.text, (*key, "with", target_name), result, bound, input_names, prefix)
    for placeholder in ex.path_placeholders(target.path):
        parameter = target.input(placeholder)
        if placeholder not in sources and (parameter is None or parameter.value is None):
            result.error((*key, "with"), f"path placeholder '{placeholder}' of '{target.ref}' is not fed")
    for parameter in target.inputs:
        fed = parameter.name in sources or parameter.value is not None
        if parameter.required and not fed:
            result.error((*key, "with"), f"required input '{parameter.name}' of '{target.ref}' is not fed")
    for o_index, output in enumerate(outputs):
        if output.mapping is not None and not ex.is_jsonpath(output.mapping):
            result.error((*key, "outputParameters", o_index, "mapping"), f"not a JSONPath: {output.mapping!r}")
    return Binding(kind, namespace, name, description, target, sources, tuple(inputs), outputs, key)


def _adapter_inputs(
    kind: AdapterKind,
    target: Target,
    sources: dict[str, ex.Source],
    declared: list[InputParameter],
    path_names: list[str],
    key: Key,
    result: Resolution,
) -> list[AdapterInput]:
    """Declared inputs when there are any; otherwise those inferred from what `with` feeds."""
    fed_by = {s.name: t for t, s in sources.items() if isinstance(s, ex.InputRef)}
    inputs: list[AdapterInput] = []
    for parameter in declared:
        location = _location(kind, parameter.name, parameter.location, path_names)
        if location is None:
            result.error(key, f"input '{parameter.name}' has an unsupported location '{parameter.location}'")
            continue
        inputs.append(
            AdapterInput(
                parameter.name,
                location,
                parameter.type,
                parameter.description,
                # MCP tool parameters are required unless they say otherwise (the schema's default).
                parameter.required if parameter.required is not None else (kind == "mcp" or location == "path"),
                fed_by.get(parameter.name),
            )
        )
    if not declared:
        for input_name, target_name in fed_by.items():
            fed = target.input(target_name)
            location = _location(kind, input_name, fed.location if fed else "path", path_names)
            inputs.append(
                AdapterInput(
                    input_name,
                    location or "query",
                    fed.type if fed else "string",
                    fed.description if fed else "",
                    bool(fed.required) if fed and fed.required is not None else location == "path",
                    target_name,
                )
            )
    names = {i.name for i in inputs}
    for name in path_names:
        if name not in names:
            inputs.append(AdapterInput(name, "path", "string", "", True))
    return inputs


def _location(kind: AdapterKind, name: str, declared: str | None, path_names: list[str]) -> InputLocation | None:
    if name in path_names:
        return "path"
    if declared == "body":
        return "body"
    if kind == "mcp":
        return "query"  # tool arguments: the location only matters to REST
    if declared in (None, "query", "path"):
        return "query"
    if declared == "header":
        return "header"
    return None


def _check_template_names(
    text: str,
    key: Key,
    result: Resolution,
    bound: dict[str, set[str]],
    adapter_inputs: set[str] | None,
    prefix: str = "",
) -> None:
    for name in ex.template_names(text):
        namespace, variable = ex.split_dotted(name.removeprefix("$"), {*bound, prefix} - {""})
        if namespace in bound and variable in bound[namespace]:
            continue
        if namespace is None and any(variable in keys for keys in bound.values()):
            continue
        if adapter_inputs is not None and namespace == prefix and variable in adapter_inputs:
            continue
        result.error(key, f"template '{{{{{name}}}}}' names no bound variable or input")
