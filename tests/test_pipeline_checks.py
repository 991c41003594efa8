"""Sentinel and QC in real runs: findings sent back for rework, the rework limit, the audit
agent's verdicts and confidence, people's decisions on escalations, the result contract, and
replay of every such run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth.models import User
from guardian.shortcuts import assign_perm

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit.models import Event
from orchestration import services
from orchestration.models import Agent, Process, Run, Tool
from orchestration.replay import replay
from tests.conftest import wait_for, wait_for_run

ORDER = {"order_id": "ORD-1042"}
LOOKUP = {"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": "$input.order_id"}}]}


def answer(total: str) -> dict[str, Any]:
    return {"text": "The order's total.\n```toml\nsummary = \"Total read.\"\n"
                    f"open_questions = []\n\n[key_facts]\ntotal = {total}\n```"}


def audit(passed: bool, confidence: float = 0.9) -> dict[str, Any]:
    return {"text": json.dumps({"criteria": [
        {"criterion": "The total comes from the order system", "pass": passed,
         "evidence": "matches lookup_order" if passed else "the total was made up"}],
        "confidence": confidence})}


def agent(slug: str, script: list[dict[str, Any]], tools: list[str] = ()) -> Agent:
    user = User.objects.create(username=f"agent-{slug}")
    made = Agent.objects.create(slug=slug, name=slug, user=user, provider="scripted",
                                model_name="scripted-demo", model_params={"script": script})
    for tool in tools:
        assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug=tool))
    return made


def start(task: dict[str, Any], *, verification: dict[str, Any] | None = None,
          result_schema: dict[str, Any] | None = None) -> Run:
    plan: dict[str, Any] = {"tasks": [{"key": "report", "title": "Report the total",
                                       "executor": {"type": "agent", "ref": "reporter"},
                                       **task}]}
    if verification:
        plan["verification"] = verification
    if result_schema:
        plan["result_schema"] = result_schema
        plan["result"] = {"total": "$tasks.report.tool_results.lookup_order.total"}
    process = Process.objects.create(slug="report-total", name="Report total",
                                     pattern="agent_workflow")
    services.process_publish(process=process, input_schema={"type": "object"}, plan=plan)
    run = services.run_create(process=process, input=ORDER,
                              user=User.objects.get(username="operator"))
    return wait_for_run(run.pk)


def kinds(run: Run, *wanted: str) -> list[tuple[str, int]]:
    return [(e.kind, e.data.get("round", 0)) for e in
            Event.objects.filter(chain=run.pk, kind__in=wanted).order_by("seq")]


def escalation(run: Run) -> ApprovalRequest:
    return wait_for(lambda: ApprovalRequest.objects.filter(run_id=run.pk,
                                                           status="pending").first(),
                    what="an escalation")


def settled(run: Run, status: str) -> Run:
    return wait_for(lambda: Run.objects.filter(pk=run.pk, status=status).first(),
                    what=f"the run to be {status}")


CHECKED = ["sentinel.passed", "sentinel.failed", "qc.checked", "qc.passed", "qc.failed",
           "task.rework"]
TOTAL_MATCHES = {"equal": ["$output.key_facts.total", "$output.tool_results.lookup_order.total"]}


@pytest.mark.django_db(transaction=True)
def test_the_sentinel_sends_a_wrong_amount_back_and_the_rework_passes(runner: None,
                                                                     demo: None) -> None:
    agent("reporter", [LOOKUP, answer("1"), answer("{{last.total|toml}}")], ["lookup_order"])
    run = start({"tools": ["lookup_order"], "checks": [TOTAL_MATCHES]})
    assert run.status == "succeeded", run.error
    assert kinds(run, *CHECKED) == [("sentinel.failed", 0), ("task.rework", 0),
                                    ("sentinel.passed", 1)]
    failed = Event.objects.get(chain=run.pk, kind="sentinel.failed")
    assert failed.data["findings"] == [
        f"mismatch: $output.key_facts.total is 1 but $output.tool_results.lookup_order.total "
        f"is {run.tasks.get().output['tool_results']['lookup_order']['total']}"]
    assert Event.objects.filter(chain=run.pk, kind="model.called").count() == 3
    assert replay(run).ok, replay(run).summary()


@pytest.mark.django_db(transaction=True)
def test_a_scope_violation_past_the_rework_limit_waits_for_a_person_who_may_accept(
        runner: None, demo: None, people: dict[str, User]) -> None:
    agent("reporter", [LOOKUP, answer("{{last.total|toml}}")], ["lookup_order"])
    run = start({"tools": ["lookup_refund_policy"]}, verification={"rework_limit": 0})
    assert run.status == "waiting"
    request = escalation(run)
    assert request.reason == "qc_mismatch" and request.task_key == "report"
    assert "scope: the task called lookup_order" in request.detail
    approvals.request_decide(request_id=request.pk, user=people["reviewer"],
                             decision="approve")
    run = settled(run, "succeeded")
    assert kinds(run, *CHECKED) == [("sentinel.failed", 0)]
    assert replay(run).ok, replay(run).summary()


@pytest.mark.django_db(transaction=True)
def test_a_failed_audit_is_reworked_and_then_passes(runner: None, demo: None) -> None:
    agent("reporter", [LOOKUP, answer("7"), answer("{{last.total|toml}}")], ["lookup_order"])
    agent("auditor", [audit(False), audit(True)])
    run = start({"acceptance": ["The total comes from the order system"]},
                verification={"auditor": "auditor"})
    assert run.status == "succeeded", run.error
    assert kinds(run, *CHECKED) == [
        ("sentinel.passed", 0), ("qc.checked", 0), ("qc.failed", 0), ("task.rework", 0),
        ("sentinel.passed", 1), ("qc.checked", 1), ("qc.passed", 1)]
    rework = Event.objects.get(chain=run.pk, kind="task.rework")
    assert rework.data["findings"] == [
        "The total comes from the order system: the total was made up"]
    checked = Event.objects.filter(chain=run.pk, kind="qc.checked").first()
    assert checked.actor == "agent:auditor" and checked.data["confidence"] == 0.9
    assert replay(run).ok, replay(run).summary()


@pytest.mark.django_db(transaction=True)
def test_two_failed_audits_escalate_qc_mismatch_and_a_note_sends_the_work_back(
        runner: None, demo: None, people: dict[str, User]) -> None:
    agent("reporter", [LOOKUP, answer("7"), answer("8"), answer("{{last.total|toml}}")],
          ["lookup_order"])
    agent("auditor", [audit(False), audit(False), audit(True)])
    run = start({"acceptance": ["The total comes from the order system"]},
                verification={"auditor": "auditor", "rework_limit": 1})
    assert run.status == "waiting"
    request = escalation(run)
    assert request.reason == "qc_mismatch"
    assert "the total was made up" in request.detail
    approvals.request_decide(request_id=request.pk, user=people["reviewer"],
                             decision="reject", note="Use the order system's total")
    run = settled(run, "succeeded")
    assert kinds(run, "qc.failed", "task.rework", "qc.passed") == [
        ("qc.failed", 0), ("task.rework", 0), ("qc.failed", 1), ("task.rework", 1),
        ("qc.passed", 2)]
    last = Event.objects.filter(chain=run.pk, kind="task.rework").last()
    assert last.data["findings"] == [
        "a reviewer sent the work back: Use the order system's total"]
    assert replay(run).ok, replay(run).summary()


@pytest.mark.django_db(transaction=True)
def test_low_confidence_escalates_and_an_approval_accepts_the_answer(
        runner: None, demo: None, people: dict[str, User]) -> None:
    agent("reporter", [LOOKUP, answer("{{last.total|toml}}")], ["lookup_order"])
    agent("auditor", [audit(True, confidence=0.4)])
    run = start({"acceptance": ["The total comes from the order system"]},
                verification={"auditor": "auditor", "confidence": 0.75})
    assert run.status == "waiting"
    request = escalation(run)
    assert request.reason == "low_confidence"
    assert "confidence 0.4 is below 0.75" in request.detail
    approvals.request_decide(request_id=request.pk, user=people["reviewer"],
                             decision="approve")
    run = settled(run, "succeeded")
    assert Event.objects.filter(chain=run.pk, kind="qc.checked").count() == 1  # not asked again
    assert replay(run).ok, replay(run).summary()


@pytest.mark.django_db(transaction=True)
def test_a_result_that_breaks_the_result_contract_fails_the_run(runner: None,
                                                                demo: None) -> None:
    agent("reporter", [LOOKUP, answer("{{last.total|toml}}")], ["lookup_order"])
    run = start({}, result_schema={"type": "object", "required": ["total"],
                                   "properties": {"total": {"type": "string"}}})
    assert run.status == "failed"
    assert run.error.startswith("result_contract: the result breaks the process's result "
                                "schema at total")
    assert replay(run).ok, replay(run).summary()


RUN_CRITERION = "The reported total is the order system's"


def run_audit(passed: bool) -> dict[str, Any]:
    return {"text": "```json\n" + json.dumps({"criteria": [
        {"criterion": RUN_CRITERION, "pass": passed,
         "evidence": "report matches lookup_order" if passed else "no total was reported"}],
        "confidence": 0.95}) + "\n```"}


@pytest.mark.django_db(transaction=True)
def test_the_run_is_verified_against_its_goal_before_it_succeeds(runner: None,
                                                                 demo: None) -> None:
    agent("reporter", [LOOKUP, answer("{{last.total|toml}}")], ["lookup_order"])
    agent("run-auditor", [run_audit(True)])
    run = start({}, verification={"auditor": "run-auditor"})
    process = Process.objects.get(slug="report-total")
    plan = {**process.current_version.plan, "run_check": {
        "goal": "Report the order's total", "acceptance": [RUN_CRITERION]}}
    services.process_publish(process=process, input_schema={"type": "object"}, plan=plan)
    run = wait_for_run(services.run_create(process=process, input=ORDER,
                                           user=User.objects.get(username="operator")).pk)
    assert run.status == "succeeded", run.error
    states = [e.data["to"] for e in Event.objects.filter(chain=run.pk, kind="run.state")
              .order_by("seq")]
    assert states[-2:] == ["verifying", "succeeded"]
    check = run.tasks.get(key="verify_run")
    assert check.executor_type == "audit" and check.output["verdict"] == "passed"
    audited = Event.objects.get(chain=run.pk, kind="qc.checked")
    assert audited.data["task"] == "verify_run" and audited.actor == "agent:run-auditor"
    assert replay(run).ok, replay(run).summary()


@pytest.mark.django_db(transaction=True)
def test_a_run_whose_check_fails_waits_for_a_person_and_never_succeeds_on_its_own(
        runner: None, demo: None, people: dict[str, User]) -> None:
    agent("reporter", [LOOKUP, answer("{{last.total|toml}}")], ["lookup_order"])
    agent("run-auditor", [run_audit(False)])
    process = Process.objects.create(slug="checked", name="Checked", pattern="agent_workflow")
    services.process_publish(process=process, input_schema={"type": "object"}, plan={
        "tasks": [{"key": "report", "executor": {"type": "agent", "ref": "reporter"}}],
        "run_check": {"auditor": "run-auditor", "acceptance": [RUN_CRITERION]}})
    run = wait_for_run(services.run_create(process=process, input=ORDER,
                                           user=User.objects.get(username="operator")).pk)
    assert run.status == "waiting"
    request = escalation(run)
    assert request.reason == "qc_mismatch" and request.task_key == "verify_run"
    approvals.request_decide(request_id=request.pk, user=people["reviewer"],
                             decision="reject", note="The report is not usable")
    run = settled(run, "failed")
    assert "The report is not usable" in run.error
    assert replay(run).ok, replay(run).summary()


@pytest.mark.django_db(transaction=True)
def test_the_review_page_shows_the_checks_and_sends_the_work_back_with_a_note(
        runner: None, demo: None, client: Any, people: dict[str, User]) -> None:
    agent("reporter", [LOOKUP, answer("7"), answer("{{last.total|toml}}")], ["lookup_order"])
    agent("auditor", [audit(False), audit(True)])
    run = start({"acceptance": ["The total comes from the order system"]},
                verification={"auditor": "auditor", "rework_limit": 0})
    request = escalation(run)
    assert request.context["attempt"] == 1 and request.context["key_facts"] == {"total": 7}
    assert request.context["criteria"][0]["pass"] is False
    client.force_login(people["reviewer"])
    page = client.get(f"/review/{request.pk}/").content.decode()
    assert "Accept the answer" in page and "Send back with the note" in page
    assert "Raise budget" not in page
    findings = page[page.index('id="qc-findings"'):]
    assert "the total was made up" in findings[:findings.index("</ul>")]
    assert 'id="qc-criteria"' in page and "confidence 0.9" in page
    response = client.post(f"/review/{request.pk}/decide", {
        "decision": "reject", "note": "Read the total from the order",
        "arguments_digest": request.arguments_digest})
    assert response.status_code in (302, 303)
    run = settled(run, "succeeded")
    rework = Event.objects.filter(chain=run.pk, kind="task.rework").last()
    assert rework.data["findings"] == ["a reviewer sent the work back: Read the total from "
                                       "the order"]
