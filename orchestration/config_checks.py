"""What makes a tool, an agent or a price usable by a run, checked where it is configured.

Every agent task builds the contracts of all tools and the model of its agent before its first
step (``orchestration.agents``), so one tool whose schema is not a schema, or an agent whose
``model_params`` its client cannot take, would fail every task from then on, long after the
admin who typed it has left. These checks run in the models' ``clean_fields`` (so the Django
admin, any ModelForm and ``full_clean`` refuse the same values) and name the field, the problem
and the expected form.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import jsonschema
from django.core.exceptions import ValidationError

from audit import hygiene
from jsonkit import check_schema
from orchestration.builtin_tools import registry
from orchestration.model_params import PROVIDERS, check_model_params

TIMEOUT_MAX_S = 3600
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class CheckedFields:
    """A model mixin: after Django's own field checks, ``config_problems`` (field → messages)
    are added for each field the caller validates and that has no error yet. Done in
    ``clean_fields`` rather than ``clean`` so that a form leaving a field out is not handed an
    error for it."""

    def config_problems(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def clean_fields(self, exclude: Any = None) -> None:
        errors: dict[str, Any] = {}
        try:
            super().clean_fields(exclude)  # type: ignore[misc]
        except ValidationError as exc:
            errors = exc.update_error_dict(errors)
        skip = set(exclude or ()) | set(errors)
        for field, messages in self.config_problems().items():
            if messages and field not in skip:
                errors[field] = messages
        if errors:
            raise ValidationError(errors)


def _json_problems(value: Any, what: str) -> list[str]:
    try:
        hygiene.check(value, what)
    except hygiene.Refused as exc:
        return [str(exc)]
    return []


def json_schema_problems(schema: Any, *, arguments: bool = False) -> list[str]:
    """Problems with a tool's JSON Schema (2020-12). ``arguments``: it describes a call's
    arguments, which are passed by name, so it must accept objects only."""
    if not isinstance(schema, dict):
        return ['must be a JSON Schema object, e.g. {"type": "object", "properties": {}}']
    problems = _json_problems(schema, "the schema")
    if problems:
        return problems
    try:
        check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return ["is not a valid JSON Schema (2020-12): " + (f"at {where}: " if where else "")
                + exc.message]
    if arguments and schema.get("type") != "object":
        return ['must describe an object ("type": "object"): a tool takes named arguments']
    return []


def rate_limit_problems(text: Any) -> list[str]:
    """The rate limit as ``orchestration.governance`` reads it: one ``limits`` item."""
    if not text:
        return []
    from limits import parse_many

    expected = 'write it like "10/minute", "100 per hour" or "5/10 seconds"; blank for none'
    if not isinstance(text, str):
        return [expected]
    try:
        items = parse_many(text)
    except ValueError:
        return [f"{text!r} is not a rate limit: {expected}"]
    if len(items) != 1:
        return [f"{text!r} holds {len(items)} limits; give one: {expected}"]
    if items[0].amount < 1:
        return [f"{text!r} allows no call at all; revoke the tool's grants instead, or "
                f"{expected}"]
    return []


def timeout_problems(value: Any) -> list[str]:
    if (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value <= TIMEOUT_MAX_S):
        return []
    return [f"must be a number of seconds above 0 and at most {TIMEOUT_MAX_S}"]


def amount_problems(value: Any) -> list[str]:
    if isinstance(value, Decimal) and value.is_finite() and value >= 0:
        return []
    return ["must be an amount of at least 0"]


def _url_problems(tool: Any) -> list[str]:
    url = tool.url_template or ""
    if not url:
        return ["an HTTP tool needs a URL, e.g. https://crm.example/api/customers/{id}"]
    names = _PLACEHOLDER.findall(url)
    try:
        parts = urlsplit(_PLACEHOLDER.sub("x", url))
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return ["must be an http:// or https:// URL, e.g. https://crm.example/api/customers/{id}"]
    schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
    known = schema.get("properties") or {}
    missing = [n for n in names if n not in known]
    if missing:
        return [f"placeholder {{{missing[0]}}} is not an argument of the input schema "
                f"(its properties: {', '.join(sorted(known)) or 'none'})"]
    return []


def tool_problems(tool: Any) -> dict[str, list[str]]:
    problems = {
        "input_schema": json_schema_problems(tool.input_schema, arguments=True),
        "output_schema": json_schema_problems(tool.output_schema),
        "rate_limit": rate_limit_problems(tool.rate_limit),
        "timeout_s": timeout_problems(tool.timeout_s),
        "cost_per_call": amount_problems(tool.cost_per_call),
    }
    if tool.quota_per_window == 0:
        problems["quota_per_window"] = ["0 allows no call at all; leave it blank for no quota"]
    if not tool.quota_window_s:
        problems["quota_window_s"] = ["the window must be at least 1 second"]
    if tool.kind == type(tool).Kind.HTTP:
        problems["url_template"] = _url_problems(tool)
        if (tool.http_method or "POST").upper() not in HTTP_METHODS:
            problems["http_method"] = [f"must be one of {', '.join(HTTP_METHODS)}"]
    elif tool.implementation not in registry.names():
        problems["implementation"] = [
            f"{tool.implementation!r} is not a registered tool: one of "
            f"{', '.join(sorted(registry.names()))} (or make it an HTTP endpoint)"]
    return problems


def agent_problems(agent: Any) -> dict[str, list[str]]:
    if agent.provider not in PROVIDERS:
        return {"provider": [f"unknown provider {agent.provider!r}: one of "
                             f"{', '.join(PROVIDERS)}"]}
    problems = {"model_params": (_json_problems(agent.model_params, "model_params")
                                 or check_model_params(agent.provider, agent.model_params))}
    if agent.provider != "scripted" and not agent.model_name:
        problems["model_name"] = [f"the {agent.provider} provider needs a model name"]
    if agent.step_budget == 0:
        problems["step_budget"] = ["an agent needs at least 1 step per loop"]
    return problems


def price_problems(price: Any) -> dict[str, list[str]]:
    """A price under a provider no agent can name would never be found: its calls cost 0."""
    problems = {"input_per_mtok": amount_problems(price.input_per_mtok),
                "output_per_mtok": amount_problems(price.output_per_mtok)}
    if price.provider not in PROVIDERS:
        problems["provider"] = [f"unknown provider {price.provider!r}: one of "
                                f"{', '.join(PROVIDERS)}"]
    return problems
