"""The run's trace page: a waterfall of its spans (console/selectors/trace.py) and, for the span
chosen, its input and output: a model call's conversation, a tool call's arguments and result,
a decision with the person and the note. A span opens in place (htmx) or as its own page."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.cache import patch_vary_headers

from audit.models import Event
from console.access import get_run_for_user
from console.ledger_views import can_read_ledger
from console.selectors import trace as spans
from orchestration import transcripts


def _page(request: HttpRequest, run_id: Any, span_id: str) -> dict[str, Any]:
    run = get_run_for_user(request.user, run_id)
    events = list(Event.objects.filter(chain=run.pk).order_by("seq")
                  .only("seq", "kind", "at", "actor", "data", "hash"))
    if not events:
        raise Http404("this run has no ledger events yet")
    trace = spans.build(events, run_status=run.status,
                        run_label=run.process_version.process.slug,
                        now=timezone.now())
    span = trace.spans.get(span_id)
    if span is None:
        raise Http404("no such span in this run's trace")
    return {"run": run, "trace": trace, "rows": trace.rows(), "span": span,
            "detail": _detail(run, span), "may_read_ledger": can_read_ledger(request.user)}


def _detail(run: Any, span: spans.Span) -> dict[str, Any]:
    """What the detail pane shows for ``span``, by kind."""
    first = span.events[0] if span.events else None
    data = first.data if first is not None and isinstance(first.data, dict) else {}
    detail: dict[str, Any] = {}
    if span.kind == "model" and first is not None:
        response = data.get("response") if isinstance(data.get("response"), dict) else {}
        detail["response"] = spans.messages_view([{
            "role": "assistant", "content": response.get("text", ""),
            "tool_calls": response.get("tool_calls") or []}])
        detail["model"] = " / ".join(str(part) for part in (
            data.get("provider"), data.get("model")) if part)
        detail["latency"] = data.get("latency_ms")
        detail["digest"] = data.get("messages_digest", "")
        detail["error"] = data.get("error", "")
        key = spans.transcript_key(span)
        rows = transcripts.for_run(run.pk, [key]).get(key, []) if key else []
        row = next((r for r in reversed(rows) if not detail["digest"]
                    or r.messages_digest == detail["digest"]), rows[-1] if rows else None)
        if row is None:
            detail["prompt"] = "missing"
        elif row.messages is None:
            detail["prompt"] = "expired"
            detail["expired_at"] = row.expired_at
            detail["retention_days"] = settings.SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS
        else:
            detail["prompt"] = "kept"
            detail["messages"] = spans.messages_view(row.messages)
    elif span.kind == "tool":
        done = span.events[-1]
        done_data = done.data if isinstance(done.data, dict) else {}
        if done.kind == "knowledge.retrieved":  # the chunks a task's prompt was given
            done_data = {"tool": "knowledge (just in time)", "result": done_data.get("chunks"),
                         "arguments": {k: done_data.get(k) for k in ("collections", "query",
                                                                     "budget_tokens")}}
        detail["tool"] = done_data.get("tool", "")
        detail["arguments"] = spans.fields(done_data.get("arguments"))
        if "result" in done_data:
            detail["result"] = spans.fields(done_data.get("result"))
        detail["error"] = done_data.get("error", "")
        detail["key"] = done_data.get("idempotency_key", "")
        detail["latency"] = done_data.get("latency_ms")
    elif span.kind == "decision":
        detail.update(tool=data.get("tool", ""), reason=data.get("reason", ""),
                      policy=data.get("policy", ""), detail_text=data.get("detail", ""),
                      request=data.get("request", ""), group=data.get("group", ""),
                      required=data.get("required_approvals"),
                      arguments=spans.fields(data.get("arguments")),
                      decisions=[{**d, "arguments": spans.fields(d["arguments"])
                                  if d.get("arguments") is not None else None}
                                 for d in span.detail.get("decisions", [])])
    elif span.kind == "wait":
        detail.update(reason=span.detail.get("reason", ""),
                      resumed_by=spans.person(span.actor) if span.actor else "")
    elif span.kind == "task":
        detail.update(task=span.detail.get("task", ""), attempt=span.detail.get("attempt"),
                      error=span.detail.get("error", ""))
        output = span.detail.get("output")
        if isinstance(output, dict) and "answer" in output:
            detail["answer"] = output.get("answer", "")
        elif output is not None:
            detail["output"] = spans.fields(output)
    counts: dict[str, int] = {}
    for row in _descendants(span):
        counts[row.kind] = counts.get(row.kind, 0) + 1
    detail["counts"] = sorted(counts.items())
    return detail


def _descendants(span: spans.Span) -> list[spans.Span]:
    out: list[spans.Span] = []
    for child in span.children:
        out += [child, *_descendants(child)]
    return out


@login_required
def run_trace(request: HttpRequest, run_id: Any, span_id: str = "run") -> HttpResponse:
    context = _page(request, run_id, span_id)
    template = "console/run_trace.html"
    htmx = getattr(request, "htmx", None)
    # A history restore (back after a span was opened in place) needs the whole page.
    if htmx and not htmx.history_restore_request:
        template += "#trace_view"  # the waterfall with the span marked, and its detail
    response = render(request, template, context)
    patch_vary_headers(response, ["HX-Request"])  # the fragment and the page share a URL
    return response
