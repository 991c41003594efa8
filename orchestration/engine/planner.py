"""The planner's side of a planned run, Django-free: the conversation a planner agent has (rebuilt
from the run's ledger, so a resumed worker never asks the model again for a turn it recorded),
reading a proposal out of its reply, the checks of a plan against the process's constraints,
and the design gate's policy. Production (orchestration/planning.py) and replay share these."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from orchestration.engine.errors import PlanError
from orchestration.engine.llm import Message
from orchestration.engine.plan import Plan, load_plan_text, parse_plan

# The ledger events of planning, in the order a planner's conversation replays them.
PROPOSED, VALIDATED, REJECTED = "plan.proposed", "plan.validated", "plan.rejected"
FEEDBACK, APPROVED, EDITED = "plan.feedback", "plan.approved", "plan.edited"
PLAN_EVENTS = (PROPOSED, VALIDATED, REJECTED, FEEDBACK, APPROVED, EDITED)
# How many proposals a planner gets when its agent has no step budget.
DEFAULT_TURNS = 5

GUIDE = (
    "Propose a plan as one JSON (or YAML) object in a fenced code block: "
    '{"tasks": [{"key": "snake_case", "title": "...", "executor": {"type": "agent" | "tool" | '
    '"function" | "human", "ref": "<slug or group>"}, "depends_on": ["<key>"], "args": {}, '
    '"spec": "...", "budget": {"tokens": n, "cost": "x"}}], "result": {}}. '
    "Use only the executors you are told about; an agent task may use only the tools granted "
    "to that agent."
)
_FENCE = re.compile(r"```[ \t]*([A-Za-z]*)[ \t]*\n(.*?)```", re.S)
_PLACEHOLDER = re.compile(r"\{\{\s*input((?:\.[A-Za-z0-9_]+)*)\s*\}\}")


def fill_goal(template: str, run_input: Any) -> str:
    """The goal with its ``{{input.path}}`` placeholders filled in from the run's input."""
    def fill(match: re.Match[str]) -> str:
        node: Any = run_input
        for part in filter(None, match.group(1).split(".")):
            node = node.get(part) if isinstance(node, Mapping) else None
        return "" if node is None else str(node)

    return _PLACEHOLDER.sub(fill, template)


def briefing(planning: Mapping[str, Any], run_input: Any, executors: str = "") -> str:
    """The planner's first message: the goal, the constraints and what it may use."""
    constraints = planning.get("constraints") or {}
    lines = [f"Goal: {fill_goal(str(planning.get('goal', '')), run_input)}"]
    if "max_tasks" in constraints:
        lines.append(f"At most {constraints['max_tasks']} tasks.")
    if "max_cost" in constraints:
        lines.append(f"The tasks' budgets may cost at most {constraints['max_cost']} in all.")
    if executors:
        lines.append(executors)
    return "\n".join(lines)


def conversation(instructions: str, first: str,
                 history: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Message]:
    """The planner's messages: its instructions, the briefing, then per recorded event its own
    proposals and what came back (a validation's errors, a reviewer's note)."""
    messages = [Message("system", "\n\n".join(filter(None, [instructions, GUIDE]))),
                Message("user", first)]
    for kind, data in history:
        if kind == PROPOSED:
            messages.append(Message("assistant", str((data.get("response") or {})
                                                     .get("text", ""))))
        elif kind == REJECTED and data.get("by_planner", True):
            messages.append(Message("user", "The plan is invalid:\n- " + "\n- ".join(
                data.get("errors") or []) + "\nPropose a corrected plan."))
        elif kind == FEEDBACK:
            messages.append(Message("user", "A reviewer sent the plan back: "
                                    f"{data.get('note') or 'no note'}\nPropose a new plan."))
    return messages


def turns_left(budget: int, history: Iterable[tuple[str, Mapping[str, Any]]]) -> int:
    """Proposals the planner may still make: its budget, counted from the last time people
    sent it back to planning."""
    used = 0
    for kind, _ in history:
        if kind == PROPOSED:
            used += 1
        elif kind == FEEDBACK:
            used = 0
    return max(0, budget - used)


def extract(text: str) -> dict[str, Any]:
    """The plan in a reply: the first fenced block that holds one, else the whole text."""
    candidates = [body for _, body in _FENCE.findall(text)] + [text]
    error: PlanError | None = None
    for body in candidates:
        try:
            data = load_plan_text(body)
        except PlanError as exc:
            error = error or exc
            continue
        if isinstance(data, dict):
            return data
    raise error or PlanError("the reply holds no plan")


def estimate(plan: Plan) -> Decimal:
    """What the plan's tasks may cost: the sum of their cost budgets (unbudgeted tasks add 0)."""
    total = Decimal("0")
    for task in plan.tasks:
        try:
            total += Decimal(str(task.budget.get("cost", 0)))
        except InvalidOperation:
            continue
    return total


def proposal(data: Mapping[str, Any]) -> tuple[Plan | None, list[str]]:
    """Parse a proposed plan: a plan of tasks (no planning of its own)."""
    if not isinstance(data, Mapping):
        return None, ["the plan must be a mapping with a 'tasks' list"]
    if "planning" in data or "design_gate" in data:
        return None, ["a proposed plan lists tasks; it cannot plan again or set a design gate"]
    if not data.get("tasks"):
        return None, ["the plan has no tasks"]
    if any(isinstance(t, Mapping) and ("delegated_by" in t or "call_key" in t)
           for t in data.get("tasks") or ()):
        return None, ["delegated_by and call_key are set by the engine when an agent "
                      "delegates; a plan cannot set them"]
    try:
        return parse_plan(data), []
    except PlanError as exc:
        return None, [str(exc)]


def within(plan: Plan, constraints: Mapping[str, Any]) -> list[str]:
    """What breaks the process's constraints (max_tasks, max_cost)."""
    errors = []
    limit = constraints.get("max_tasks")
    if limit is not None and len(plan.tasks) > int(limit):
        errors.append(f"the plan has {len(plan.tasks)} tasks; at most {limit} are allowed")
    cap = constraints.get("max_cost")
    if cap is not None and estimate(plan) > Decimal(str(cap)):
        errors.append(f"the tasks' budgets add up to {estimate(plan)}; at most {cap} is allowed")
    return errors


def gate_reasons(gate: Mapping[str, Any], plan: Plan, tools_used: Iterable[str],
                 run_input: Any = None) -> list[str]:
    """Why the design gate wants a person to approve this plan (empty: it runs at once)."""
    reasons = []
    for field, limit in (gate.get("input_over") or {}).items():
        value = run_input.get(field) if isinstance(run_input, Mapping) else None
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and Decimal(str(value)) > Decimal(str(limit))):
            reasons.append(f"the run's {field} {value} is over {limit}")
    if gate.get("always"):
        reasons.append("the process has every plan reviewed")
    over = gate.get("cost_over")
    if over is not None and estimate(plan) > Decimal(str(over)):
        reasons.append(f"the estimated cost {estimate(plan)} is over {over}")
    listed = sorted(set(gate.get("tools") or ()) & set(tools_used))
    if listed:
        reasons.append(f"the plan uses {', '.join(listed)}")
    return reasons
