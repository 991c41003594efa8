"""What replay compares: each event's decision or state, per stream, and the first difference."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Recorded:
    seq: int
    kind: str
    data: dict[str, Any]
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Divergence:
    seq: int | None
    stream: str
    expected: dict[str, Any] | None
    got: dict[str, Any] | None

    def message(self) -> str:
        where = f"event #{self.seq}" if self.seq is not None else "after the last event"
        kind = (self.expected or self.got or {}).get("kind", "?")
        head = f"diverged at {where} ({kind}, {self.stream})"
        expected = _show(self.expected) if self.expected else "nothing"
        got = _show(self.got) if self.got else "nothing (the replay produced no such event)"
        return f"{head}: expected {expected}; got {got}"


@dataclass(slots=True)
class ReplayResult:
    run_id: str
    compared: int
    status: str
    divergence: Divergence | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.divergence is None and not self.error

    def summary(self) -> str:
        if self.ok:
            return (f"replay of run {self.run_id} matches: {self.compared} recorded decisions "
                    f"and states came out the same (run {self.status})")
        parts = [f"replay of run {self.run_id} diverges"]
        if self.divergence is not None:
            parts.append(self.divergence.message())
        if self.error:
            parts.append(f"the replay stopped: {self.error}")
        return ": ".join(parts[:1]) + ": " + "; ".join(parts[1:])


def _show(item: Mapping[str, Any]) -> str:
    text = json.dumps(item, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= 400 else text[:397] + "..."


_TOOL_KINDS = ("tool.failed", "tool.refused", "tool.rejected", "tool.denied",
               "tool.interrupted")


# What each planning event decides: compared in the run's "plan" stream.
_PLAN_FIELDS = {"plan.proposed": ("version", "response"), "plan.validated": ("version", "estimate"),
                "plan.rejected": ("version", "errors"), "plan.feedback": ("note",),
                "plan.edited": ("version", "plan"), "plan.approved": ("version",)}


def project(kind: str, data: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The stream and the decision or state an event records, without timings and ids of
    people; None for an event that is not compared."""
    if kind == "run.state":
        item = {"kind": kind, "from": data.get("from"), "to": data.get("to")}
        for name in ("error", "result"):
            if data.get(name) is not None and data.get(name) != "":
                item[name] = data[name]
        return "run", item
    if kind == "run.cancel_requested":
        return "run", {"kind": kind}
    if kind in _PLAN_FIELDS:  # a planned run's planning (orchestration/planning.py)
        return "plan", {"kind": kind, **{f: data.get(f) for f in _PLAN_FIELDS[kind]}}
    task = data.get("task")
    if not task or data.get("reused_from"):
        return None
    stream = f"task {task}"
    if kind in ("task.queued",):
        return stream, {"kind": kind}
    if kind == "task.requeued":
        return stream, {"kind": kind, "reason": data.get("reason", "")}
    if kind == "task.started":
        return stream, {"kind": kind, "attempt": data.get("attempt")}
    if kind == "task.succeeded":
        return stream, {"kind": kind, "output": data.get("output")}
    if kind in ("task.failed", "task.waiting", "task.cancelled"):
        return stream, {"kind": kind, "error": data.get("error", "")}
    if kind == "model.called":
        return stream, {"kind": kind, "step": data.get("step"),
                        "messages_digest": data.get("messages_digest"),
                        "response": data.get("response")}
    if kind == "model.failed":
        return stream, {"kind": kind, "step": data.get("step"), "error": data.get("error")}
    if kind in ("tool.intent", "tool.called", *_TOOL_KINDS):
        item = {"kind": kind, "tool": data.get("tool"), "call": data.get("idempotency_key"),
                "arguments": data.get("arguments")}
        if kind == "tool.called":
            item["result"] = data.get("result")
        elif kind != "tool.intent":
            item["error"] = data.get("error")
        return stream, item
    if kind == "approval.requested":
        return stream, {"kind": kind, "reason": data.get("reason"), "tool": data.get("tool"),
                        "arguments_digest": data.get("arguments_digest"),
                        "policy": data.get("policy")}
    if kind == "task.delegated":  # (the budget carved is the store's, not compared)
        return stream, {"kind": kind, "child": data.get("child"), "agent": data.get("agent"),
                        "call": data.get("call"), "depth": data.get("depth")}
    if kind == "delegation.refused":
        return stream, {"kind": kind, "tool": data.get("tool"),
                        "call": data.get("idempotency_key"), "error": data.get("error")}
    if kind == "knowledge.retrieved":  # a task's just-in-time knowledge (engine/knowledge.py)
        return stream, {"kind": kind, "collections": data.get("collections"),
                        "chunks": [c.get("chunk_id") for c in data.get("chunks") or ()
                                   if isinstance(c, dict)]}
    if kind == "budget.raised":
        return stream, {"kind": kind, "raise": data.get("raise")}
    if kind in _CHECK_KINDS:  # the checks of a task's answer (engine/verify.py)
        item = {"kind": kind, "round": data.get("round", 0)}
        for name in ("findings", "criteria", "confidence", "response"):
            if name in data:
                item[name] = data[name]
        return stream, item
    return None


_CHECK_KINDS = ("sentinel.passed", "sentinel.failed", "qc.checked", "qc.passed", "qc.failed",
                "task.rework")


def stream_of(kind: str, data: Mapping[str, Any]) -> str | None:
    """The stream an event is compared in, or None when it is not compared."""
    projected = project(kind, data)
    return projected[0] if projected is not None else None


def _streams(events: Iterable[Recorded]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    streams: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for e in events:
        projected = project(e.kind, e.data)
        if projected is not None:
            # Through JSON, so a replayed value compares like the stored one (tuples, Decimals).
            streams[projected[0]].append((e.seq, json.loads(json.dumps(projected[1],
                                                                        default=str))))
    return streams


def compare(original: Iterable[Recorded], replayed: Iterable[Recorded]) -> tuple[
        int, Divergence | None]:
    """How many recorded items were compared, and the earliest difference (by original seq)."""
    want, got = _streams(original), _streams(replayed)
    compared = sum(len(items) for items in want.values())
    found: list[tuple[float, Divergence]] = []
    for stream in sorted(set(want) | set(got)):
        a, b = want.get(stream, []), got.get(stream, [])
        for i in range(max(len(a), len(b))):
            left = a[i] if i < len(a) else None
            right = b[i] if i < len(b) else None
            if left is not None and right is not None and left[1] == right[1]:
                continue
            order = left[0] if left is not None else (a[-1][0] + 0.5 if a else 0.5)
            found.append((order, Divergence(seq=left[0] if left else None, stream=stream,
                                            expected=left[1] if left else None,
                                            got=right[1] if right else None)))
            break
    if not found:
        return compared, None
    return compared, min(found, key=lambda f: f[0])[1]
