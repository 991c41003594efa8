"""The figures orchestration counts as work happens, for /metrics (console/metrics.py).

Counters and histograms live in the process that does the work: the web server in standalone
mode, each Celery worker process in distributed mode (which is why every process shares
PROMETHEUS_MULTIPROC_DIR there). What is better read from the database at scrape time (runs by
status, approvals pending, the outbox) is collected by console/metrics.py instead.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from django.db import transaction
from prometheus_client import Counter, Histogram

from orchestration.engine.runner import Executor, Outcome, TaskContext

log = logging.getLogger("switchboard.metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)

TASKS_STARTED = Counter(
    "switchboard_tasks_started", "Tasks a worker started running, by executor type",
    ["executor"])
TASKS_FINISHED = Counter(
    "switchboard_tasks_finished",
    "Tasks whose executor returned, by executor type and outcome (succeeded, failed, waiting, "
    "cancelled; error when the executor raised)", ["executor", "outcome"])
MODEL_CALL_SECONDS = Histogram(
    "switchboard_model_call_seconds", "Latency of model calls, by provider and model",
    ["provider", "model"], buckets=_LATENCY_BUCKETS)
TOOL_CALL_SECONDS = Histogram(
    "switchboard_tool_call_seconds",
    "Latency of tool calls through the gate, by tool and result (called, failed, interrupted)",
    ["tool", "result"], buckets=_LATENCY_BUCKETS)
TOKENS = Counter(
    "switchboard_tokens", "Model tokens used, by process, agent, model and direction (in, out)",
    ["process", "agent", "model", "direction"])
COST = Counter(
    "switchboard_cost", "Model cost in currency units, by process, agent and model",
    ["process", "agent", "model"])
RESERVATION_REFUSALS = Counter(
    "switchboard_reservation_refusals",
    "Budget reservations refused, by reason (budget_exhausted...)", ["reason"])
ESCALATIONS = Counter(
    "switchboard_escalations",
    "Tasks parked for a person's decision (an approval request opened), by reason", ["reason"])
LEASE_TAKEOVERS = Counter(
    "switchboard_lease_takeovers",
    "Running tasks whose lease had expired (their worker was lost) sent to be taken over")

# run id → process slug: a run's process never changes, so each worker asks once per run.
_processes: OrderedDict[str, str] = OrderedDict()
_processes_lock = threading.Lock()
_PROCESSES_KEPT = 2048


def _process_of(run_id: str) -> str:
    run_id = str(run_id)
    with _processes_lock:
        slug = _processes.get(run_id)
        if slug is not None:
            _processes.move_to_end(run_id)
            return slug
    from orchestration.models import Run

    slug = (Run.objects.filter(pk=run_id)
            .values_list("process_version__process__slug", flat=True).first()) or "unknown"
    with _processes_lock:
        _processes[run_id] = slug
        while len(_processes) > _PROCESSES_KEPT:
            _processes.popitem(last=False)
    return slug


def reason_of(message: str) -> str:
    """The reason code that starts a refusal or pause message ("budget_exhausted: ...")."""
    head, sep, _ = message.partition(":")
    head = head.strip()
    return head if sep and head.replace("_", "").isalnum() and len(head) <= 40 else "other"


def on_step(run_id: str, kind: str, data: dict[str, Any], usage: Any) -> None:
    """A model or tool step was recorded (DjangoRunStore.record_step, once its transaction
    commits: a retried or rolled-back try counts nothing, and neither do replays, which
    record nowhere). Its latency comes from what the engine recorded (``latency_ms``)."""
    try:
        _observe(run_id, kind, data, usage)
    except Exception:  # a figure is never worth failing a step for
        log.exception("metrics: could not count a %s step", kind)


def _observe(run_id: str, kind: str, data: dict[str, Any], usage: Any) -> None:
    latency = data.get("latency_ms")
    if kind == "model.called":
        model = str(data.get("model", ""))
        if latency is not None:
            MODEL_CALL_SECONDS.labels(str(data.get("provider", "")), model).observe(
                float(latency) / 1000)
        process = _process_of(run_id)
        agent = str(data.get("actor", "")).removeprefix("agent:")
        TOKENS.labels(process, agent, model, "in").inc(int(getattr(usage, "tokens_in", 0)))
        TOKENS.labels(process, agent, model, "out").inc(int(getattr(usage, "tokens_out", 0)))
        COST.labels(process, agent, model).inc(
            float(Decimal(str(getattr(usage, "cost", 0) or 0))))
    elif kind.startswith("tool.") and latency is not None:
        TOOL_CALL_SECONDS.labels(str(data.get("tool", "")), kind.removeprefix("tool.")).observe(
            float(latency) / 1000)


def refused(message: str) -> None:
    if message:
        RESERVATION_REFUSALS.labels(reason_of(message)).inc()


def escalated(reason: str) -> None:
    """Counted when the transaction that parks the task commits (not for a rolled-back try)."""
    transaction.on_commit(lambda: ESCALATIONS.labels(reason or "other").inc(), robust=True)


def instrumented(executors: Mapping[str, Executor]) -> dict[str, Executor]:
    """The executors, each counting the tasks it starts and how they end."""

    def wrap(kind: str, executor: Executor) -> Executor:
        def run(ctx: TaskContext) -> Outcome:
            TASKS_STARTED.labels(kind).inc()
            try:
                outcome = executor(ctx)
            except BaseException:
                TASKS_FINISHED.labels(kind, "error").inc()
                raise
            TASKS_FINISHED.labels(kind, str(getattr(outcome.status, "value", outcome.status))
                                  ).inc()
            return outcome

        run.__name__ = getattr(executor, "__name__", kind)
        return run

    return {kind: wrap(kind, executor) for kind, executor in executors.items()}


def install() -> None:
    """Start the series a dashboard expects at zero rather than absent (called when the
    orchestration app is ready, so every worker process exports them)."""
    from approvals.models import Reason

    for executor in ("agent", "tool", "function"):
        TASKS_STARTED.labels(executor)
        for outcome in ("succeeded", "failed", "waiting"):
            TASKS_FINISHED.labels(executor, outcome)
    RESERVATION_REFUSALS.labels("budget_exhausted")
    for reason in Reason.values:
        if reason != Reason.SENSITIVE_ACTION:
            ESCALATIONS.labels(reason)
