"""The original run's ledger, indexed once: recorded turns and results, requests, and stimuli."""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

from audit.models import Event
from orchestration.models import Run
from orchestration.replay import comparison
from orchestration.replay.comparison import Recorded
from orchestration.services import KILL_SWITCH_RELEASED


class Ledger:
    """One pass over the original events. Besides what the replay's model, tools and governor
    answer from, it notes for each stimulus (a person's decision, a cancel, a kill switch's
    release) how many compared events every stream had before it: the stimulus is due once the
    replay has produced as many (see Stimuli)."""

    def __init__(self, events: list[Recorded]) -> None:
        self.events = events
        self.turns: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
        self.models: dict[str, tuple[str, str]] = {}
        self.results: dict[str, deque[tuple[int, dict[str, Any]]]] = defaultdict(deque)
        self.requests: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self.refused: dict[str, deque[str]] = defaultdict(deque)
        self.ends: dict[tuple[str, int], str] = {}
        self.ended_at: dict[tuple[str, int], int] = {}  # the seq that ended each attempt
        self.stimuli: list[Recorded] = []
        self.before: list[dict[str, int]] = []  # per stimulus: compared events per stream
        self.reused: dict[str, Any] = {}
        self.audits: dict[str, list[dict[str, Any]]] = defaultdict(list)  # the auditor's turns
        self.knowledge: dict[str, dict[str, Any]] = {}  # what each task's prompt was given
        attempt: dict[str, int] = defaultdict(int)
        counts: dict[str, int] = defaultdict(int)
        resumes: dict[str, int] = {}  # request id -> the index of its resolution's stimulus
        for e in events:
            data, task = e.data, e.data.get("task", "")
            if e.kind == "task.started":
                attempt[task] = int(data.get("attempt", attempt[task] + 1))
            elif e.kind == "task.succeeded" and data.get("reused_from"):
                self.reused[task] = data.get("output")
            elif e.kind in ("task.succeeded", "task.failed", "task.waiting", "task.cancelled"):
                self.ends[(task, attempt[task])] = data.get("error", "")
                self.ended_at.setdefault((task, attempt[task]), e.seq)
            elif e.kind == "model.called":
                self.turns[(task, int(data["step"]))] = (attempt[task], data["response"])
                self.models[task] = (data.get("provider", ""), data.get("model", ""))
            elif e.kind == "tool.called":
                self.results[data["idempotency_key"]].append(
                    (attempt[task], {"result": data.get("result")}))
            elif e.kind == "tool.failed":
                self.results[data["idempotency_key"]].append(
                    (attempt[task], {"error": data.get("error", "")}))
            elif e.kind == "tool.interrupted":
                self.results[data["idempotency_key"]].append(
                    (attempt[task], {"interrupted": data.get("error", ""),
                                     "stopped": bool(data.get("stopped"))}))
            elif e.kind == "knowledge.retrieved":
                self.knowledge.setdefault(task, data)
            elif e.kind == "qc.checked":
                self.audits[task].append(data["response"])
            elif e.kind == "tool.refused":
                self.refused[task].append(data.get("tool", ""))
            elif e.kind == "approval.requested":
                self.requests[task].append(data)
            elif e.kind in ("approval.resolved", "run.cancel_requested") or (
                    e.kind == "task.requeued" and data.get("reason") == KILL_SWITCH_RELEASED):
                self.stimuli.append(e)
                self.before.append(dict(counts))
                if e.kind == "approval.resolved":
                    resumes[str(data.get("request", ""))] = len(self.before) - 1
            elif e.kind == "task.requeued" and (
                    index := resumes.pop(_resumed_request(data), None)) is not None:
                # The resume that requeued the task is a transaction of its own: the run may
                # have moved on (say, to waiting) between the decision and it, so the replay
                # applies the decision where the original resumed. The waiting task's own
                # stream stays as it was at the decision: what the resume wrote there before
                # the requeue (a budget.raised) the replay writes when it applies it.
                before = dict(counts)
                own = f"task {data.get('task', '')}"
                before[own] = self.before[index].get(own, 0)
                self.before[index] = before
            stream = comparison.stream_of(e.kind, data)
            if stream is not None:
                counts[stream] += 1

    def end(self, task: str, attempt: int) -> str:
        return self.ends.get((task, attempt), "")


def _resumed_request(data: dict[str, Any]) -> str:
    """The request whose resolution a ``task.requeued`` carries out ("approval <id> <status>",
    orchestration/services.py), or ""."""
    words = str(data.get("reason", "")).split(" ")
    return words[1] if len(words) == 3 and words[0] == "approval" else ""


class Stimuli:
    """The stimuli not yet applied, and which of them are due: the replay counts its compared
    events per stream as it records them, so a check costs nothing however long the run is."""

    def __init__(self, ledger: Ledger) -> None:
        self.pending: list[Recorded] = list(ledger.stimuli)
        self.counts: dict[str, int] = defaultdict(int)
        self._short: dict[int, int] = {}  # id(stimulus) -> streams still short of it
        self._waiting: dict[tuple[str, int], list[int]] = defaultdict(list)
        for stimulus, needed in zip(ledger.stimuli, ledger.before, strict=True):
            short = 0
            for stream, count in needed.items():
                if count > self.counts[stream]:
                    self._waiting[(stream, count)].append(id(stimulus))
                    short += 1
            self._short[id(stimulus)] = short

    def recorded(self, stream: str) -> None:
        """The replay recorded one more compared event in ``stream``."""
        self.counts[stream] += 1
        for waiting in self._waiting.pop((stream, self.counts[stream]), ()):
            self._short[waiting] -= 1

    def due(self, stimulus: Recorded) -> bool:
        """Whether the replay has produced, in every stream, as many compared events as the
        original had before ``stimulus``."""
        return self._short[id(stimulus)] == 0

    def take(self, stimulus: Recorded) -> None:
        """``stimulus`` is applied: no longer pending."""
        self.pending = [s for s in self.pending if s is not stimulus]


def ledger_of(run: Run) -> list[Recorded]:
    rows = Event.objects.filter(chain=run.pk).order_by("seq").values_list(
        "seq", "kind", "data", "at")
    return [Recorded(seq=seq, kind=kind, data=data, at=at) for seq, kind, data, at in rows]
