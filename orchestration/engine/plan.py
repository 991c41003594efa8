"""Plans: a process's template of tasks with explicit dependencies, parsed and validated."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import jsonschema
import yaml

from jsonkit import check_schema, schema_problems
from orchestration.engine.errors import PlanError

EXECUTOR_TYPES = ("tool", "function", "agent", "human")
SLUG = "^[-a-zA-Z0-9_]{1,50}$"  # a knowledge collection's slug
KNOWLEDGE_TOKENS = 800  # a task's knowledge budget unless it names one

# A sentinel check: ``require`` a value to be present and not empty, ``equal`` two values, or
# that a text ``contains`` a value. Values are references: ``$input.<path>``,
# ``$tasks.<dep>.<path>`` (a dependency's output), ``$output.<path>`` (this task's output, with
# ``key_facts`` from its handoff) and ``$args.<tool>.<path>`` (what this task called a tool with).
CHECK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 2,
    "properties": {
        "require": {"type": "string", "pattern": "^\\$"},
        "equal": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
        "contains": {"type": "array", "items": {"type": "string"}, "minItems": 2,
                     "maxItems": 2},
        "message": {"type": "string"},
    },
}

# A task's own budget (and the default one of a task an agent delegates).
BUDGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "tokens": {"type": "integer", "minimum": 1},
        "cost": {"type": ["number", "string"]},
    },
}

PLAN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "oneOf": [{"required": ["tasks"]}, {"required": ["planning"]}],  # a fixed plan, or planned
    "additionalProperties": False,
    "properties": {
        # A planned process: a planner agent proposes the tasks of each run (PLANNING_SCHEMA).
        "planning": {"$ref": "#/$defs/planning"},
        # When a proposed plan needs a person's approval before it runs.
        "design_gate": {"$ref": "#/$defs/design_gate"},
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
                    "budget": BUDGET_SCHEMA,
                    # What the task hands on must match (agent tasks: the handoff's key_facts;
                    # human tasks: the submitted answer).
                    "output_schema": {"type": "object"},
                    # Sentinel: the tools the task may call (scope) and deterministic checks.
                    "tools": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    "checks": {"type": "array", "items": CHECK_SCHEMA},
                    # Delegation: the agents this task's agent may hand work to (a handoff
                    # tool each, engine/delegation.py).
                    "delegates": {"type": "array", "uniqueItems": True,
                                  "items": {"type": "string", "minLength": 1}},
                    # Just-in-time knowledge (engine/knowledge.py): the collections whose best
                    # chunks for the spec go into an agent task's prompt, within a budget.
                    "knowledge": {"type": "array", "uniqueItems": True, "maxItems": 10,
                                  "items": {"type": "string", "pattern": SLUG}},
                    "knowledge_tokens": {"type": "integer", "minimum": 50, "maximum": 20000},
                    # Set by the engine on a task an agent delegated: who asked, and the call.
                    "delegated_by": {"type": "string"},
                    "call_key": {"type": "string"},
                },
            },
        },
        "result": {"type": "object"},
        # The process's result contract: a run whose result breaks it fails.
        "result_schema": {"type": "object"},
        # QC: the audit agent, the rework limit and the confidence threshold.
        "verification": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "auditor": {"type": "string", "minLength": 1},
                "rework_limit": {"type": "integer", "minimum": 0, "maximum": 10},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
        # Limits on delegation between agents, per run of the process.
        "delegation": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_depth": {"type": "integer", "minimum": 1, "maximum": 5},
                "max_fan_out": {"type": "integer", "minimum": 1, "maximum": 20},
                "budget": BUDGET_SCHEMA,  # a delegated task's, when its call asks for none
            },
        },
        # QC of the run as a whole: once every task succeeded the auditor checks the outputs
        # against the goal's criteria (the run is ``verifying``), before the run may succeed.
        "run_check": {
            "type": "object",
            "additionalProperties": False,
            "required": ["acceptance"],
            "properties": {
                "auditor": {"type": "string", "minLength": 1},
                "goal": {"type": "string"},
                "acceptance": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            },
        },
    },
}

# The task the engine adds for a plan's ``run_check``: it depends on every other task.
RUN_CHECK_KEY = "verify_run"
AUDIT = "audit"
PLAN_SCHEMA["$defs"] = {
    "planning": {
        "type": "object",
        "required": ["agent", "goal"],
        "additionalProperties": False,
        "properties": {
            "agent": {"type": "string", "minLength": 1},
            "goal": {"type": "string", "minLength": 1},
            "constraints": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "max_tasks": {"type": "integer", "minimum": 1},
                    "max_cost": {"type": "number", "minimum": 0},
                },
            },
        },
    },
    "design_gate": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "always": {"type": "boolean"},
            "cost_over": {"type": "number", "minimum": 0},
            "tools": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            # A person reviews the plan when a number in the run's input is over its limit.
            "input_over": {"type": "object", "additionalProperties": {"type": "number"}},
        },
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
    output_schema: Mapping[str, Any] = field(default_factory=dict)
    tools: tuple[str, ...] | None = None
    checks: tuple[Mapping[str, Any], ...] = ()
    delegates: tuple[str, ...] = ()
    delegated_by: str = ""
    call_key: str = ""
    knowledge: tuple[str, ...] = ()
    knowledge_tokens: int = KNOWLEDGE_TOKENS


@dataclass(frozen=True, slots=True)
class Verification:
    """QC settings of a plan: who audits, how many reworks a task gets, and the confidence
    below which a person decides."""

    auditor: str = ""
    rework_limit: int = 2
    confidence: float = 0.7


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: tuple[TaskSpec, ...]
    result: Mapping[str, Any] = field(default_factory=dict)
    result_schema: Mapping[str, Any] = field(default_factory=dict)
    verification: Verification = field(default_factory=Verification)
    # A planned process's planner settings and design gate (empty for a plan of tasks).
    planning: Mapping[str, Any] = field(default_factory=dict)
    design_gate: Mapping[str, Any] = field(default_factory=dict)
    delegation: Mapping[str, Any] = field(default_factory=dict)

    def by_key(self) -> dict[str, TaskSpec]:
        return {t.key: t for t in self.tasks}

    def with_task(self, task: TaskSpec) -> Plan:
        """This plan with ``task`` added (a delegated task joins its run's plan)."""
        tasks = list(self.tasks)
        at = len(tasks) - 1 if tasks and tasks[-1].key == RUN_CHECK_KEY else len(tasks)
        tasks.insert(at, task)  # the run's check stays last, as parse_plan puts it
        return replace(self, tasks=tuple(tasks))

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
            if t.output_schema:
                item["output_schema"] = dict(t.output_schema)
            if t.tools is not None:
                item["tools"] = list(t.tools)
            if t.checks:
                item["checks"] = [dict(c) for c in t.checks]
            if t.delegates:
                item["delegates"] = list(t.delegates)
            if t.knowledge:
                item["knowledge"] = list(t.knowledge)
                item["knowledge_tokens"] = t.knowledge_tokens
            if t.delegated_by:
                item["delegated_by"] = t.delegated_by
                item["call_key"] = t.call_key
            tasks.append(item)
        data: dict[str, Any] = {"tasks": tasks, "result": dict(self.result)}
        if self.result_schema:
            data["result_schema"] = dict(self.result_schema)
        if self.verification != Verification():
            v = self.verification
            data["verification"] = {"auditor": v.auditor, "rework_limit": v.rework_limit,
                                    "confidence": v.confidence}
        check = self.by_key().get(RUN_CHECK_KEY)
        if check is not None and check.executor_type == AUDIT:
            data["tasks"] = [t for t in tasks if t["key"] != RUN_CHECK_KEY]
            data["run_check"] = {"auditor": check.executor_ref, "goal": check.spec,
                                 "acceptance": list(check.acceptance)}
        if self.planning:
            data["planning"] = dict(self.planning)
        if self.design_gate:
            data["design_gate"] = dict(self.design_gate)
        if self.delegation:
            data["delegation"] = dict(self.delegation)
        return data


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
            output_schema=t.get("output_schema", {}),
            tools=tuple(t["tools"]) if "tools" in t else None,
            checks=tuple(t.get("checks", ())),
            delegates=tuple(t.get("delegates", ())),
            delegated_by=t.get("delegated_by", ""),
            call_key=t.get("call_key", ""),
            knowledge=tuple(t.get("knowledge", ())),
            knowledge_tokens=t.get("knowledge_tokens", KNOWLEDGE_TOKENS),
        )
        for t in data.get("tasks", ())
    )
    _check_graph(tasks)
    for t in tasks:
        if t.knowledge and t.executor_type != "agent":
            raise PlanError(f"task {t.key!r}: only an agent task takes knowledge")
    for name, schema in [("result_schema", data.get("result_schema")),
                         *((f"task {t.key!r} output_schema", t.output_schema) for t in tasks)]:
        if schema:
            try:
                check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise PlanError(f"{name} is not valid JSON Schema: {exc.message}") from None
    v = data.get("verification", {})
    verification = Verification(auditor=v.get("auditor", ""),
                                rework_limit=v.get("rework_limit", 2),
                                confidence=float(v.get("confidence", 0.7)))
    if "run_check" in data:
        tasks = (*tasks, _run_check(data["run_check"], tasks, verification))
    return Plan(tasks=tasks, result=data.get("result", {}),
                result_schema=data.get("result_schema", {}), verification=verification,
                planning=data.get("planning", {}), design_gate=data.get("design_gate", {}),
                delegation=data.get("delegation", {}))


def _run_check(check: Mapping[str, Any], tasks: tuple[TaskSpec, ...],
               verification: Verification) -> TaskSpec:
    auditor = check.get("auditor") or verification.auditor
    if not auditor:
        raise PlanError("run_check needs an auditor (its own, or verification.auditor)")
    if any(t.key == RUN_CHECK_KEY for t in tasks):
        raise PlanError(f"task key {RUN_CHECK_KEY!r} is reserved for the run's check")
    return TaskSpec(key=RUN_CHECK_KEY, executor_type=AUDIT, executor_ref=auditor,
                    depends_on=tuple(t.key for t in tasks if not t.delegated_by),
                    title="Verify the run",
                    spec=check.get("goal", ""), acceptance=tuple(check["acceptance"]))


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
