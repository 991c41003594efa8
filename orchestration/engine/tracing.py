"""Spans for runs, tasks, model calls and tool calls, after the OpenTelemetry GenAI semantic
conventions. Only the OpenTelemetry API is used here: with no SDK installed (console/tracing.py
installs one when an OTLP endpoint is configured) every span is a no-op.

A run spans many messages and workers, so nothing about its trace is stored: the trace id is
the run id's 128 bits, and every task span's parent is a remote context built from it
(``run_context``). A task span parents the model and tool spans of that task in-process.

Attribute values are ids, names and counts only: never prompts, arguments or results.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

_tracer = trace.get_tracer("switchboard.orchestration")

RUN_ID = "switchboard.run.id"
TASK_KEY = "switchboard.task.key"
PROCESS = "switchboard.process"


def enabled() -> bool:
    """Whether a tracer provider is installed (otherwise every span is a no-op)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def run_trace_id(run_id: str) -> int:
    """The run's trace id: a UUID run id's own 128 bits, otherwise a digest of the id."""
    try:
        value = uuid.UUID(str(run_id)).int
    except ValueError:
        value = 0
    if not value:
        value = int.from_bytes(hashlib.sha256(str(run_id).encode()).digest()[:16], "big") or 1
    return value


def run_span_id(run_id: str) -> int:
    """The span id of the run's (never exported) root: derived from the run id too."""
    digest = hashlib.sha256(b"switchboard.run:" + str(run_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


def run_context(run_id: str) -> Any:
    """A context whose current span is the run's root: remote, sampled and non-recording, so
    spans started under it in any process join the run's trace."""
    parent = SpanContext(trace_id=run_trace_id(run_id), span_id=run_span_id(run_id),
                         is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None and v != ""}


@contextmanager
def task_span(run_id: str, key: str, *, executor_type: str, executor_ref: str,
              attempt: int, process: str = "") -> Iterator[Span]:
    """The span of one attempt at a task, a child of the run's root context. An agent task is
    an ``invoke_agent`` span (run_agent adds the agent's name and id)."""
    if not enabled():  # tracing off: no span objects, no context switches
        yield INVALID_SPAN
        return
    agent = executor_type == "agent"
    name = f"invoke_agent {executor_ref}" if agent else f"{executor_type} {key}"
    attributes = _clean({
        RUN_ID: str(run_id), TASK_KEY: key, PROCESS: process,
        "switchboard.task.executor_type": executor_type,
        "switchboard.task.executor_ref": executor_ref,
        "switchboard.task.attempt": attempt,
        "gen_ai.operation.name": "invoke_agent" if agent else None,
    })
    with _tracer.start_as_current_span(name, context=run_context(run_id),
                                       kind=SpanKind.INTERNAL, attributes=attributes,
                                       record_exception=False,
                                       set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:
            # The type only: an exception's message may quote arguments or secrets.
            failed(span, type(exc).__name__)
            raise


def task_outcome(span: Span, status: str, error: str = "",
                 escalation: Any = None) -> None:
    """Record how a task attempt ended. A task that waits for people gets a
    ``switchboard.task.waiting`` event naming the reason code (never the detail)."""
    if not span.is_recording():
        return
    span.set_attribute("switchboard.task.status", status)
    if status == "waiting":
        reason = ""
        if isinstance(escalation, dict) or hasattr(escalation, "get"):
            reason = str(escalation.get("reason") or "")
        if not reason:
            reason = error.split(":", 1)[0]
        span.add_event("switchboard.task.waiting", _clean({
            "switchboard.wait.reason": reason,
            "gen_ai.tool.name": escalation.get("tool") if hasattr(escalation, "get") else None,
        }))
    elif status == "failed":
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", "task_failed")


def agent_attributes(slug: str, agent_id: str = "") -> None:
    """Name the agent on the current (task) span."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(_clean({"gen_ai.agent.name": slug,
                                    "gen_ai.agent.id": agent_id or slug}))


@contextmanager
def chat_span(*, run_id: str, task: str, provider: str, model: str,
              step: int) -> Iterator[Span]:
    """One model call (``chat``), a child of the current task span."""
    if not enabled():
        yield INVALID_SPAN
        return
    attributes = _clean({
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
        "gen_ai.request.model": model, RUN_ID: str(run_id), TASK_KEY: task,
        "switchboard.model.step": step,
    })
    with _child_span(f"chat {model}", SpanKind.CLIENT, attributes) as span:
        yield span


def chat_usage(span: Span, tokens_in: int, tokens_out: int, *,
               finish: str = "") -> None:
    if span.is_recording():
        span.set_attributes(_clean({"gen_ai.usage.input_tokens": int(tokens_in),
                                    "gen_ai.usage.output_tokens": int(tokens_out),
                                    "gen_ai.response.finish_reasons": (finish,) if finish
                                    else None}))


def traced_complete(model: Any, request: Any, *, run_id: str, task: str, step: int) -> Any:
    """``model.complete(request)`` in a ``chat`` span carrying the model, the provider and the
    response's token counts (the same numbers the ledger records for the call)."""
    with chat_span(run_id=run_id, task=task, provider=model.provider, model=model.name,
                   step=step) as span:
        response = model.complete(request)
        chat_usage(span, response.tokens_in, response.tokens_out, finish=response.stop_reason)
    return response


def failed(span: Span, kind: str) -> None:
    """Mark a span as failed with a fixed error type (the message may carry secrets)."""
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", kind)


@contextmanager
def _child_span(name: str, kind: SpanKind, attributes: dict[str, Any]) -> Iterator[Span]:
    """A span under the current one, failed with only the exception's type if its body raises
    (the message may carry secrets)."""
    with _tracer.start_as_current_span(name, kind=kind, attributes=attributes,
                                       record_exception=False,
                                       set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:
            failed(span, type(exc).__name__)
            raise


@contextmanager
def tool_span(*, name: str, call_id: str, task: str, actor: str) -> Iterator[Span]:
    """One call through the tool gate (``execute_tool``), a child of the current task span."""
    if not enabled():
        yield INVALID_SPAN
        return
    attributes = _clean({
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id, TASK_KEY: task, "switchboard.actor": actor,
    })
    with _child_span(f"execute_tool {name}", SpanKind.INTERNAL, attributes) as span:
        yield span


def tool_verdict(span: Span, *, is_error: bool, pause: str) -> None:
    if not span.is_recording():
        return
    if pause:
        reason = pause.split(":", 1)[0]
        span.set_attribute("switchboard.tool.paused", reason)
        span.add_event("switchboard.tool.waiting", {"switchboard.wait.reason": reason})
    elif is_error:
        failed(span, "tool_error")
