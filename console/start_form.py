"""The dashboard's start form, generated on the server from the input JSON Schema of a process's
current version.

Each property becomes a field: a string a text input (a text area when it may be long), a
number or integer a number input with the schema's bounds, an enum a select, a boolean a
checkbox, an object with properties a fieldset of its own fields, an array of strings or
numbers a text area of one value per line; anything else (no type, several types, ``oneOf``, an
array of objects, nesting deeper than ``MAX_DEPTH``) a JSON text area for that property alone.
The schema's own limits become HTML validation attributes, so the browser refuses what it can.

What is posted is read back into typed values (``read``): a form string that is not a number
where the schema wants one is refused with the field's name ("amount must be a number"); then
the same hygiene checks as everywhere (``audit.hygiene``) and the schema itself, whose errors are
put next to the field they concern. The run is still created through ``services.run_create``,
which checks it all again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema

from audit import hygiene

PREFIX = "in/"
# Objects nested deeper than this are edited as JSON.
MAX_DEPTH = 4
# Strings that may be longer than this (or of any length, with no pattern) get a text area.
LONG_TEXT = 500
SCALAR_TYPES = ("string", "number", "integer")


@dataclass
class Field:
    path: tuple[str, ...]
    label: str
    widget: str  # text | textarea | number | checkbox | select | list | json | group
    schema: dict[str, Any] = field(repr=False)
    required: bool = False
    help: str = ""
    input_type: str = "text"
    attrs: dict[str, str] = field(default_factory=dict)  # HTML validation attributes
    choices: list[tuple[str, str]] = field(default_factory=list)
    children: list[Field] = field(default_factory=list)
    value: str = ""
    checked: bool = False
    error: str = ""

    @property
    def key(self) -> str:
        return self.path[-1]

    @property
    def name(self) -> str:
        """The posted name: the path as a JSON pointer (RFC 6901), so that a property name
        holding a dot or a slash cannot pass for two steps."""
        return PREFIX + "/".join(p.replace("~", "~0").replace("/", "~1") for p in self.path)

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def html_id(self) -> str:
        safe = "-".join("".join(c if c.isascii() and (c.isalnum() or c == "_") else "_"
                                for c in part) for part in self.path)
        if safe != "-".join(self.path):  # told apart by a digest of the path itself
            safe += "--" + hashlib.sha256(json.dumps(self.path).encode()).hexdigest()[:8]
        return "start-" + safe

    @property
    def has_error(self) -> bool:
        return bool(self.error) or any(c.has_error for c in self.children)


# --- the schema as fields --------------------------------------------------------------------


def _number_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return json.dumps(value)


# Escapes read alike by Python's re (the server's check) and by a browser's v-mode RegExp.
_ESCAPES = set("dDwWsSbBnrtfvux0^$\\.*+?()[]{}|/")
# In a class, a browser in v mode needs these escaped (or refuses the whole pattern).
_CLASS_ESCAPES = set("()[]{}/|&!#$%*+,.:;<=>?@`~^-")
_GROUPS = ("(?:", "(?=", "(?!", "(?<=", "(?<!")


def browser_pattern(pattern: Any) -> str:
    """``pattern`` as a browser's ``pattern`` attribute, or "" when it cannot be sure to read it
    as the schema does. The attribute anchors its pattern and compiles it with the ``v`` flag,
    which wants literal punctuation in a class escaped (``[A-Z-]`` becomes ``[A-Z\\-]``); an
    unanchored pattern or an unusual construct is left to the server."""
    if not (isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$")
            and not pattern.endswith("\\$") and len(pattern) <= 500):
        return ""
    out: list[str] = []
    in_class, opened, i = False, 0, 0  # opened: where the current class's members begin
    while i < len(pattern):
        c = pattern[i]
        nxt = pattern[i + 1] if i + 1 < len(pattern) else ""
        if c == "\\":
            if nxt not in _ESCAPES and not (in_class and nxt in _CLASS_ESCAPES):
                return ""
            out.append(c + nxt)
            i += 2
            continue
        if in_class:
            if c == "^" and i == opened and pattern[i - 1] == "[":
                opened += 1  # a negated class; its members begin after the caret
            elif c == "]" and i > opened:
                in_class = False
            elif c == "-" and i > opened and nxt != "]":
                pass  # a range
            elif c in _CLASS_ESCAPES:
                c = "\\" + c
        elif c == "[":
            in_class, opened = True, i + 1
        elif c == "(" and nxt == "?" and not pattern.startswith(_GROUPS, i):
            return ""
        out.append(c)
        i += 1
    return "" if in_class else "".join(out)


def _scalar_enum(prop: Mapping[str, Any]) -> list[Any] | None:
    enum = prop.get("enum")
    if isinstance(enum, list) and enum and all(
            v is None or isinstance(v, (str, int, float, bool)) for v in enum):
        return enum
    return None


def _text_field(item: Field, prop: Mapping[str, Any]) -> None:
    longest, shortest = prop.get("maxLength"), prop.get("minLength")
    pattern = browser_pattern(prop.get("pattern"))
    if isinstance(longest, int) and not isinstance(longest, bool):
        item.attrs["maxlength"] = str(longest)
    if isinstance(shortest, int) and not isinstance(shortest, bool) and shortest > 0:
        item.attrs["minlength"] = str(shortest)
    if pattern:
        item.attrs["pattern"] = pattern
    if prop.get("format") == "email":
        item.input_type = "email"
    elif prop.get("format") == "date":
        item.input_type = "date"
    unbounded = not isinstance(longest, int) and "pattern" not in prop and "format" not in prop
    if unbounded or (isinstance(longest, int) and longest > LONG_TEXT):
        item.widget = "textarea"
        item.input_type = "text"
        item.attrs.pop("pattern", None)  # a text area has no pattern attribute


def _number_field(item: Field, prop: Mapping[str, Any]) -> None:
    integer = prop.get("type") == "integer"
    step = _number_text(prop.get("multipleOf"))
    item.attrs["step"] = step if step else ("1" if integer else "any")
    # An exclusive bound is shown as the inclusive one; the server refuses the bound itself.
    low = _number_text(prop.get("minimum")) or _number_text(prop.get("exclusiveMinimum"))
    high = _number_text(prop.get("maximum")) or _number_text(prop.get("exclusiveMaximum"))
    if low is not None:
        item.attrs["min"] = low
    if high is not None:
        item.attrs["max"] = high


def _field(name: str, prop: Any, parent: tuple[str, ...], required: bool, depth: int) -> Field:
    prop = prop if isinstance(prop, dict) else {}
    kind = prop.get("type")
    title, description = prop.get("title"), prop.get("description")
    item = Field(path=(*parent, name), label=title if isinstance(title, str) and title else name,
                 widget="json", schema=prop, required=required,
                 help=description if isinstance(description, str) else "")
    enum = _scalar_enum(prop)
    items = prop.get("items")
    if enum is not None:
        item.widget = "select"
        item.choices = [(str(i), v if isinstance(v, str) else json.dumps(v))
                        for i, v in enumerate(enum)]
    elif kind == "boolean":
        item.widget = "checkbox"
    elif kind in ("number", "integer"):
        item.widget = "number"
        _number_field(item, prop)
    elif kind == "string":
        item.widget = "text"
        _text_field(item, prop)
    elif kind == "object" and depth < MAX_DEPTH and _properties(prop):
        item.widget = "group"
        item.children = _fields(prop, item.path, depth + 1)
    elif (kind == "array" and isinstance(items, dict) and items.get("type") in SCALAR_TYPES
          and _scalar_enum(items) is None):
        item.widget = "list"
    if "default" in prop and item.widget != "group":  # shown filled in, as the schema suggests
        fill([item], {name: prop["default"]})
    return item


def _properties(schema: Mapping[str, Any]) -> dict[str, Any]:
    props = schema.get("properties")
    return props if isinstance(props, dict) else {}


def _fields(schema: Mapping[str, Any], parent: tuple[str, ...], depth: int) -> list[Field]:
    props = _properties(schema)
    required = schema.get("required")
    required = {n for n in required if isinstance(n, str)} if isinstance(required, list) else set()
    return [_field(str(name), prop, parent, name in required, depth)
            for name, prop in props.items()]


def fields_for(schema: Any) -> list[Field]:
    """The form's fields, in the schema's order; none when the schema names no properties (the
    input is then edited as JSON)."""
    return _fields(schema, (), 1) if isinstance(schema, dict) else []


def example_of(schema: Any) -> Any:
    """The schema's first example (the ``examples`` annotation of JSON Schema), or None."""
    examples = schema.get("examples") if isinstance(schema, dict) else None
    return examples[0] if isinstance(examples, list) and examples else None


def walk(fields: Iterable[Field]) -> Iterable[Field]:
    for item in fields:
        yield item
        yield from walk(item.children)


# --- values into the form --------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def fill(fields: list[Field], data: Any) -> None:
    """Show ``data`` (an input object, e.g. the example) in the fields."""
    data = data if isinstance(data, dict) else {}
    for item in fields:
        if item.key not in data:
            continue
        value = data[item.key]
        if item.widget == "group":
            fill(item.children, value)
        elif item.widget == "checkbox":
            item.checked = value is True
        elif item.widget == "select":
            enum = _scalar_enum(item.schema) or []
            item.value = next((str(i) for i, v in enumerate(enum) if _same(v, value)), "")
        elif item.widget == "list" and isinstance(value, list):
            item.value = "\n".join(v if isinstance(v, str) else json.dumps(v) for v in value)
        elif item.widget in ("text", "textarea") and isinstance(value, str):
            item.value = value
        else:
            item.value = json.dumps(value, ensure_ascii=False, indent=1 if item.widget == "json"
                                    else None)


# --- the posted form as typed values ---------------------------------------------------------


def _number(raw: str, integer: bool) -> int | float:
    text = raw.strip()
    if len(text) > 40:
        raise ValueError("is too long for a number")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError("must be a whole number" if integer else "must be a number") from None
    if not value.is_finite():
        raise ValueError("must be a finite number")
    if value and abs(value.adjusted()) > 300:
        # (1e999999999 is 40 characters, and a billion digits as an int)
        raise ValueError("is out of range")
    if value == value.to_integral_value():
        return int(value)
    if integer:
        raise ValueError("must be a whole number")
    return float(value)


def _coerce(item: Field, raw: str) -> Any:
    """The posted text of one field as its typed value (raises ValueError with the message)."""
    if item.widget == "number":
        return _number(raw, item.schema.get("type") == "integer")
    if item.widget == "select":
        enum = _scalar_enum(item.schema) or []
        if not (raw.isascii() and raw.isdigit() and int(raw) < len(enum)):
            raise ValueError("must be one of the listed options")
        return enum[int(raw)]
    if item.widget == "list":
        kind = (item.schema.get("items") or {}).get("type")
        values: list[Any] = []
        for line, text in enumerate(raw.splitlines(), start=1):
            if not text.strip():
                continue
            try:
                values.append(text.strip() if kind == "string" else
                              _number(text, kind == "integer"))
            except ValueError as exc:
                raise ValueError(f"line {line} {exc}") from None
        return values
    if item.widget == "json":
        try:
            return hygiene.loads(raw, "")
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON: {exc.msg} (line {exc.lineno}, column "
                             f"{exc.colno})") from None
        except hygiene.Refused as exc:
            raise ValueError(f"refused: {exc}") from None
    # Browsers send a text area's line breaks as CRLF.
    return raw.replace("\r\n", "\n") if item.widget == "textarea" else raw


def _read(fields: list[Field], posted: Mapping[str, str], out: dict[str, Any]) -> bool:
    """Put the posted value of each field into ``out``; whether anything was given."""
    given = False
    for item in fields:
        if item.widget == "group":
            inner: dict[str, Any] = {}
            inner_given = _read(item.children, posted, inner)
            if inner_given or item.required:  # an optional group left empty is left out
                out[item.key] = inner
                given = given or inner_given
            continue
        if item.widget == "checkbox":
            item.checked = item.name in posted
            out[item.key] = item.checked
            given = given or item.checked
            continue
        raw = posted.get(item.name, "")
        item.value = raw
        if (raw if item.widget in ("text", "textarea") else raw.strip()) == "":
            continue  # not given: the schema says whether it must be
        given = True
        try:
            out[item.key] = _coerce(item, raw)
        except ValueError as exc:
            item.error = f"{item.dotted} {exc}"
    return given


def _message(error: jsonschema.ValidationError) -> str:
    """The schema error phrased to follow a field's name."""
    value, kind = error.validator_value, error.validator
    bounds = {"minimum": "must be at least", "maximum": "must be at most",
              "exclusiveMinimum": "must be more than", "exclusiveMaximum": "must be less than"}
    if kind in bounds:
        return f"{bounds[kind]} {value}"
    if kind == "minLength":
        return "is required" if value == 1 else f"must be at least {value} characters long"
    if kind == "maxLength":
        return f"must be at most {value} characters long"
    if kind == "pattern":
        return f"does not have the expected form (pattern {value})"
    if kind == "type":
        return f"must be of type {value if isinstance(value, str) else ' or '.join(value)}"
    if kind == "enum":
        return "must be one of " + ", ".join(json.dumps(v) for v in value)
    if kind == "minItems":
        return f"needs at least {value} item{'s' if value != 1 else ''}"
    if kind == "maxItems":
        return f"takes at most {value} item{'s' if value != 1 else ''}"
    return error.message


def problems(schema: Any, data: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) for each way ``data`` breaks ``schema``; a missing property's path
    names the property itself."""
    validator = jsonschema.Draft202012Validator(schema if isinstance(schema, dict) else {})
    found: list[tuple[tuple[str | int, ...], str]] = []
    for error in validator.iter_errors(data):
        path = tuple(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            found += [((*path, n), "is required") for n in error.validator_value
                      if n not in error.instance]
        elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = _properties(error.schema if isinstance(error.schema, dict) else {})
            found += [((*path, n), "is not expected") for n in error.instance if n not in known]
        else:
            found.append((path, _message(error)))
    return found


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "input"


def place(fields: list[Field], found: Iterable[tuple[tuple[str | int, ...], str]]) -> list[str]:
    """Put each problem next to the field it concerns (the deepest field its path starts
    with); the ones no field holds are returned, named by their path."""
    by_path = {item.path: item for item in walk(fields)}
    general: list[str] = []
    for path, message in found:
        target = next((by_path[tuple(path[:n])] for n in range(len(path), 0, -1)
                       if all(isinstance(p, str) for p in path[:n])
                       and tuple(path[:n]) in by_path), None)
        if target is None or target.widget == "group" and tuple(path) != target.path:
            general.append(f"{_dotted(path)} {message}")
        elif not target.error:
            target.error = f"{_dotted(path)} {message}"
    return general


def _pointer(path: str) -> tuple[str | int, ...]:
    """A hygiene path ("input/a/b") as steps (its leading "input" dropped)."""
    steps = path.split("/")[1:] if path else []
    return tuple(s.replace("~1", "/").replace("~0", "~") for s in steps)


def read(schema: Any, fields: list[Field], posted: Mapping[str, str]) -> tuple[
        dict[str, Any] | None, list[str]]:
    """(the input, errors no field holds). The input is None when a field could not be read
    or the input breaks the hygiene rules or the schema; the fields then hold the posted
    values and their errors."""
    data: dict[str, Any] = {}
    _read(fields, posted, data)
    # On to the checks even when a field could not be read, so that every error shows at
    # once; a field keeps the first error found for it.
    try:
        hygiene.check(data, "input")
    except hygiene.Refused as exc:
        return None, place(fields, [(_pointer(exc.path), f"refused: {exc}")])
    general = place(fields, problems(schema, data))
    if general or any(item.error for item in walk(fields)):
        return None, general
    return data, []
