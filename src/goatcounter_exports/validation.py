"""Input checks against a JSON Schema, compiled once, with one wording for every adapter.

The runtime checks a binding's inputs with it, the MCP adapter a tool's arguments; both
report the first problem as an `InputError` naming the field.

Stricter than plain JSON Schema where an upstream is: an `integer` is a JSON integer (not
`1.0`, which JSON Schema counts as one but GoatCounter refuses, after charging for it), and
the `date-time` and `date` formats are checked (RFC 3339), not just annotations.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator

from .errors import InputError

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
MAX_DEPTH = 32  # nesting a caller's JSON may have: deeper is refused before it can exhaust the stack


def _is_integer(checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


FORMATS = jsonschema.FormatChecker([])


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not RFC3339.match(value):
        raise ValueError("not an RFC 3339 time such as 2026-11-20T00:00:00Z")
    datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # a real day and time, not 2026-13-45
    return True


@FORMATS.checks("date", raises=ValueError)
def _date(value: object) -> bool:
    if isinstance(value, str):
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError("not a date such as 2026-11-20")
        date.fromisoformat(value)  # a real day, not 2026-02-30
    return True


StrictValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply `value` nests, counted without recursion (so a hostile document cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > limit:
            return level
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


class Validator:
    """A compiled JSON Schema (compiling costs far more than validating, so it is done once)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = dict(schema)
        self._compiled = StrictValidator(self.schema, format_checker=FORMATS)

    def check(self, values: Mapping[str, Any]) -> None:
        """Raises InputError for the most relevant problem, naming the field."""
        if depth(dict(values)) > MAX_DEPTH:
            raise InputError(f"input nests deeper than {MAX_DEPTH} levels")
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
    if error.validator == "format":
        reason = f" ({error.cause})" if error.cause else ""
        return f"must be a {error.validator_value}{reason}, got {json.dumps(error.instance)[:60]}"
    return error.message[:200]
