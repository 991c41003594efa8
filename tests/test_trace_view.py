"""The trace page: the span tree built from a run's ledger, the model conversations kept beside
the ledger (and deleted after their retention), replay with them gone, and the waterfall page."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit import ledger
from audit.models import Event
from console.selectors import trace as spans
from orchestration import services, sweep, transcripts
from orchestration.models import Process, Run, Transcript
from orchestration.replay import replay
from tests.conftest import ROOT, wait_for, wait_for_run

REFUND = {"order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com",
          "amount": 500}
NOTE = 'fine <b>by</b> me & "policy"'


def approved_refund() -> Run:
    """A refund over 100: it waits for a reviewer, who approves it with a note."""
    process = Process.objects.get(slug="refund-exception")
    run = services.run_create(process=process, input=dict(REFUND),
                              user=User.objects.get(username="operator"))
    run = wait_for_run(run.pk)
    assert run.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    approvals.request_decide(request_id=request.pk, user=User.objects.get(username="reviewer"),
                             decision="approve", note=NOTE)
    return wait_for(lambda: Run.objects.filter(pk=run.pk, status="succeeded").first(),
                    what="the refund to finish")


def events_of(run: Run) -> list[Event]:
    return list(Event.objects.filter(chain=run.pk).order_by("seq"))


def walk(span: spans.Span) -> list[spans.Span]:
    return [span, *(s for c in span.children for s in walk(c))]


@pytest.fixture
def refund(runner: None, demo: None) -> Run:
    return approved_refund()


@pytest.mark.django_db(transaction=True)
def test_it_builds_the_span_tree_from_a_real_runs_ledger(refund: Run) -> None:
    events = events_of(refund)
    trace = spans.build(events, run_status=refund.status)
    root = trace.root
    assert root.kind == "run" and root.status == "succeeded"
    assert [p.label for p in root.children] == ["execution"]
    execution = root.children[0]
    assert [t.label for t in execution.children] == [
        "investigate · attempt 1", "refund · attempt 1", "refund · attempt 2",
        "notify_customer · attempt 1"]
    assert [t.status for t in execution.children] == [
        "succeeded", "waiting", "succeeded", "succeeded"]

    every = walk(root)
    kinds = [s.kind for s in every]
    assert kinds.count("model") == sum(e.kind in ("model.called", "qc.checked") for e in events)
    assert kinds.count("tool") == sum(e.kind == "tool.called" for e in events)
    tools = [s.label for s in every if s.kind == "tool"]
    assert tools == ["lookup_order", "lookup_refund_policy", "issue_refund",
                     "send_customer_email"]

    waited = execution.children[1]
    decision = next(s for s in waited.children if s.kind == "decision")
    assert decision.status == "approved" and decision.actor == "reviewer"
    assert decision.detail["decisions"][0]["note"] == NOTE
    assert decision.detail["decisions"][0]["decision"] == "approve"
    wait = next(s for s in waited.children if s.kind == "wait")
    assert wait.status == "resumed" and wait.label == "waiting for an approval"
    assert wait.duration_ms > 0 and wait.end >= decision.end

    # Tokens and cost add up from the calls, and every child lies within its parent.
    recorded = [e.data for e in events if e.kind in ("model.called", "qc.checked")]
    assert root.tokens_in == sum(d["tokens_in"] for d in recorded) > 0
    assert str(root.cost) == str(sum(spans._decimal(d["cost"]) for d in recorded))
    for span in every:
        assert span.end is not None and span.start <= span.end
        for child in span.children:
            assert span.start <= child.start and child.end <= span.end, (span.id, child.id)
        assert 0 <= span.bar_x and span.bar_x + span.bar_w <= spans.BAR_WIDTH
    assert root.bar_x == 0 and root.bar_w == spans.BAR_WIDTH


@pytest.mark.django_db(transaction=True)
def test_it_keeps_each_model_calls_conversation_with_its_ledger_event(refund: Run) -> None:
    called = [e for e in events_of(refund) if e.kind == "model.called"]
    kept = {(t.task, t.step): t for t in Transcript.objects.filter(run=refund,
                                                                    kind="model.called")}
    assert len(kept) == len(called) == 6
    for event in called:
        transcript = kept[(event.data["task"], event.data["step"])]
        assert transcript.messages_digest == event.data["messages_digest"]
        # Nothing secret in the demo: the redacted conversation digests to the ledger's.
        assert transcripts.digest_of(transcript.messages) == event.data["messages_digest"]
        assert transcript.messages[-1]["role"] in ("user", "tool")
    second = kept[("investigate", 2)].messages
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool", "tool"]
    assert second[2]["tool_calls"][0]["name"] == "lookup_order"
    assert "ORD-1042" in second[1]["content"]
    audits = Transcript.objects.filter(run=refund, kind="qc.checked")
    assert audits.count() == sum(e.kind == "qc.checked" for e in events_of(refund)) >= 1
    assert "Acceptance criteria" in audits.first().messages[-1]["content"]


@pytest.mark.django_db
def test_every_kept_conversation_is_redacted_whoever_keeps_it(settings: Any,
                                                             demo: None) -> None:
    """The auditor's prompt holds tool results as they came back: a credential in one is
    redacted when it is kept, as the agent loop's and the planner's are."""
    from django.db import transaction

    settings.SWITCHBOARD_CREDENTIALS = {"crm": "sk-live-0123456789abcdef"}
    process = Process.objects.get(slug="refund-exception")
    run = Run.objects.create(process_version=process.current_version, input={})
    with transaction.atomic():
        transcripts.keep(run.pk, "qc.checked", task="t", step=1, messages=[
            {"role": "user", "content": "the tool said: token sk-live-0123456789abcdef"}])
    kept = Transcript.objects.get(run=run)
    assert "sk-live-0123456789abcdef" not in str(kept.messages)
    assert kept.messages[0]["content"].startswith("the tool said: token ")


def test_the_sweep_deletes_conversations_past_their_retention(settings: Any, demo: None) -> None:
    settings.SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS = 30
    process = Process.objects.get(slug="refund-exception")
    run = Run.objects.create(process_version=process.current_version, input={})
    now = timezone.now()
    old = Transcript.objects.create(run=run, kind="model.called", task="t", step=1,
                                    messages_digest="a" * 64, messages=[{"role": "user"}],
                                    recorded_at=now - timedelta(days=30, minutes=1))
    young = Transcript.objects.create(run=run, kind="model.called", task="t", step=2,
                                      messages_digest="b" * 64, messages=[{"role": "user"}],
                                      recorded_at=now - timedelta(days=29, hours=23))
    assert sweep.sweep_once()["transcripts_expired"] == 1
    old.refresh_from_db()
    young.refresh_from_db()
    assert old.messages is None and old.expired_at is not None
    assert young.messages == [{"role": "user"}] and young.expired_at is None
    assert transcripts.expire() == 0  # already done: nothing twice

    settings.SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS = 1
    assert transcripts.expire() == 1
    young.refresh_from_db()
    assert young.messages is None


@pytest.mark.parametrize("value", ["0", "-3", "thirty", "36501"])
def test_it_refuses_a_bad_retention_setting(value: str) -> None:
    env = {**os.environ, "SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS": value,
           "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    done = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS" in done.stderr


@pytest.mark.django_db(transaction=True)
def test_a_run_replays_from_digests_after_its_conversations_expired(refund: Run) -> None:
    assert Transcript.objects.filter(run=refund, messages__isnull=False).count() >= 6
    later = timezone.now() + timedelta(days=31)
    assert transcripts.expire(now=later) == Transcript.objects.filter(run=refund).count()
    assert not Transcript.objects.filter(run=refund, messages__isnull=False).exists()
    result = replay(refund)
    assert result.ok, result.summary()
    assert result.compared > 10
    Transcript.objects.filter(run=refund).delete()  # gone altogether: the same
    assert replay(refund).ok


@pytest.mark.django_db(transaction=True)
def test_the_page_draws_the_waterfall_and_opens_a_span(refund: Run, client: Any) -> None:
    client.force_login(User.objects.get(username="operator"))
    page = client.get(f"/runs/{refund.pk}/trace/")
    assert page.status_code == 200
    html = page.content.decode()
    trace = spans.build(events_of(refund), run_status=refund.status)
    for span in trace.rows():
        assert f'id="span-{span.id}"' in html
        assert f'x="{span.bar_x}" y="1" width="{span.bar_w}"' in html
    assert "style=" not in html  # the CSP allows no inline style
    assert f'href="/runs/{refund.pk}/#trace"' in html

    model = next(s for s in trace.rows() if s.kind == "model" and s.label.endswith("step 2"))
    opened = client.get(f"/runs/{refund.pk}/trace/{model.id}")
    body = opened.content.decode()
    assert "Conversation sent" in body and 'id="span-prompt"' in body
    assert "lookup_refund_policy" in body and "Run input (JSON)" in body

    fragment = client.get(f"/runs/{refund.pk}/trace/{model.id}", HTTP_HX_REQUEST="true")
    text = fragment.content.decode()
    assert text.lstrip().startswith('<div id="trace-view">')  # the waterfall and the span
    assert "<html" not in text and "trace-summary" not in text
    assert f'id="span-{model.id}" class="span span-model selected"' in text
    assert f'data-span="{model.id}"' in text
    restored = client.get(f"/runs/{refund.pk}/trace/{model.id}", HTTP_HX_REQUEST="true",
                          HTTP_HX_HISTORY_RESTORE_REQUEST="true").content.decode()
    assert "<html" in restored and "trace-summary" in restored  # back button: the whole page

    decision = next(s for s in trace.rows() if s.kind == "decision")
    shown = client.get(f"/runs/{refund.pk}/trace/{decision.id}").content.decode()
    assert "fine &lt;b&gt;by&lt;/b&gt; me &amp; &quot;policy&quot;" in shown
    assert "<b>by</b>" not in shown
    assert 'class="decision-person">reviewer<' in shown

    tool = next(s for s in trace.rows() if s.kind == "tool" and s.label == "issue_refund")
    shown = client.get(f"/runs/{refund.pk}/trace/{tool.id}").content.decode()
    assert "<dt>amount</dt><dd>500</dd>" in shown and "refund_id" in shown

    transcripts.expire(now=timezone.now() + timedelta(days=31))
    expired = client.get(f"/runs/{refund.pk}/trace/{model.id}").content.decode()
    assert "Prompt expired after 30 days" in expired
    assert "lookup_refund_policy" in expired  # the answer stays: it is in the ledger

    assert client.get(f"/runs/{refund.pk}/trace/model-99999").status_code == 404
    client.force_login(User.objects.create_user("outsider"))  # no team, no permission
    assert client.get(f"/runs/{refund.pk}/trace/").status_code == 404
    assert client.get(f"/runs/{refund.pk}/trace/{model.id}").status_code == 404


@pytest.mark.django_db
def test_a_run_with_hundreds_of_events_costs_a_bounded_number_of_queries(
        demo: None, client: Any, django_assert_max_num_queries: Any) -> None:
    process = Process.objects.get(slug="refund-exception")
    operator = User.objects.get(username="operator")
    run = Run.objects.create(process_version=process.current_version, input={},
                             created_by=operator, status="succeeded")
    chain = uuid.UUID(str(run.pk))
    ledger.append(chain, "run.created", {"input": {}}, actor="user:operator")

    def append(kind: str, data: dict[str, Any]) -> None:
        ledger.append(chain, kind, data, actor="system")

    append("run.state", {"from": "pending", "to": "running"})
    for n in range(1, 61):
        task = f"t{n}"
        append("task.started", {"task": task, "attempt": 1})
        append("model.called", {
            "task": task, "step": 1, "model": "m", "latency_ms": 3.5, "tokens_in": 10,
            "tokens_out": 5, "cost": "0.001", "messages_digest": "d" * 64,
            "response": {"text": "<script>x</script>", "tool_calls": []}})
        append("tool.called", {"task": task, "tool": "lookup_order",
                               "arguments": {"order_id": n}, "result": {},
                               "idempotency_key": f"{n}", "latency_ms": 1})
        append("task.succeeded", {"task": task, "output": {"answer": "ok"}})
        Transcript.objects.create(run=run, kind="model.called", task=task, step=1,
                                  messages_digest="d" * 64, recorded_at=timezone.now(),
                                  messages=[{"role": "user", "content": f"hello {n}"}])
    append("run.state", {"from": "running", "to": "succeeded"})
    assert Event.objects.filter(chain=run.pk).count() == 243
    client.force_login(operator)
    with django_assert_max_num_queries(12):
        page = client.get(f"/runs/{run.pk}/trace/")
    assert page.status_code == 200 and page.content.decode().count('class="span span-') == 182
    span = next(s for s in spans.build(events_of(run)).rows() if s.kind == "model")
    with django_assert_max_num_queries(13):
        opened = client.get(f"/runs/{run.pk}/trace/{span.id}")
    body = opened.content.decode()
    assert "hello 1<" in body and "&lt;script&gt;x&lt;/script&gt;" in body
    assert "<script>x</script>" not in body


@pytest.mark.django_db(transaction=True)
def test_a_planned_run_shows_its_planning_phase_and_the_planners_conversation(
        runner: None, demo: None, client: Any) -> None:
    from tests.test_planning import GOOD, planned_process, settled, turn
    from tests.test_planning import start as start_planned

    run = settled(start_planned(planned_process([turn(GOOD)], gate={"cost_over": 2})))
    assert run.status == "succeeded", run.error
    trace = spans.build(events_of(run), run_status=run.status)
    assert [p.label for p in trace.root.children] == ["planning", "execution"]
    planning = trace.root.children[0]
    planner = [s for s in planning.children if s.kind == "model"]
    assert [s.label for s in planner] == ["planner planner-planned-refund · plan v1"]
    assert planner[0].tokens_in == 300 and planning.status == "done"

    kept = Transcript.objects.get(run=run, kind="plan.proposed")
    assert kept.task == "" and kept.step == 1
    assert [m["role"] for m in kept.messages] == ["system", "user"]
    client.force_login(User.objects.get(username="operator"))
    body = client.get(f"/runs/{run.pk}/trace/{planner[0].id}").content.decode()
    assert "Handle the refund request for order ORD-1042" in body
    assert "Here is the plan." in body


def test_the_agent_loop_hands_its_conversation_redacted_to_the_step_log() -> None:
    from orchestration.engine.agent import AgentSpec, run_agent
    from orchestration.engine.gate import Journal
    from orchestration.engine.llm import ScriptedModel
    from orchestration.engine.plan import TaskSpec
    from orchestration.engine.runner import TaskContext

    secret = "sk-live-0123456789abcdef"
    kept: list[tuple[str, dict[str, Any], Any]] = []

    class Log:
        def journal(self) -> Journal:
            return Journal.fold([(kind, data) for kind, data, _ in kept])

        def record(self, kind: str, data: dict[str, Any], *, usage: Any, reserved: Any = None,
                   transcript: list[dict[str, Any]] | None = None, ahead: Any = None) -> None:
            kept.append((kind, data, transcript))

    context = TaskContext(run_id="run-1", spec=TaskSpec(key="t", executor_type="agent",
                                                        executor_ref="a"),
                          attempt=1, run_input={"note": f"the key is {secret}"}, dep_outputs={})
    run_agent(context, AgentSpec("a", instructions="Be brief."),
              ScriptedModel([{"text": "Done.", "tokens_in": 5, "tokens_out": 2}]), {}, Log(),
              granted=lambda name: True, secrets=[secret])
    [(kind, data, transcript)] = [k for k in kept if k[0] == "model.called"]
    assert [m["role"] for m in transcript] == ["system", "user"]
    assert transcript[0]["content"] == "Be brief."
    assert secret not in repr(transcript) and "the key is [redacted]" in transcript[1]["content"]
    assert transcripts.digest_of(transcript) != data["messages_digest"]  # digest of the original
