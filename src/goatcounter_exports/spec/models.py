"""Typed, frozen models of the Naftiko alpha2 subset this runtime serves.

The models accept what the seed needs even where the official schema does not
(`type`/`description`/`required` on consumed inputs, a REST `description`);
`spec.lint` reports those deviations. Features the runtime does not implement
never reach these models: `spec.loader` refuses them first, with their path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ParamLocation = Literal["query", "header", "path", "cookie", "body", "environment"]
ParamType = Literal["string", "number", "integer", "boolean", "array", "object"]
HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
WithValue = str | int | float | bool


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Info(Model):
    label: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()


class Bind(Model):
    namespace: str
    keys: dict[str, str]
    description: str = ""


class InputParameter(Model):
    name: str
    location: ParamLocation | None = Field(default=None, alias="in")
    type: ParamType | None = None
    description: str = ""
    required: bool | None = None
    value: str | None = None
    pattern: str | None = None


class OutputParameter(Model):
    name: str | None = None
    type: str | None = None
    value: str | None = None
    mapping: str | None = None
    properties: dict[str, OutputParameter] | None = None


class Hints(Model):
    read_only: bool | None = Field(default=None, alias="readOnly")
    destructive: bool | None = None
    idempotent: bool | None = None
    open_world: bool | None = Field(default=None, alias="openWorld")


class Authentication(Model):
    type: Literal["bearer", "apikey", "basic"]
    token: str | None = None
    key: str | None = None
    value: str | None = None
    placement: Literal["header", "query"] = "header"
    username: str | None = None
    password: str | None = None


class ConsumedOperation(Model):
    name: str
    method: HttpMethod = "GET"
    description: str = ""
    label: str = ""
    input_parameters: tuple[InputParameter, ...] = Field(default=(), alias="inputParameters")
    output_raw_format: str | None = Field(default=None, alias="outputRawFormat")
    output_parameters: tuple[OutputParameter, ...] = Field(default=(), alias="outputParameters")


class ConsumedResource(Model):
    name: str
    path: str
    description: str = ""
    input_parameters: tuple[InputParameter, ...] = Field(default=(), alias="inputParameters")
    operations: tuple[ConsumedOperation, ...]


class Consumes(Model):
    type: Literal["http"]
    namespace: str
    base_uri: str = Field(alias="baseUri")
    description: str = ""
    input_parameters: tuple[InputParameter, ...] = Field(default=(), alias="inputParameters")
    authentication: Authentication | None = None
    resources: tuple[ConsumedResource, ...]


class ExposedOperation(Model):
    method: HttpMethod = "GET"
    name: str = ""
    label: str = ""
    description: str = ""
    input_parameters: tuple[InputParameter, ...] = Field(default=(), alias="inputParameters")
    call: str
    with_: dict[str, WithValue] | None = Field(default=None, alias="with")
    output_parameters: tuple[OutputParameter, ...] = Field(default=(), alias="outputParameters")


class ExposedResource(Model):
    path: str
    name: str = ""
    label: str = ""
    description: str = ""
    input_parameters: tuple[InputParameter, ...] = Field(default=(), alias="inputParameters")
    operations: tuple[ExposedOperation, ...]


class RestExpose(Model):
    type: Literal["rest"]
    namespace: str
    port: int
    address: str | None = None
    description: str = ""
    authentication: Authentication | None = None  # what incoming requests must present
    resources: tuple[ExposedResource, ...] = ()


class McpTool(Model):
    name: str
    label: str = ""
    description: str = ""
    input_parameters: tuple[InputParameter, ...] = Field(default=(), alias="inputParameters")
    call: str
    with_: dict[str, WithValue] | None = Field(default=None, alias="with")
    hints: Hints = Hints()
    output_parameters: tuple[OutputParameter, ...] = Field(default=(), alias="outputParameters")


class McpExpose(Model):
    type: Literal["mcp"]
    namespace: str
    port: int | None = None
    address: str | None = None
    transport: Literal["http", "stdio"] = "http"
    description: str = ""
    authentication: Authentication | None = None  # what incoming requests must present
    tools: tuple[McpTool, ...]


Expose = RestExpose | McpExpose


class Capability(Model):
    binds: tuple[Bind, ...] = ()
    consumes: tuple[Consumes, ...] = ()
    exposes: tuple[Expose, ...] = ()


class Spec(Model):
    """A loaded capability document. `source` names where it came from, for messages."""

    naftiko: str
    info: Info = Info()
    binds: tuple[Bind, ...] = ()
    capability: Capability
    source: str = ""

    @property
    def all_binds(self) -> tuple[Bind, ...]:
        return self.binds + self.capability.binds

    @property
    def bound_variables(self) -> tuple[str, ...]:
        """The environment variables the binds name (their provider keys), each once, in order."""
        return tuple(dict.fromkeys(key for bind in self.all_binds for key in bind.keys.values()))

    @property
    def rest_exposes(self) -> tuple[RestExpose, ...]:
        return tuple(e for e in self.capability.exposes if isinstance(e, RestExpose))

    @property
    def mcp_exposes(self) -> tuple[McpExpose, ...]:
        return tuple(e for e in self.capability.exposes if isinstance(e, McpExpose))


def format_path(path: tuple[str | int, ...]) -> str:
    """`("capability", "exposes", 0, "port")` -> `capability.exposes[0].port`, as messages show it."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
