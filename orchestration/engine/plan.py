"""Plans: a process's template of tasks with explicit dependencies, parsed and validated."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import yaml

from jsonkit import schema_problems
from orchestration.engine.errors import PlanError

EXECUTOR_TYPES = ("tool", "function", "agent", "human")

PLAN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["tasks"],
    "additionalProperties": False,
    "properties": {
        "tasks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["key", "executor"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,62}$"},
                    "title": {"type": "string"},
                    "executor": {
                        "type": "object",
                        "required": ["type", "ref"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": list(EXECUTOR_TYPES)},
                            "ref": {"type": "string", "minLength": 1},
                        },
                    },
                    "depends_on": {
                        "type": "array",
                        "items": {"type": "string"},
                        "uniqueItems": True,
                    },
                    "args": {"type": "object"},
                    "spec": {"type": "string"},
                    "acceptance": {"type": "array", "items": {"type": "string"}},
                    "budget": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "tokens": {"type": "integer", "minimum": 1},
                            "cost": {"type": ["number", "string"]},
                        },
                    },
                },
            },
        },
        "result": {"type": "object"},
    },
}
_PLAN_VALIDATOR = jsonschema.Draft202012Validator(PLAN_SCHEMA)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    key: str
    executor_type: str
    executor_ref: str
    depends_on: tuple[str, ...] = ()
    args: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""
    spec: str = ""
    acceptance: tuple[str, ...] = ()
    budget: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: tuple[TaskSpec, ...]
    result: Mapping[str, Any] = field(default_factory=dict)

    def by_key(self) -> dict[str, TaskSpec]:
        return {t.key: t for t in self.tasks}

    def ready(self, statuses: Mapping[str, str]) -> list[str]:
        """Keys of pending tasks whose dependencies have all succeeded, in plan order."""
        return [
            t.key
            for t in self.tasks
            if statuses.get(t.key) == "pending"
            and all(statuses.get(dep) == "succeeded" for dep in t.depends_on)
        ]

    def to_dict(self) -> dict[str, Any]:
        tasks = []
        for t in self.tasks:
            item: dict[str, Any] = {
                "key": t.key,
                "executor": {"type": t.executor_type, "ref": t.executor_ref},
                "depends_on": list(t.depends_on),
                "args": dict(t.args),
            }
            if t.title:
                item["title"] = t.title
            if t.spec:
                item["spec"] = t.spec
            if t.acceptance:
                item["acceptance"] = list(t.acceptance)
            if t.budget:
                item["budget"] = dict(t.budget)
            tasks.append(item)
        return {"tasks": tasks, "result": dict(self.result)}


def load_plan_text(text: str) -> dict[str, Any]:
    """Parse a plan written as JSON or YAML (JSON is a subset of YAML, but try it first)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"the plan is neither valid JSON nor valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PlanError("the plan must be a mapping with a 'tasks' list")
    return data


def parse_plan(source: str | Mapping[str, Any]) -> Plan:
    data = load_plan_text(source) if isinstance(source, str) else source
    problems = schema_problems(_PLAN_VALIDATOR, data, limit=1)
    if problems:
        raise PlanError(f"plan is invalid at {problems[0].at()}: {problems[0].message}")
    tasks = tuple(
        TaskSpec(
            key=t["key"],
            executor_type=t["executor"]["type"],
            executor_ref=t["executor"]["ref"],
            depends_on=tuple(t.get("depends_on", ())),
            args=t.get("args", {}),
            title=t.get("title", ""),
            spec=t.get("spec", ""),
            acceptance=tuple(t.get("acceptance", ())),
            budget=t.get("budget", {}),
        )
        for t in data["tasks"]
    )
    _check_graph(tasks)
    return Plan(tasks=tasks, result=data.get("result", {}))


def _check_graph(tasks: Iterable[TaskSpec]) -> None:
    tasks = list(tasks)
    keys = [t.key for t in tasks]
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise PlanError(f"task key {key!r} appears more than once")
        seen.add(key)
    for t in tasks:
        for dep in t.depends_on:
            if dep not in seen:
                raise PlanError(f"task {t.key!r} depends on unknown task {dep!r}")
            if dep == t.key:
                raise PlanError(f"task {t.key!r} depends on itself")
    order = topological_order(tasks)
    if len(order) != len(tasks):
        stuck = sorted(set(keys) - set(order))
        raise PlanError(f"the plan has a dependency cycle among: {', '.join(stuck)}")


def topological_order(tasks: Iterable[TaskSpec]) -> list[str]:
    tasks = list(tasks)
    remaining = {t.key: set(t.depends_on) for t in tasks}
    order: list[str] = []
    while True:
        free = [k for k, deps in remaining.items() if not deps]
        if not free:
            break
        for k in free:
            order.append(k)
            del remaining[k]
        for deps in remaining.values():
            deps.difference_update(free)
    return order
