"""JSON helpers every layer shares (pure Python, no Django): how a JSON-Schema violation is
described to a person, a schema's own check, and one walk over a JSON value's strings."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema


class _Validator(Protocol):
    def iter_errors(self, instance: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    """One violation: where in the value ("a/0/b", "" for the value itself) and what is wrong."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def at(self) -> str:
        """The place as a sentence would name it: the path, or "(root)"."""
        return self.where or "(root)"


def schema_problems(validator: _Validator, value: Any, *, limit: int = 5) -> list[SchemaProblem]:
    """The first ``limit`` violations of ``value``, in the order of their place in it."""
    errors = sorted(validator.iter_errors(value), key=lambda e: [
        (0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in e.absolute_path])
    return [SchemaProblem("/".join(str(p) for p in e.absolute_path), e.message)
            for e in errors[:limit]]


# Schemas that passed the meta-schema check, as canonical JSON; bounded, since admins write them.
_checked: set[str] = set()
_CHECKED_MAX = 4096


def check_schema(schema: Any) -> None:
    """Check ``schema`` against JSON Schema 2020-12's meta-schema (``jsonschema.SchemaError``
    when it is not one), remembering the schemas that passed: the check took milliseconds a
    schema, and every task that loads its tools builds their contracts again."""
    key = None  # not plain JSON (a tuple, say, which is no JSON array): checked every time
    if _plain(schema):
        try:
            key = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except ValueError:
            key = None
    if key is not None and key in _checked:
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    if key is not None:
        if len(_checked) >= _CHECKED_MAX:
            _checked.clear()
        _checked.add(key)


def _plain(value: Any) -> bool:
    """Whether ``value`` is made of JSON's own types only: dicts with string keys, lists,
    strings, numbers, booleans and None."""
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return True
    if type(value) is list:
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


def map_strings(value: Any, fn: Callable[[str], Any], *, keys: bool = False) -> Any:
    """``value`` with ``fn`` applied to every string in it, at any depth of mappings, lists and
    tuples (and to mapping keys when ``keys``); everything else is kept as it is."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {(map_strings(k, fn, keys=keys) if keys else k): map_strings(v, fn, keys=keys)
                for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, fn, keys=keys) for v in value]
    if isinstance(value, tuple):
        return tuple(map_strings(v, fn, keys=keys) for v in value)
    return value
