"""The form a person answers a task (or an agent's question) with, generated on the server from
the JSON Schema of the answer: a string is a text input (a text area when it may be long), a
number or integer a number input, a boolean a checkbox, an enum a select, anything else a JSON
text area. What was posted is parsed back into typed values and checked against the schema
(approvals/responses.py), each problem shown next to its field, the person's input kept."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from approvals import responses
from audit import hygiene

PREFIX = "out."
# Strings that may be longer than this get a text area.
SHORT_TEXT = 200
# The whole answer as one JSON text area, for a schema that names no fields.
WHOLE = ""


@dataclass
class FormField:
    name: str
    label: str
    widget: str  # input | textarea | number | checkbox | select | json
    required: bool = False
    help: str = ""
    value: str = ""
    checked: bool = False
    step: str = "any"
    choices: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""

    @property
    def html_name(self) -> str:
        return f"{PREFIX}{self.name}" if self.name else "output"

    @property
    def html_id(self) -> str:
        return "field-" + "".join(c if c.isalnum() else "-" for c in self.name or "output")


def _widget(prop: Mapping[str, Any]) -> str:
    kind = prop.get("type")
    if "enum" in prop and isinstance(prop["enum"], list):
        return "select"
    if kind == "boolean":
        return "checkbox"
    if kind in ("number", "integer"):
        return "number"
    if kind == "string":
        longest = prop.get("maxLength")
        return "input" if isinstance(longest, int) and longest <= SHORT_TEXT else "textarea"
    return "json"


def _order(schema: Mapping[str, Any]) -> list[str]:
    """Required fields first (in their listed order), then the rest as given."""
    props = schema.get("properties") or {}
    required = [n for n in schema.get("required") or [] if n in props]
    return required + [n for n in props if n not in required]


def fields_for(schema: Mapping[str, Any]) -> list[FormField]:
    props = schema.get("properties") or {}
    if not isinstance(props, dict) or not props:
        return [FormField(name=WHOLE, label="Output (JSON)", widget="json", required=True,
                          value="{}")]
    required = set(schema.get("required") or [])
    found = []
    for name in _order(schema):
        prop = props[name] if isinstance(props[name], dict) else {}
        item = FormField(name=str(name), label=str(prop.get("title") or name),
                         widget=_widget(prop), required=name in required,
                         help=str(prop.get("description") or ""))
        if item.widget == "number" and prop.get("type") == "integer":
            item.step = "1"
        if item.widget == "select":
            item.choices = [(str(i), v if isinstance(v, str) else json.dumps(v))
                            for i, v in enumerate(prop["enum"])]
        found.append(item)
    return found


def _number(raw: str, integer: bool) -> int | float:
    text = raw.strip()
    if len(text) > 40:
        raise ValueError("the number is too long")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError("enter a whole number" if integer else "enter a number") from None
    if not value.is_finite():
        raise ValueError("enter a finite number")
    if value == value.to_integral_value():
        return int(value)
    if integer:
        raise ValueError("enter a whole number")
    return float(value)


def _parse_one(item: FormField, raw: str, prop: Mapping[str, Any], enum: list[Any]) -> Any:
    """The posted text of one field as its typed value (raises ValueError with the message)."""
    if item.widget == "select":
        if not (raw.isascii() and raw.isdigit() and int(raw) < len(enum)):
            raise ValueError("choose one of the options")
        return enum[int(raw)]
    if item.widget == "number":
        return _number(raw, prop.get("type") == "integer")
    if item.widget == "json":
        try:
            return hygiene.loads(raw, item.name or "output")
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg}") from None
        except hygiene.Refused as exc:
            raise ValueError(str(exc)) from None
    return raw


def parse(schema: Mapping[str, Any], posted: Mapping[str, str]) -> tuple[
        Any, list[FormField], list[str]]:
    """(the answer, the fields with the posted values and their errors, errors of the whole
    answer). The answer is None when a field could not be read or the schema refuses it."""
    items = fields_for(schema)
    props = schema.get("properties") or {}
    output: dict[str, Any] = {}
    whole: Any = None
    for item in items:
        raw = posted.get(item.html_name, "")
        item.value = raw
        if item.widget == "checkbox":
            item.checked = item.html_name in posted
            output[item.name] = item.checked
            continue
        if raw.strip() == "":
            continue  # not given: the schema says whether it must be
        prop = props.get(item.name) if isinstance(props, dict) else None
        prop = prop if isinstance(prop, dict) else {}
        try:
            value = _parse_one(item, raw, prop, list(prop.get("enum") or []))
        except ValueError as exc:
            item.error = str(exc)
            continue
        if item.name == WHOLE:
            whole = value
        else:
            output[item.name] = value
    answer = whole if items and items[0].name == WHOLE else output
    general: list[str] = []
    by_name = {item.name: item for item in items}
    for path, message in responses.problems(dict(schema), answer):
        target = by_name.get(path.split(".", 1)[0]) if path else by_name.get(WHOLE)
        if target is None:
            general.append(f"{path}: {message}" if path else message)
        elif not target.error:
            target.error = message if "." not in path else f"{path}: {message}"
    if any(item.error for item in items) or general:
        return None, items, general
    return answer, items, general


def initial(schema: Mapping[str, Any]) -> list[FormField]:
    """The empty form."""
    return fields_for(schema)
