"""Traces: a run of the demo refund process, exported over OTLP/HTTP to a receiver in the test,
is one trace whose id is the run's; task spans hang under the run's root context, model and
tool spans under their task, with the GenAI semantic conventions' attributes. In the
distributed pass the tasks run in a real Celery worker, which exports its own spans."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.contrib.auth.models import User
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from approvals.models import ApprovalRequest
from audit.models import Event
from console import tracing
from console.models import ApiToken
from orchestration.engine.tracing import run_span_id, run_trace_id
from orchestration.models import Run
from tests.conftest import ROOT, wait_for, wait_for_run

REFUND = {"order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com",
          "amount": 500}


class Receiver:
    """A minimal OTLP/HTTP trace receiver: every span it was sent, flattened."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    flat = {
                        "name": span.name, "scope": scope_spans.scope.name,
                        "service": resource.get("service.name"),
                        "trace_id": int.from_bytes(span.trace_id, "big"),
                        "span_id": int.from_bytes(span.span_id, "big"),
                        "parent_id": int.from_bytes(span.parent_span_id, "big"),
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "events": [(e.name, {a.key: _value(a.value) for a in e.attributes})
                                   for e in span.events],
                        "status": span.status.code,
                    }
                    with self.lock:
                        self.spans.append(flat)

    def engine_spans(self) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["scope"] == "switchboard.orchestration"]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    """The receiver, with this process exporting to it and (distributed pass) the Celery worker
    the runner fixture starts inheriting the endpoint from the environment."""
    receiver = Receiver()
    receiver.thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    provider = tracing.setup("switchboard-web", receiver.endpoint)
    if provider is None or tracing.installed() is not provider:
        pytest.fail("no tracer provider was installed")
    if provider.resource.attributes.get("service.name") != "switchboard-web":
        pytest.skip("a tracer provider of an earlier test is installed in this process")
    request.getfixturevalue("runner")
    try:
        yield receiver
    finally:
        # Later tests in this process export nothing to a receiver that is gone.
        tracing.shutdown()
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.mark.django_db(transaction=True)
def test_a_run_is_one_trace_with_genai_spans(otlp: Receiver, client: Any,
                                             people: dict[str, User]) -> None:
    def post(who: str, path: str, data: Any) -> Any:
        import json

        token = ApiToken.issue(people[who])[1]
        return client.post(path, data=json.dumps(data), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")

    created = post("operator", "/api/v1/runs", {"process": "refund-exception", "input": REFUND})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"])
    assert run.status == "waiting"
    approval = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    decided = post("reviewer", f"/api/v1/approvals/{approval.pk}/decision",
                   {"decision": "approve"})
    assert decided.status_code == 200, decided.content
    run = wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                   what="the run to finish after approval")

    calls = list(Event.objects.filter(chain=run.pk, kind="model.called").order_by("seq"))
    tools = list(Event.objects.filter(chain=run.pk, kind="tool.called").order_by("seq"))
    assert calls and tools

    def complete() -> bool:
        tracing.flush()
        spans = otlp.engine_spans()
        chats = [s for s in spans if s["attributes"].get("gen_ai.operation.name") == "chat"]
        executed = [s for s in spans if s["name"] == "execute_tool issue_refund"]
        # A task's span ends after its children, so it may come in a later batch.
        ids = {s["span_id"] for s in spans} | {run_span_id(str(run.pk))}
        return (len(chats) >= len(calls) and len(executed) >= 2
                and all(s["parent_id"] in ids for s in spans))

    wait_for(complete, timeout=30, what="the run's spans to be exported")
    spans = otlp.engine_spans()
    trace_id = run_trace_id(str(run.pk))
    assert trace_id == run.pk.int
    assert {s["trace_id"] for s in spans} == {trace_id}, "every span is in the run's trace"
    expected_service = "switchboard-worker" if os.environ.get("REDIS_URL") else "switchboard-web"
    assert {s["service"] for s in spans} == {expected_service}

    by_id = {s["span_id"]: s for s in spans}
    tasks = [s for s in spans if "switchboard.task.executor_type" in s["attributes"]]
    assert tasks
    for task in tasks:
        attrs = task["attributes"]
        assert task["parent_id"] == run_span_id(str(run.pk)), "a task hangs under the run"
        assert attrs["switchboard.run.id"] == str(run.pk)
        assert attrs["switchboard.process"] == "refund-exception"
        if attrs["switchboard.task.executor_type"] == "agent":
            assert attrs["gen_ai.operation.name"] == "invoke_agent"
            assert attrs["gen_ai.agent.name"] and attrs["gen_ai.agent.id"]
    for span in spans:
        if span in tasks:
            continue
        parent = by_id.get(span["parent_id"])
        assert parent is not None and parent in tasks, f"{span['name']} has no task parent"
        assert parent["attributes"]["switchboard.task.key"] == \
            span["attributes"]["switchboard.task.key"]

    # The task that stopped for the reviewer says why, and its refund call waited.
    waited = [t for t in tasks if any(name == "switchboard.task.waiting"
                                      for name, _ in t["events"])]
    assert waited
    reasons = {e["switchboard.wait.reason"] for t in waited for n, e in t["events"]
               if n == "switchboard.task.waiting"}
    assert reasons == {"awaiting_approval"}
    refunds = [s for s in spans if s["name"] == "execute_tool issue_refund"]
    assert [s["attributes"].get("switchboard.tool.paused") for s in refunds].count(
        "awaiting_approval") == 1
    for s in refunds:
        assert s["attributes"]["gen_ai.operation.name"] == "execute_tool"
        assert s["attributes"]["gen_ai.tool.name"] == "issue_refund"
        assert s["attributes"]["gen_ai.tool.call.id"].startswith(f"{run.pk}:")
    called_keys = {e.data["idempotency_key"] for e in tools}
    assert called_keys <= {s["attributes"]["gen_ai.tool.call.id"] for s in spans
                           if s["attributes"].get("gen_ai.operation.name") == "execute_tool"}

    # Each model call's span carries the ledger's model and token counts for that call.
    chats = {(s["attributes"]["switchboard.task.key"], s["attributes"]["switchboard.model.step"]):
             s["attributes"] for s in spans
             if s["attributes"].get("gen_ai.operation.name") == "chat"}
    for event in calls:
        attrs = chats[(event.data["task"], event.data["step"])]
        assert attrs["gen_ai.request.model"] == event.data["model"]
        assert attrs["gen_ai.provider.name"] == event.data["provider"]
        assert attrs["gen_ai.usage.input_tokens"] == event.data["tokens_in"]
        assert attrs["gen_ai.usage.output_tokens"] == event.data["tokens_out"]

    # Ids, names and counts only: nothing of the run's input reaches a span.
    text = repr(spans)
    assert "kim@example.com" not in text and "ORD-1042" not in text

    # On the same switch, requests have server spans, and in the distributed pass the trace
    # context crosses the broker: the worker's span running a task hangs under the web
    # process's span that sent it.
    def instrumented() -> list[dict[str, Any]]:
        tracing.flush()
        with otlp.lock:
            return [s for s in otlp.spans if s["scope"].startswith("opentelemetry.instrumentation")]

    wait_for(lambda: any(s["attributes"].get("http.route", "").startswith("api/v1/runs")
                         for s in instrumented()), timeout=30, what="the request spans")
    requests = [s for s in instrumented() if s["scope"].endswith(".django")]
    assert {s["service"] for s in requests} == {"switchboard-web"}
    assert any(s["attributes"].get("http.request.method", s["attributes"].get("http.method"))
               == "POST" for s in requests)
    if os.environ.get("REDIS_URL"):
        def crossed() -> list[tuple[dict[str, Any], dict[str, Any]]]:
            found = instrumented()
            sent = {s["span_id"]: s for s in found if s["service"] == "switchboard-web"
                    and s["scope"].endswith(".celery")}
            return [(sent[s["parent_id"]], s) for s in found
                    if s["service"] == "switchboard-worker" and s["scope"].endswith(".celery")
                    and s["parent_id"] in sent]

        pairs = wait_for(crossed, timeout=30, what="a task span under the span that sent it")
        for sender, runner in pairs:
            assert sender["trace_id"] == runner["trace_id"]
            assert sender["name"].startswith("apply_async/orchestration.")
            assert runner["name"].startswith("run/orchestration.")


def test_without_an_endpoint_nothing_is_installed() -> None:
    """In a fresh process (this one may have a provider of another test's): with no
    OTEL_EXPORTER_OTLP_ENDPOINT, set-up installs no SDK provider and spans are no-ops."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    script = (
        "import django; django.setup()\n"
        "from console import tracing\n"
        "from opentelemetry import trace\n"
        "from orchestration.engine import tracing as spans\n"
        "assert tracing.setup('switchboard-web') is None and tracing.installed() is None\n"
        "assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)\n"
        "assert not spans.enabled()\n"
        "with spans.task_span('r', 'k', executor_type='agent', executor_ref='a',"
        " attempt=1) as s:\n"
        "    assert not s.is_recording()\n"
        "import sys; assert 'opentelemetry.sdk.trace' not in sys.modules\n"
        "print('off')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "off"
