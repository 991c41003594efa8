"""A policy's argument conditions: one parser for the matcher, the model and the admin.

A condition is ``{"arg": "amount", "op": ">", "value": 100}``: ``arg`` names an argument of the
call (a dotted path reaches into nested objects: ``"customer.country"``), ``op`` compares it
with ``value``. A condition that cannot be read (``{"value": "x"}``: no argument, no operator)
would never hold, so the policy would silently stop asking for approval; it is refused when the
policy is published, naming the problem. Should one reach the matcher all the same (written to
the database by hand), it counts as holding: a broken policy asks a person rather than letting
calls through.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXAMPLE = '{"arg": "amount", "op": ">", "value": 100}'
# Ordering operators compare numbers; "in" looks the argument up in a list of values.
ORDERING = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
OPS: dict[str, Callable[[Any, Any], bool]] = {
    **ORDERING, "==": operator.eq, "!=": operator.ne, "in": lambda a, b: a in b,
}
_KEYS = ("arg", "op", "value")


class ConditionInvalid(ValueError):
    """A condition that cannot be evaluated; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Condition:
    path: tuple[str, ...]
    op: str
    value: Any

    def holds(self, arguments: Any) -> bool:
        node = arguments
        for part in self.path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        try:
            return bool(OPS[self.op](node, self.value))
        except TypeError:  # an argument of another type than the value: no match
            return False


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


def parse(condition: Any) -> Condition:
    """The condition, or ConditionInvalid naming what is missing or wrong."""
    if not isinstance(condition, dict):
        raise ConditionInvalid(f"must be an object like {EXAMPLE}")
    unknown = [k for k in condition if k not in _KEYS]
    if unknown:
        raise ConditionInvalid(f"unknown key {unknown[0]!r}; a condition has only "
                               f"{', '.join(_KEYS)}, e.g. {EXAMPLE}")
    arg = condition.get("arg")
    if not isinstance(arg, str) or not arg:
        raise ConditionInvalid('names no argument: "arg" must be the argument\'s name or dotted '
                               f'path (e.g. "amount" or "customer.country"), as in {EXAMPLE}')
    path = tuple(arg.split("."))
    if not all(path):
        raise ConditionInvalid(f'"arg" {arg!r} has an empty step in its dotted path')
    op = condition.get("op")
    if op not in OPS:
        raise ConditionInvalid(f'"op" must be one of {" ".join(OPS)}, not {op!r}')
    if "value" not in condition:
        raise ConditionInvalid(f'has no "value" to compare {arg!r} with')
    value = condition["value"]
    if op in ORDERING and not _is_number(value):
        raise ConditionInvalid(f'"{op}" compares numbers: "value" must be a number, '
                               f"not {value!r}")
    if op == "in" and not (isinstance(value, list) and value and all(map(_is_scalar, value))):
        raise ConditionInvalid('"in" needs "value": a non-empty list of strings, numbers, '
                               'booleans or null, e.g. ["DE", "FR"]')
    if op in ("==", "!=") and not _is_scalar(value) and not isinstance(value, (list, dict)):
        raise ConditionInvalid(f'"value" must be a JSON value, not {value!r}')
    return Condition(path=path, op=op, value=value)


def problems(conditions: Any) -> list[str]:
    """Every problem with a policy's conditions, each naming its condition; empty when all
    can be evaluated."""
    if not isinstance(conditions, list):
        return [f"conditions must be a list of conditions like {EXAMPLE} (or [] for none)"]
    found = []
    for number, condition in enumerate(conditions, 1):
        try:
            parse(condition)
        except ConditionInvalid as exc:
            found.append(f"condition {number} ({_shown(condition)}): {exc}")
    return found


def _shown(condition: Any) -> str:
    try:
        text = json.dumps(condition, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(condition)
    return text if len(text) <= 120 else text[:117] + "..."


def argument(condition: Any, arguments: Any) -> tuple[bool, Any]:
    """(found, value): what the call has at the argument ``condition`` names, for saying why a
    policy matched; (False, None) when the path is missing or the condition cannot be read."""
    try:
        node = arguments
        for part in parse(condition).path:
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
    except ConditionInvalid:
        return False, None
    return True, node


def holds(condition: Any, arguments: Any) -> bool:
    """Whether the call's ``arguments`` meet ``condition``; an unreadable condition holds
    (see the module's docstring)."""
    try:
        return parse(condition).holds(arguments)
    except ConditionInvalid:
        return True
