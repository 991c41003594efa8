"""A run's trace as a span tree built from its ledger, for the waterfall on the trace page.

run → phase (planning, execution, verifying) → task attempt → model call, tool call, decision
(an approval request and what people decided) and wait (a task waiting on people). Each span
has a start, an end, a status and the tokens and cost of the calls under it. Times come from
the ledger: an event's ``at`` is when the step was recorded, so a call that recorded its
latency started that long before; one that did not (an audit) is taken to have started with
the task's previous event.

Everything is read from one query of the run's events; a model call's conversation comes from
its transcript (orchestration.models.Transcript) only when that span is opened."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from orchestration.engine.states import RUN_TERMINAL

PHASES = {"planning": "planning", "awaiting_plan_approval": "planning", "queued": "execution",
          "running": "execution", "waiting": "execution", "verifying": "verifying"}
TASK_ENDS = {"task.succeeded": "succeeded", "task.failed": "failed",
             "task.cancelled": "cancelled", "task.escalated": "escalated",
             "task.waiting": "waiting"}
# What ends a task's wait on people.
WAIT_ENDS = ("task.requeued", "task.started", "task.cancelled", "task.failed",
             "task.succeeded")
TOOL_STATUS = {"tool.called": "succeeded", "tool.failed": "failed", "tool.denied": "denied"}
BAR_WIDTH = 1000  # the bars' SVG viewBox width; the page scales it
MIN_BAR = 3
MAX_DEPTH = 5  # deeper spans are drawn at this indent (CSS has classes depth-0..depth-5)


@dataclass(slots=True)
class Span:
    id: str
    kind: str  # run | phase | task | model | tool | decision | wait
    label: str
    start: datetime
    end: datetime | None = None
    status: str = ""
    actor: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost: Decimal = Decimal("0")
    events: list[Any] = field(default_factory=list)  # the ledger events it comes from
    children: list[Span] = field(default_factory=list)
    parent: Span | None = field(default=None, repr=False)
    detail: dict[str, Any] = field(default_factory=dict)
    # Set by layout(): where it sits in the waterfall.
    depth: int = 0
    offset_ms: float = 0.0
    duration_ms: float = 0.0
    bar_x: int = 0
    bar_w: int = MIN_BAR

    def add(self, child: Span) -> Span:
        child.parent = self
        self.children.append(child)
        return child

    @property
    def indent(self) -> int:
        return min(self.depth, MAX_DEPTH)

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    @property
    def offset(self) -> str:
        return duration_text(self.offset_ms)

    @property
    def duration(self) -> str:
        return duration_text(self.duration_ms)


@dataclass(slots=True)
class Trace:
    root: Span
    spans: dict[str, Span]

    def rows(self) -> list[Span]:
        """Every span, parents before their children, in start order."""
        out: list[Span] = []

        def visit(span: Span) -> None:
            out.append(span)
            for child in span.children:
                visit(child)

        visit(self.root)
        return out


def duration_text(ms: float) -> str:
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def _data(event: Any) -> dict[str, Any]:
    return event.data if isinstance(event.data, dict) else {}


def _decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value or "0"))
    except InvalidOperation:
        return Decimal("0")


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _latency(data: dict[str, Any]) -> timedelta | None:
    try:
        ms = float(data["latency_ms"])
    except (KeyError, TypeError, ValueError):
        return None
    return timedelta(milliseconds=max(ms, 0.0))


def person(actor: str) -> str:
    """``user:kim`` → ``kim``; other actors as they are."""
    return actor.split(":", 1)[1] if actor.startswith("user:") else actor


def _wait_label(reason: str) -> str:
    head = reason.split(":", 1)[0].strip()
    return {"awaiting_approval": "waiting for an approval",
            "awaiting_human": "waiting for a person's answer"}.get(
        head, f"waiting on people ({head})" if head else "waiting on people")


def build(events: Sequence[Any], *, run_status: str = "", run_label: str = "this run",
          now: datetime | None = None) -> Trace:
    """The span tree of a run from its ledger events (in seq order)."""
    if not events:
        raise ValueError("a run's trace needs at least one ledger event")
    first, last = events[0], events[-1]
    root = Span(id="run", kind="run", label=run_label, start=first.at, status=run_status)
    spans: dict[str, Span] = {"run": root}

    def register(span: Span) -> Span:
        spans[span.id] = span
        return span

    phase: Span | None = None
    attempts: dict[str, Span] = {}  # the open attempt of each task
    waits: dict[str, Span] = {}  # each task's open wait
    last_at: dict[str, datetime] = {}  # each task's previous event, for calls with no latency
    intents: dict[str, Any] = {}  # tool.intent by idempotency key
    decisions: dict[str, Span] = {}  # approval requests by id

    def container(task: str) -> Span:
        return attempts.get(task) or phase or root

    for event in events:
        data, kind, at = _data(event), event.kind, event.at
        task = str(data.get("task") or "")
        if kind == "run.created":
            root.events.append(event)
        elif kind == "run.state":
            root.events.append(event)
            to = str(data.get("to", ""))
            name = PHASES.get(to)
            if phase is not None and (name != phase.label):
                phase.end, phase.status = at, to if to in RUN_TERMINAL else "done"
                phase = None
            if name and phase is None:
                phase = register(root.add(Span(id=f"phase-{event.seq}", kind="phase",
                                               label=name, start=at, status="running")))
            if phase is not None:
                phase.events.append(event)
            if to in RUN_TERMINAL:
                root.end = at
                root.status = root.status or to
        elif kind == "task.started":
            if task in waits:
                waits.pop(task).end = at
            attempt = _int(data.get("attempt")) or 1
            span = register((phase or root).add(Span(
                id=f"task-{event.seq}", kind="task", label=f"{task} · attempt {attempt}",
                start=at, status="running", detail={"task": task, "attempt": attempt})))
            span.events.append(event)
            attempts[task] = span
        elif kind in TASK_ENDS:
            span = attempts.get(task)
            if span is not None:
                span.events.append(event)
                span.status = TASK_ENDS[kind]
                span.end = at
                span.detail["error"] = data.get("error", "")
                if "output" in data:
                    span.detail["output"] = data.get("output")
                if kind == "task.waiting":
                    reason = str(data.get("error", ""))
                    waits[task] = register(span.add(Span(
                        id=f"wait-{event.seq}", kind="wait", label=_wait_label(reason),
                        start=at, status="waiting", events=[event],
                        detail={"reason": reason})))
                else:
                    attempts.pop(task, None)
            if kind != "task.waiting" and task in waits:
                waits.pop(task).end = at
        elif kind == "task.requeued":
            if task in waits:
                wait = waits.pop(task)
                wait.end, wait.status = at, "resumed"
                wait.events.append(event)
                wait.actor = event.actor
            span = attempts.pop(task, None)
            if span is not None:
                span.events.append(event)
        elif kind in ("model.called", "qc.checked", "plan.proposed"):
            latency = _latency(data)
            start = at - latency if latency is not None else last_at.get(task, at)
            who = str(data.get("actor") or event.actor)
            if kind == "plan.proposed":
                label = f"planner {data.get('agent', '')} · plan v{data.get('version', '?')}"
            elif kind == "qc.checked":
                label = f"audit by {data.get('auditor', who)} · round {_int(data.get('round'))}"
            else:
                label = f"{data.get('model', '') or 'model'} · step {data.get('step', '?')}"
            register(container(task).add(Span(
                id=f"model-{event.seq}", kind="model", label=label, start=start, end=at,
                status="succeeded", actor=who, tokens_in=_int(data.get("tokens_in")),
                tokens_out=_int(data.get("tokens_out")), cost=_decimal(data.get("cost")),
                events=[event])))
        elif kind == "model.failed":
            register(container(task).add(Span(
                id=f"model-{event.seq}", kind="model",
                label=f"{data.get('model', '') or 'model'} · step {data.get('step', '?')}",
                start=last_at.get(task, at), end=at, status="failed",
                actor=str(data.get("actor") or event.actor), events=[event])))
        elif kind == "tool.intent":
            intents[str(data.get("idempotency_key", ""))] = event
        elif kind in TOOL_STATUS:
            intent = intents.pop(str(data.get("idempotency_key", "")), None)
            latency = _latency(data)
            start = intent.at if intent is not None else (
                at - latency if latency is not None else at)
            register(container(task).add(Span(
                id=f"tool-{event.seq}", kind="tool", label=str(data.get("tool", "")),
                start=start, end=at, status=TOOL_STATUS[kind],
                actor=str(data.get("actor") or event.actor),
                events=[e for e in (intent, event) if e is not None])))
        elif kind == "knowledge.retrieved":  # a task's just-in-time knowledge, as a call
            register(container(task).add(Span(
                id=f"knowledge-{event.seq}", kind="tool",
                label="knowledge: " + ", ".join(map(str, data.get("collections") or [])),
                start=at, end=at, status="succeeded",
                actor=str(data.get("actor") or event.actor), events=[event])))
        elif kind == "approval.requested":
            tool, reason = data.get("tool"), str(data.get("reason") or "a decision")
            span = register(container(task).add(Span(
                id=f"decision-{event.seq}", kind="decision",
                label=f"approval of {tool}" if tool else reason.replace("_", " "),
                start=at, status="pending", events=[event],
                detail={"request": data.get("request", ""), "decisions": []})))
            decisions[str(data.get("request", ""))] = span
        elif kind in ("approval.decision", "approval.resolved", "approval.expired"):
            span = decisions.get(str(data.get("request", "")))
            if span is None:
                root.events.append(event)
                continue
            span.events.append(event)
            if kind == "approval.decision":
                span.detail["decisions"].append({
                    "person": person(event.actor), "decision": data.get("decision", ""),
                    "note": data.get("note", ""), "at": at,
                    "arguments": data.get("arguments")})
                span.actor = person(event.actor)
            else:
                span.end = at
                span.status = str(data.get("status") or kind.rsplit(".", 1)[1])
        elif task and task in attempts:
            attempts[task].events.append(event)  # checks, budgets, handoffs: in the task
        elif phase is not None:
            phase.events.append(event)
        else:
            root.events.append(event)
        if task:
            last_at[task] = at

    if phase is not None and phase.end is None:
        phase.status = run_status or phase.status
    end = root.end or (last.at if run_status in RUN_TERMINAL or now is None else now)
    root.end = max(end, last.at)
    _close(root, root.end)
    _total(root)
    trace = Trace(root=root, spans=spans)
    layout(trace)
    return trace


def _close(span: Span, end: datetime) -> None:
    """Spans still open when the ledger ends run to the run's end; children in start order;
    a parent spans at least its children."""
    for child in span.children:
        _close(child, end)
    if span.end is None:
        span.end = end
    span.children.sort(key=lambda s: (s.start, s.events[0].seq if s.events else 0))
    if span.children:
        span.start = min(span.start, span.children[0].start)
        span.end = max(span.end, max(c.end or span.end for c in span.children))


def _total(span: Span) -> None:
    for child in span.children:
        _total(child)
        span.tokens_in += child.tokens_in
        span.tokens_out += child.tokens_out
        span.cost += child.cost


def layout(trace: Trace) -> None:
    """Each span's depth, offset from the run's start, duration, and bar (in BAR_WIDTH units
    of the run's length)."""
    root = trace.root
    total_ms = max(_ms((root.end or root.start) - root.start), 0.001)

    def visit(span: Span, depth: int) -> None:
        span.depth = depth
        span.offset_ms = _ms(span.start - root.start)
        span.duration_ms = _ms((span.end or span.start) - span.start)
        x = int(span.offset_ms / total_ms * BAR_WIDTH)
        x = min(max(x, 0), BAR_WIDTH - MIN_BAR)
        width = max(round(span.duration_ms / total_ms * BAR_WIDTH), MIN_BAR)
        span.bar_x, span.bar_w = x, min(width, BAR_WIDTH - x)
        for child in span.children:
            visit(child, depth + 1)

    visit(root, 0)


def _ms(delta: timedelta) -> float:
    return delta.total_seconds() * 1000


# ---- a span's input and output, for its detail pane ----------------------------------------


def fields(value: Any) -> list[tuple[str, str, bool]]:
    """A mapping as (name, text, is_block) rows: strings as they are, anything else as
    indented JSON (a block). Not a mapping: one row with no name."""
    if isinstance(value, dict):
        return [(str(k), *_text(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    return [("", *_text(value))]


def _text(value: Any) -> tuple[str, bool]:
    if isinstance(value, str):
        return value, "\n" in value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value), False
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str), True


def messages_view(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored conversation for display: role, text, and each tool call's name and
    arguments."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        calls = [{"id": str(c.get("id", "")), "name": str(c.get("name", "")),
                  "arguments": fields(c.get("arguments"))}
                 for c in (m.get("tool_calls") or []) if isinstance(c, dict)]
        out.append({"role": str(m.get("role", "")), "content": str(m.get("content") or ""),
                    "tool_call_id": str(m.get("tool_call_id") or ""),
                    "is_error": bool(m.get("is_error")), "tool_calls": calls})
    return out


def transcript_key(span: Span) -> tuple[str, str, int] | None:
    """Which transcript holds a model span's conversation: (kind, task, step)."""
    if span.kind != "model" or not span.events:
        return None
    event = span.events[0]
    data = _data(event)
    if event.kind == "model.called":
        return event.kind, str(data.get("task") or ""), _int(data.get("step"))
    if event.kind == "qc.checked":
        return event.kind, str(data.get("task") or ""), _int(data.get("round"))
    if event.kind == "plan.proposed":
        return event.kind, "", _int(data.get("version"))
    return None
