"""Resolve ``$input.a.b`` and ``$tasks.<key>.a.b`` references in a task's arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestration.engine.errors import ReferenceError_

_MISSING = object()


def _walk(value: Any, path: list[str], ref: str) -> Any:
    for part in path:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise ReferenceError_(f"reference {ref!r} names nothing (no {part!r})")
    return value


def resolve(template: Any, *, run_input: Mapping[str, Any], outputs: Mapping[str, Any],
            strict: bool = True) -> Any:
    """Fill references. ``strict=False`` turns a reference that names nothing into None (for a
    run's result, where a rejected action legitimately leaves a hole)."""
    if isinstance(template, str) and template.startswith("$"):
        parts = template[1:].split(".")
        root = parts[0]
        try:
            if root == "input":
                return _walk(run_input, parts[1:], template)
            if root == "tasks" and len(parts) >= 2:
                if parts[1] not in outputs:
                    raise ReferenceError_(
                        f"reference {template!r} names a task that is not a dependency")
                return _walk(outputs[parts[1]], parts[2:], template)
        except ReferenceError_:
            if strict:
                raise
            return None
        return template
    if isinstance(template, Mapping):
        return {k: resolve(v, run_input=run_input, outputs=outputs, strict=strict)
                for k, v in template.items()}
    if isinstance(template, list):
        return [resolve(v, run_input=run_input, outputs=outputs, strict=strict)
                for v in template]
    return template
