"""What a person answers with: the ``respond`` decision on a task for a person (``human_task``)
or an agent's question (``question``), checked against the schema the request asks for.

A human task's request carries its task's output schema in its context; a question is answered
with ``{"answer": "..."}``. Problems are named by field, so the API's error and the review
page's form both say which field is wrong and why."""

from __future__ import annotations

from typing import Any

import jsonschema

from approvals.models import Reason

RESPONDABLE = (Reason.HUMAN_TASK, Reason.QUESTION)

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["answer"],
    "additionalProperties": False,
    "properties": {"answer": {"type": "string", "minLength": 1, "title": "Answer"}},
}


def schema_for(reason: str, context: dict[str, Any] | None) -> dict[str, Any]:
    """The schema a response to a request opened for ``reason`` must match."""
    if reason == Reason.QUESTION:
        return ANSWER_SCHEMA
    schema = (context or {}).get("output_schema") or {}
    return dict(schema) if schema else {"type": "object"}


def problems(schema: dict[str, Any], output: Any) -> list[tuple[str, str]]:
    """(field, message) for every way ``output`` breaks ``schema``; the field is a dotted path
    ("" for the whole object). A missing required field is named as the field itself."""
    if not isinstance(output, dict):
        return [("", "the output must be an object")]
    try:
        validator = jsonschema.Draft202012Validator(schema)
        errors = list(validator.iter_errors(output))
    except jsonschema.SchemaError as exc:
        return [("", f"the task's output schema is not valid JSON Schema: {exc.message}")]
    found: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for error in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        path = ".".join(str(p) for p in error.absolute_path)
        items: list[tuple[str, str]]
        if error.validator == "required" and isinstance(error.instance, dict):
            prefix = f"{path}." if path else ""
            items = [(f"{prefix}{name}", "this field is required")
                     for name in error.validator_value if name not in error.instance]
        elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set((error.schema or {}).get("properties", {}))
            prefix = f"{path}." if path else ""
            items = [(f"{prefix}{name}", "this field is not expected")
                     for name in error.instance if name not in known]
        else:
            items = [(path, error.message)]
        for item in items:
            if item not in seen:
                seen.add(item)
                found.append(item)
    return found


def describe(found: list[tuple[str, str]]) -> str:
    """The problems as one message naming each field."""
    return "; ".join(f"output.{field}: {message}" if field else message
                     for field, message in found)
