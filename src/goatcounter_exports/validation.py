"""Input checks against a JSON Schema, compiled once, with one wording for every adapter.

The runtime checks a binding's inputs with it, the MCP adapter a tool's arguments; both
report the first problem as an `InputError` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jsonschema

from .errors import InputError


class Validator:
    """A compiled JSON Schema (compiling costs far more than validating, so it is done once)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = dict(schema)
        self._compiled = jsonschema.Draft202012Validator(self.schema)

    def check(self, values: Mapping[str, Any]) -> None:
        """Raises InputError for the most relevant problem, naming the field."""
        error = jsonschema.exceptions.best_match(self._compiled.iter_errors(dict(values)))
        if error is None:
            return
        field = ".".join(str(p) for p in error.absolute_path) or None
        if error.validator == "additionalProperties" and not error.absolute_path:
            raise InputError(f"unexpected input: {error.message.split('(')[-1].rstrip(')')}")
        raise InputError(f"{field}: {_describe(error)}" if field else _describe(error), field=field)


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "type":
        return f"must be of type {error.validator_value}, got {json.dumps(error.instance)[:60]}"
    if error.validator == "required":
        return error.message.replace("'", "", 2)
    return error.message[:200]
