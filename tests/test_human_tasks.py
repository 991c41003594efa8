"""People as executors: a plan's ``human`` task waits for a member of its group, who answers
with ``respond`` (on the review page or through the API); the answer, checked against the
task's output schema, becomes the task's output, and replay reproduces the run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit.models import Event
from console.models import ApiToken
from orchestration import grants, services
from orchestration.models import Process, Run
from orchestration.replay import replay
from tests.conftest import VENDOR_INPUT, wait_for, wait_for_run

OUTPUT_SCHEMA = {
    "type": "object",
    "required": ["tier", "summary"],
    "additionalProperties": False,
    "properties": {
        "tier": {"type": "string", "enum": ["low", "medium", "high"], "title": "Risk tier"},
        "summary": {"type": "string", "minLength": 3, "description": "why this tier"},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "urgent": {"type": "boolean"},
    },
}

PLAN = {
    "tasks": [
        {"key": "validate", "title": "Validate the application",
         "executor": {"type": "function", "ref": "validate_vendor"},
         "args": {"name": "$input.name", "country": "$input.country", "iban": "$input.iban",
                  "email": "$input.email"}},
        {"key": "review", "title": "Assess the vendor's risk",
         "executor": {"type": "human", "ref": "reviewer"}, "depends_on": ["validate"],
         "args": {"vendor": "$tasks.validate.name", "country": "$input.country"},
         "spec": "Read the application and <b>choose</b> a risk tier.",
         "acceptance": ["a tier is chosen", "the summary says why"],
         "output_schema": OUTPUT_SCHEMA},
        {"key": "create_record", "title": "Create the vendor record",
         "executor": {"type": "tool", "ref": "create_vendor_record"},
         "depends_on": ["validate", "review"],
         "args": {"vendor_ref": "$tasks.validate.vendor_ref", "name": "$tasks.validate.name",
                  "tier": "$tasks.review.tier"}},
    ],
    "result": {"vendor_id": "$tasks.create_record.vendor_id",
               "status": "$tasks.create_record.status", "tier": "$tasks.review.tier"},
}


@pytest.fixture
def process(runner: None, demo: None) -> Process:
    process = Process.objects.create(slug="vendor-review", name="Vendor review",
                                     pattern=Process.Pattern.HYBRID)
    services.process_publish(process=process, plan=PLAN, input_schema={"type": "object"})
    grants.grant_plan_tools(process, by=None)
    return process


def bearer(username: str) -> str:
    return f"Bearer {ApiToken.issue(User.objects.get(username=username))[1]}"


def post(client: Any, who: str, path: str, data: Any) -> Any:
    return client.post(path, data=json.dumps(data), content_type="application/json",
                       HTTP_AUTHORIZATION=bearer(who))


def waiting_run(client: Any) -> tuple[Run, ApprovalRequest]:
    created = post(client, "operator", "/api/v1/runs",
                   {"process": "vendor-review", "input": dict(VENDOR_INPUT)})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"], timeout=60)
    assert run.status == "waiting", (run.status, run.error)
    request = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    return run, request


def ended(run: Run) -> Run:
    return wait_for(lambda: Run.objects.filter(pk=run.pk, status__in=[
        "succeeded", "failed", "cancelled"]).first(), timeout=60, what=f"run {run.pk} to end")


@pytest.mark.django_db(transaction=True)
def test_a_human_task_waits_for_its_group_with_what_the_person_needs(
        process: Process, client: Any) -> None:
    run, request = waiting_run(client)
    assert request.reason == "human_task" and request.task_key == "review"
    assert request.decider_group.name == "reviewer"
    context = request.context
    assert context["title"] == "Assess the vendor's risk"
    assert context["acceptance"] == ["a tier is chosen", "the summary says why"]
    assert context["output_schema"] == OUTPUT_SCHEMA
    assert context["run_input"] == VENDOR_INPUT
    assert "vendor_ref" in context["inputs"]["validate"]
    assert context["args"] == {"vendor": "Northwind Traders", "country": "DE"}
    body = json.loads(client.get(f"/api/v1/runs/{run.pk}",
                                 HTTP_AUTHORIZATION=bearer("operator")).content)
    assert body["waiting_on"][0]["reason"] == "human_task"
    listed = json.loads(client.get("/api/v1/approvals",
                                   HTTP_AUTHORIZATION=bearer("reviewer")).content)
    assert [(a["id"], a["reason"]) for a in listed] == [(str(request.pk), "human_task")]


@pytest.mark.django_db(transaction=True)
def test_a_person_completes_the_task_through_the_api_and_replay_matches(
        process: Process, client: Any) -> None:
    run, request = waiting_run(client)
    path = f"/api/v1/approvals/{request.pk}/decision"
    # An approval is not an answer; an answer that breaks the schema names the field.
    approve = post(client, "reviewer", path, {"decision": "approve"})
    assert approve.status_code == 400 and "respond" in approve.json()["error"]
    bad = post(client, "reviewer", path, {"decision": "respond",
                                          "output": {"tier": "extreme", "summary": "ok?"}})
    assert bad.status_code == 400
    assert "output.tier" in bad.json()["error"], bad.json()
    missing = post(client, "reviewer", path, {"decision": "respond", "output": {"tier": "low"}})
    assert missing.status_code == 400 and "output.summary" in missing.json()["error"]
    request.refresh_from_db()
    assert request.status == "pending" and not request.decisions.exists()

    output = {"tier": "low", "summary": "known supplier", "score": 2, "urgent": False}
    ok = post(client, "reviewer", path, {"decision": "respond", "output": output})
    assert ok.status_code == 200, ok.content
    assert ok.json()["status"] == "responded" and ok.json()["reason"] == "human_task"
    run = ended(run)
    assert run.status == "succeeded", run.error
    assert run.result["tier"] == "low" and run.result["status"] == "active"
    assert run.tasks.get(key="review").output == output
    # One request for the task, however often it ran.
    assert ApprovalRequest.objects.filter(run_id=run.pk).count() == 1
    decision = Event.objects.get(chain=run.pk, kind="approval.decision")
    assert decision.actor == "user:reviewer" and decision.data["output"] == output

    result = replay(run)
    assert result.ok, result.summary()


@pytest.mark.django_db(transaction=True)
def test_a_rejected_human_task_fails_with_the_note(process: Process, client: Any) -> None:
    run, request = waiting_run(client)
    response = post(client, "reviewer", f"/api/v1/approvals/{request.pk}/decision",
                    {"decision": "reject", "note": "not our kind of vendor"})
    assert response.status_code == 200 and response.json()["status"] == "rejected"
    run = ended(run)
    assert run.status == "failed"
    review = run.tasks.get(key="review")
    assert review.status == "failed" and "not our kind of vendor" in review.error
    assert run.tasks.get(key="create_record").status == "cancelled"
    result = replay(run)
    assert result.ok, result.summary()


@pytest.mark.django_db(transaction=True)
def test_only_the_group_may_answer_and_the_run_starter_may_not(
        process: Process, client: Any, people: dict[str, User]) -> None:
    _, request = waiting_run(client)
    with pytest.raises(approvals.NotAllowed):
        approvals.request_decide(request_id=request.pk, user=people["operator"],
                                 decision="respond", output={"tier": "low", "summary": "fine"})


@pytest.mark.django_db(transaction=True)
def test_a_person_completes_the_task_on_the_review_page(
        process: Process, client: Any, people: dict[str, User]) -> None:
    run, request = waiting_run(client)
    client.force_login(people["reviewer"])
    queue = client.get("/review/").content.decode()
    assert "Assess the vendor&#x27;s risk" in queue and "Do the task" in queue
    assert "&lt;b&gt;choose&lt;/b&gt;" in queue  # the spec is text, never markup

    page = client.get(f"/review/{request.pk}/").content.decode()
    assert 'name="out.tier"' in page and "<select" in page and '<option value="2">high' in page
    assert 'type="number"' in page and 'name="out.score"' in page and 'step="1"' in page
    assert 'type="checkbox"' in page and 'name="out.urgent"' in page
    assert '<textarea id="field-summary" name="out.summary"' in page
    assert 'class="required"' in page and "a tier is chosen" in page
    assert 'id="task-args"' in page and "Northwind Traders" in page
    assert "&lt;b&gt;choose&lt;/b&gt;" in page and "<b>choose</b>" not in page
    assert " style=" not in page and "<script>" not in page

    decide = f"/review/{request.pk}/decide"
    bad = client.post(decide, {"decision": "respond", "out.tier": "", "out.summary": "ok",
                               "out.score": "eleven", "out.urgent": "on"})
    assert bad.status_code == 400
    text = bad.content.decode()
    assert 'id="field-tier-error"' in text and "this field is required" in text
    assert 'id="field-score-error"' in text and "enter a whole number" in text
    assert 'value="eleven"' in text  # what the person typed is kept
    too_short = client.post(decide, {"decision": "respond", "out.tier": "1", "out.summary": "o"})
    assert too_short.status_code == 400 and 'id="field-summary-error"' in too_short.content.decode()
    request.refresh_from_db()
    assert request.status == "pending" and not request.decisions.exists()

    done = client.post(decide, {"decision": "respond", "out.tier": "1",
                                "out.summary": "new, but references check out",
                                "out.score": "6", "out.urgent": "on"})
    assert done.status_code == 302 and done["Location"] == "/review/"
    run = ended(run)
    assert run.status == "succeeded", run.error
    output = {"tier": "medium", "summary": "new, but references check out", "score": 6,
              "urgent": True}
    assert run.tasks.get(key="review").output == output
    assert run.result == {"vendor_id": run.result["vendor_id"], "status": "on_hold",
                          "tier": "medium"}
    answered = client.get(f"/review/{request.pk}/").content.decode()
    assert "Responded" in answered or "responded" in answered
    result = replay(run)
    assert result.ok, result.summary()


# ---- an agent asks a person ----------------------------------------------------------------

ASKING_SCRIPT = [
    {"tool_calls": [{"name": "ask_human", "arguments": {
        "question": "Should order {{input.order_id}} be refunded in cash or store credit?"}}],
     "tokens_in": 120, "tokens_out": 20},
    {"text": "Refund order {{input.order_id}} as {{last.answer}}.", "tokens_in": 160,
     "tokens_out": 12},
]


@pytest.fixture
def asking(runner: None, demo: None) -> Process:
    from guardian.shortcuts import assign_perm

    from orchestration.models import Agent, Tool

    user = User.objects.create(username="agent-asker")
    Agent.objects.create(slug="asker", name="Asker", user=user, provider="scripted",
                         model_name="scripted-demo", model_params={"script": ASKING_SCRIPT},
                         step_budget=5)
    assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug="ask_human"))
    process = Process.objects.create(slug="asking", name="Asking",
                                     pattern=Process.Pattern.AGENT_WORKFLOW)
    services.process_publish(process=process, input_schema={"type": "object"}, plan={
        "tasks": [{"key": "decide", "title": "Decide the refund",
                   "executor": {"type": "agent", "ref": "asker"}}]})
    return process


def test_the_rules_strings_are_the_models_values() -> None:
    from approvals.models import Decision, Reason
    from orchestration import rules
    from orchestration.engine import human

    assert rules.QUESTION == Reason.QUESTION and rules.RESPOND == Decision.Kind.RESPOND
    assert rules.RESPONDED == human.RESPONDED == ApprovalRequest.Status.RESPONDED
    assert human.HUMAN_TASK == Reason.HUMAN_TASK and human.PENDING == "pending"


@pytest.mark.django_db(transaction=True)
def test_an_agent_asks_a_person_and_sees_the_answer(asking: Process, client: Any) -> None:
    created = post(client, "operator", "/api/v1/runs",
                   {"process": "asking", "input": {"order_id": "ORD-1042"}})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"], timeout=60)
    assert run.status == "waiting", (run.status, run.error)
    request = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    assert request.reason == "question" and request.tool == "ask_human"
    assert request.context["question"] == ("Should order ORD-1042 be refunded in cash or "
                                           "store credit?")
    path = f"/api/v1/approvals/{request.pk}/decision"
    empty = post(client, "reviewer", path, {"decision": "respond", "output": {"answer": ""}})
    assert empty.status_code == 400 and "output.answer" in empty.json()["error"]
    ok = post(client, "reviewer", path, {"decision": "respond",
                                         "output": {"answer": "store credit"}})
    assert ok.status_code == 200, ok.content
    run = ended(run)
    assert run.status == "succeeded", run.error
    output = run.tasks.get(key="decide").output
    assert output["answer"] == "Refund order ORD-1042 as store credit."
    assert output["tool_results"]["ask_human"] == {"answer": "store credit"}
    result = replay(run)
    assert result.ok, result.summary()


def test_a_rejected_question_goes_back_to_the_agent_and_a_rejected_task_fails() -> None:
    from orchestration import rules

    def resume(reason: str, action: str) -> rules.Resume:
        return rules.apply_resolution(task_waiting=True, reason=reason,
                                      resolution={"action": action, "note": "no"},
                                      agent_step_budget=lambda: None)

    assert resume("question", "reject").action == "requeue"
    assert resume("question", "respond").action == "requeue"
    assert resume("human_task", "respond").action == "requeue"
    assert resume("human_task", "reject") == rules.Resume("fail",
                                                          error="stopped by a reviewer: no")
    denied = rules.gate_from_question("rejected", {"question": "?"}, None, "no", "r1")
    assert (denied.action, denied.message) == ("deny", "no")
    allowed = rules.gate_from_question("responded", {"question": "?", "answer": "made up"},
                                       {"answer": "yes"}, "", "r1")
    assert allowed.action == "allow" and allowed.arguments == {"question": "?", "answer": "yes"}
    assert rules.gate_from_question("pending", {}, None, "", "r1").action == "wait"


@pytest.mark.django_db(transaction=True)
def test_a_task_for_a_group_that_does_not_exist_asks_for_the_configuration_to_be_fixed(
        runner: None, demo: None, client: Any, people: dict[str, User]) -> None:
    import copy

    from django.contrib.auth.models import Group

    plan = copy.deepcopy(PLAN)
    plan["tasks"][1]["executor"]["ref"] = "auditors"
    process = Process.objects.create(slug="vendor-review", name="Vendor review",
                                     pattern=Process.Pattern.HYBRID)
    services.process_publish(process=process, plan=plan, input_schema={"type": "object"})
    grants.grant_plan_tools(process, by=None)
    run, request = waiting_run(client)
    assert request.reason == "configuration_error" and "'auditors'" in request.detail
    assert not Group.objects.filter(name="auditors").exists()  # never made up on the fly

    Group.objects.create(name="auditors").user_set.add(people["reviewer2"])
    approvals.request_decide(request_id=request.pk, user=people["reviewer"],
                             decision="approve")
    task = wait_for(lambda: ApprovalRequest.objects.filter(
        run_id=run.pk, reason="human_task", status="pending").first(), timeout=60,
        what="the human task's request")
    assert task.decider_group.name == "auditors"
    approvals.request_decide(request_id=task.pk, user=people["reviewer2"], decision="respond",
                             output={"tier": "high", "summary": "unknown bank"})
    run = ended(run)
    assert run.status == "succeeded" and run.result["tier"] == "high"
    result = replay(run)
    assert result.ok, result.summary()
