"""Reviewing with context: the queue and the request page show the run's input, what the agent
said when it made the call, why the policy matched, M-of-N progress and what an edit changed; a
decision from the queue is confirmed in place; identical low-risk requests are approved
together, each through the same service as a single decision."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.db import transaction
from django.test import Client
from guardian.shortcuts import assign_perm

from approvals import explain
from approvals import services as approvals
from approvals.models import ApprovalRequest, Decision, Policy
from audit import ledger
from console import review, review_bulk, review_context
from orchestration import services
from orchestration.models import Process, Tool
from tests.test_approvals import REFUND, _open_request

XSS = '<img src=x onerror="window.__xss=1">'



def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def htmx_post(client: Client, path: str, data: dict[str, Any]) -> Any:
    return client.post(path, data, HTTP_HX_REQUEST="true")


def say(request: ApprovalRequest, step: int, text: str, task: str = "refund") -> None:
    """The run's ledger records a model turn of ``task`` at ``step`` that said ``text``."""
    with transaction.atomic():
        ledger.append(request.run_id, "model.called", {
            "task": task, "step": step, "actor": "agent:refund-executor",
            "response": {"text": text, "tool_calls": [], "tokens_in": 1, "tokens_out": 1}},
            actor="agent:refund-executor")


def lookup_request(starter: User, *, order: str = "ORD-1042",
                   run_input: dict[str, Any] | None = None) -> ApprovalRequest:
    """A paused ``lookup_order`` call (a read tool) under the policy ``lookups``."""
    process = Process.objects.get(slug="refund-exception")
    assign_perm("orchestration.start_run", starter, process)
    run = services.run_create(process=process, input=run_input or {**REFUND, "amount": 5},
                              user=starter)
    arguments = {"order_id": order}
    version = approvals.policy_match(tool="lookup_order", risk_class="read",
                                     arguments=arguments)
    assert version is not None and version.policy.slug == "lookups"
    return approvals.request_open(
        run_id=run.pk, task_key="investigate", call_key=f"{run.pk}:investigate:1:0",
        tool="lookup_order", arguments=arguments, reason="sensitive_action",
        policy_version=version, requested_by="agent:refund-investigator",
        run_started_by=starter, context={"risk_class": "read", "input_schema":
                                         Tool.objects.get(slug="lookup_order").input_schema})


@pytest.fixture
def lookups(people: dict) -> Policy:
    """A policy that asks a reviewer before any order lookup (a low-risk read)."""
    policy = Policy.objects.create(slug="lookups", name="Order lookups")
    approvals.policy_publish(policy=policy, tool="lookup_order", risk_class="", conditions=[],
                             decider_group=Group.objects.get(name="reviewer"),
                             required_approvals=1)
    return policy


def row_of(page: str, request: ApprovalRequest) -> str:
    match = re.search(rf'<tr id="approval-{request.pk}".*?</tr>', page, re.S)
    assert match, f"no row for {request.pk}"
    return match.group(0)


# ---- context ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_what_the_agent_said_in_the_turn_that_made_the_call(people: dict) -> None:
    request = _open_request(people["operator"])  # call key <run>:refund:1:0
    say(request, 1, f"Refunding in full as asked {XSS}")
    say(request, 2, "A later turn, not the one that made the call")
    say(request, 1, "Another task's first turn", task="investigate")

    reviewer = signed_in(people["reviewer"])
    page = reviewer.get(f"/review/{request.pk}/").content.decode()
    said = re.search(r'<pre id="agent-said">(.*?)</pre>', page, re.S)
    assert said and said.group(1) == html.escape(f"Refunding in full as asked {XSS}")
    assert XSS not in page
    assert "A later turn" not in page.split('id="agent-said"')[1].split("</pre>")[0]
    row = row_of(reviewer.get("/review/").content.decode(), request)
    assert "Agent said:" in row and html.escape("Refunding in full as asked") in row
    assert "Another task" not in row and XSS not in row


@pytest.mark.django_db
def test_it_shows_no_agent_message_for_a_call_key_of_another_shape(people: dict) -> None:
    request = _open_request(people["operator"])
    ApprovalRequest.objects.filter(pk=request.pk).update(call_key=f"{request.run_id}:refund:1:tokens")
    say(request, 1, "Spent the budget")
    request.refresh_from_db()
    assert review_context.agent_messages([request]) == {}
    assert 'id="agent-said"' not in signed_in(people["reviewer"]).get(
        f"/review/{request.pk}/").content.decode()


@pytest.mark.django_db
def test_it_shows_a_few_fields_of_the_run_input_escaped_and_shortened(people: dict) -> None:
    request = _open_request(people["operator"])
    long_reason = XSS + "x" * 300
    ApprovalRequest.objects.filter(pk=request.pk).update(context={
        **request.context, "run_input": {"reason": long_reason, "order_id": "ORD-1042",
                                         "extra": {"nested": "deep"}, "amount": 500,
                                         "zone": "EU", "zz_channel": "email"}})
    reviewer = signed_in(people["reviewer"])
    page = reviewer.get(f"/review/{request.pk}/").content.decode()
    shown = re.search(r'<dd id="run-input".*?</dd>', page, re.S).group(0)
    assert html.escape(XSS) in shown and XSS not in page
    assert "x" * 100 not in shown and "…" in shown  # shortened
    # Four fields, plain values first by name: the nested one and the last name are left out.
    assert re.findall(r"<b>(.*?)</b>", shown) == ["amount", "order_id", "reason", "zone"]
    assert "(+2 more" in shown and "deep" not in shown
    row = row_of(reviewer.get("/review/").content.decode(), request)
    assert "Run input:" in row and html.escape(XSS) in row and XSS not in row


@pytest.mark.django_db
def test_it_falls_back_to_the_runs_own_input(people: dict) -> None:
    request = _open_request(people["operator"])  # opened without a copy of the input
    assert "run_input" not in request.context
    page = signed_in(people["reviewer"]).get(f"/review/{request.pk}/").content.decode()
    shown = re.search(r'<dd id="run-input".*?</dd>', page, re.S).group(0)
    assert "kim@example.com" in shown and "damaged" in shown


@pytest.mark.django_db
def test_it_says_which_policy_matched_and_on_what(people: dict) -> None:
    request = _open_request(people["operator"])
    assert request.context["policy_match"] == {
        "policy": "refund-over-100", "version": 1, "tool": "issue_refund", "risk_class": "",
        "conditions": [{"condition": {"arg": "amount", "op": ">", "value": 100},
                        "found": True, "value": 500}]}
    # A new version of the policy does not change why this request was opened.
    approvals.policy_publish(policy=Policy.objects.get(slug="refund-over-100"),
                             tool="issue_refund", risk_class="",
                             conditions=[{"arg": "amount", "op": ">", "value": 200}],
                             decider_group=Group.objects.get(name="reviewer"))
    reviewer = signed_in(people["reviewer"])
    page = reviewer.get(f"/review/{request.pk}/").content.decode()
    why = re.search(r'<dd id="policy-match">(.*?)</dd>', page, re.S).group(1)
    assert why == "refund-over-100 v1: tool is issue_refund; amount &gt; 100 (the call has 500)"
    row = row_of(reviewer.get("/review/").content.decode(), request)
    assert "matched: tool is issue_refund; amount &gt; 100 (the call has 500)" in row


@pytest.mark.django_db
def test_it_explains_an_upgrade_by_the_edited_arguments(people: dict) -> None:
    request = _open_request(people["operator"])
    approvals.request_decide(request_id=request.pk, user=people["reviewer"], decision="edit",
                             arguments={"order_id": "ORD-1042", "amount": 99999})
    request.refresh_from_db()
    reason = explain.match_reason(request)
    assert reason == {"label": "refund-over-1000 v1", "policy": "refund-over-1000",
                      "version": 1, "clauses": ["tool is issue_refund",
                                                "amount > 1000 (the call has 99999)"]}


@pytest.mark.django_db
def test_it_explains_a_request_opened_before_matches_were_recorded(people: dict) -> None:
    request = _open_request(people["operator"])
    context = dict(request.context)
    del context["policy_match"]
    ApprovalRequest.objects.filter(pk=request.pk).update(context=context)
    request.refresh_from_db()
    assert explain.match_reason(request)["clauses"] == [
        "tool is issue_refund", "amount > 100 (the call has 500)"]


# ---- M of N ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_one_of_two_approvals_with_who_and_when(people: dict) -> None:
    request = _open_request(people["operator"], amount=5000)
    assert request.required_approvals == 2
    first = signed_in(people["reviewer"])
    answer = first.post(f"/review/{request.pk}/decide", {
        "decision": "approve", "arguments_digest": request.arguments_digest})
    assert answer.status_code == 302
    queue = first.get(answer["Location"]).content.decode()
    assert "1 of 2 approvals recorded; waiting for one more" in queue  # the message
    mine = row_of(queue, request)
    assert "You decided (Approve)" in mine and 'value="approve"' not in mine

    second = signed_in(people["reviewer2"])
    page = second.get(f"/review/{request.pk}/").content.decode()
    progress = re.search(r'<dd id="approval-progress">(.*?)</dd>', page, re.S).group(1)
    assert "<strong>1 of 2 approvals</strong>" in progress and "waiting for 1 more" in progress
    decision = Decision.objects.get(request=request)
    # (every time in the console's one format, in a <time> element carrying the UTC moment)
    assert (f'reviewer: Approve at <time datetime="{decision.created_at:%Y-%m-%dT%H:%M:%S}Z">'
            f"{decision.created_at:%Y-%m-%d %H:%M:%S} UTC</time>") in progress
    row = row_of(second.get("/review/").content.decode(), request)
    assert "1 of 2 approvals" in row and "reviewer," in row and 'value="approve"' in row

    second.post(f"/review/{request.pk}/decide", {"decision": "approve"})
    page = second.get(f"/review/{request.pk}/").content.decode()
    progress = re.search(r'<dd id="approval-progress">(.*?)</dd>', page, re.S).group(1)
    assert "2 of 2 approvals" in progress and "waiting" not in progress


@pytest.mark.django_db
def test_it_does_not_count_an_approval_of_arguments_since_edited(people: dict) -> None:
    request = _open_request(people["operator"], amount=5000)
    approvals.request_decide(request_id=request.pk, user=people["reviewer"], decision="approve")
    approvals.request_decide(request_id=request.pk, user=people["reviewer2"], decision="edit",
                             arguments={"order_id": "ORD-1042", "amount": 4000})
    request.refresh_from_db()
    assert request.status == "pending"
    progress = explain.approval_progress(request)
    assert progress["count"] == 1 and progress["missing"] == 1
    assert [d.decider.username for d in progress["approvals"]] == ["reviewer2"]
    assert [d.decider.username for d in progress["stale"]] == ["reviewer"]
    page = signed_in(people["admin"]).get(f"/review/{request.pk}/").content.decode()
    assert "for arguments since edited: not counted" in page


# ---- what an edit changed -----------------------------------------------------------------


def test_it_marks_each_changed_field_as_changed_added_or_removed() -> None:
    before = {"order_id": "ORD-1", "amount": 500, "meta": {"note": "x", "gone": 1}}
    after = {"order_id": "ORD-1", "amount": 250, "meta": {"note": "x", "new": None}}
    assert review_context.change_rows(before, after) == [
        {"field": "amount", "from": 500, "to": 250, "kind": "changed"},
        {"field": "meta.gone", "from": 1, "to": None, "kind": "removed"},
        {"field": "meta.new", "from": None, "to": None, "kind": "added"},
    ]
    assert review_context.change_rows(before, before) == []


@pytest.mark.django_db
def test_it_shows_the_edit_against_the_original_on_the_request_page(people: dict) -> None:
    request = _open_request(people["operator"], amount=5000)
    editor = signed_in(people["reviewer"])
    answer = editor.post(f"/review/{request.pk}/decide", {
        "decision": "edit", "arguments": '{"order_id": "ORD-1042", "amount": 4000}'})
    assert answer.status_code == 302
    page = signed_in(people["reviewer2"]).get(f"/review/{request.pk}/").content.decode()
    changes = re.search(r'<table id="changes".*?</table>', page, re.S).group(0)
    assert re.search(r'<tr class="change-changed"><td><code>amount</code></td><td>changed</td>'
                     r'<td><code class="data">5000</code></td>'
                     r'<td><code class="data">4000</code></td></tr>', changes)


@pytest.mark.django_db
def test_it_previews_an_edit_before_it_is_submitted(people: dict) -> None:
    request = _open_request(people["operator"])
    reviewer = signed_in(people["reviewer"])
    path = f"/review/{request.pk}/preview"
    typed = json.dumps({"order_id": XSS, "amount": 80})
    fragment = htmx_post(reviewer, path, {"arguments": typed}).content.decode()
    assert fragment.lstrip().startswith('<div id="edit-preview"')
    assert "<td><code>amount</code></td><td>changed</td>" in fragment
    assert "<td><code>order_id</code></td><td>changed</td>" in fragment
    assert XSS not in fragment

    page = reviewer.post(path, {"arguments": '{"order_id": "ORD-1042", "amount": 80}',
                                "note": "halved"})
    assert page.status_code == 200
    body = page.content.decode()
    assert 'id="preview-changes"' in body and "halved</textarea>" in body
    assert "&quot;amount&quot;: 80}</textarea>" in body  # the typed edit is kept

    same = htmx_post(reviewer, path, {"arguments": '{"order_id": "ORD-1042", "amount": 500}'})
    assert "No change from what the agent asked for." in same.content.decode()
    broken = htmx_post(reviewer, path, {"arguments": '{"amount": '})
    assert broken.status_code == 200 and "not valid JSON" in broken.content.decode()
    assert not request.decisions.exists()


# ---- confirmation in place ------------------------------------------------------------------


@pytest.mark.django_db
def test_it_confirms_an_approval_from_the_queue_in_its_row(people: dict) -> None:
    request = _open_request(people["operator"], amount=250)
    reviewer = signed_in(people["reviewer"])
    answer = htmx_post(reviewer, f"/review/{request.pk}/decide", {
        "decision": "approve", "from": "queue", "arguments_digest": request.arguments_digest})
    assert answer.status_code == 200 and "Location" not in answer
    row = answer.content.decode().strip()
    assert row.startswith(f'<tr id="approval-{request.pk}" class="decided">')
    run = str(request.run_id)[:8]
    assert (f"Approved issue_refund (amount 250, order_id ORD-1042) for run {run}: "
            "the run goes on") in row
    request.refresh_from_db()
    assert request.status == "approved"
    # The queue itself (a live push or a poll) keeps saying what became of it.
    queue = reviewer.get("/review/", HTTP_HX_REQUEST="true").content.decode()
    assert 'id="recent-decisions"' in queue and f"for run {run}: the run goes on" in queue
    assert f'id="approval-{request.pk}"' not in queue


@pytest.mark.django_db
def test_it_confirms_the_first_of_two_approvals_in_place(people: dict) -> None:
    request = _open_request(people["operator"], amount=5000)
    answer = htmx_post(signed_in(people["reviewer"]), f"/review/{request.pk}/decide",
                       {"decision": "approve", "from": "queue"})
    assert "1 of 2 approvals recorded; waiting for one more" in answer.content.decode()


@pytest.mark.django_db
def test_it_confirms_a_rejection_with_what_happens_next(people: dict) -> None:
    request = _open_request(people["operator"])
    answer = htmx_post(signed_in(people["reviewer"]), f"/review/{request.pk}/decide",
                       {"decision": "reject", "from": "queue", "note": "no"})
    assert "the agent is told, and the call is not made" in answer.content.decode()


@pytest.mark.django_db
def test_it_says_in_the_row_why_a_decision_was_refused(people: dict) -> None:
    request = _open_request(people["reviewer"])  # the reviewer started the run
    answer = htmx_post(signed_in(people["reviewer"]), f"/review/{request.pk}/decide",
                       {"decision": "approve", "from": "queue"})
    assert answer.status_code == 403
    row = answer.content.decode()
    assert f'<tr id="approval-{request.pk}">' in row
    assert 'role="alert">you started this run, so you cannot decide its approvals<' in row
    stale = _open_request(people["operator"])
    answer = htmx_post(signed_in(people["reviewer"]), f"/review/{stale.pk}/decide", {
        "decision": "approve", "from": "queue", "arguments_digest": "0" * 64})
    assert answer.status_code == 409 and "digest mismatch" in answer.content.decode()
    assert not Decision.objects.exists()


@pytest.mark.django_db
def test_it_redirects_a_plain_post_with_the_confirmation_as_a_message(people: dict) -> None:
    request = _open_request(people["operator"], amount=250)
    reviewer = signed_in(people["reviewer"])
    answer = reviewer.post(f"/review/{request.pk}/decide", {"decision": "approve",
                                                            "from": "queue"})
    assert answer.status_code == 302 and answer["Location"] == "/review/"
    page = reviewer.get("/review/").content.decode()
    messages = re.search(r'<ul class="messages">(.*?)</ul>', page, re.S).group(1)
    assert "Approved issue_refund (amount 250, order_id ORD-1042)" in messages
    assert "the run goes on" in messages


# ---- raising a budget -----------------------------------------------------------------------


@pytest.mark.django_db
def test_it_offers_a_raise_only_where_the_reason_allows_it(people: dict) -> None:
    action = _open_request(people["operator"])
    run = services.run_create(process=Process.objects.get(slug="refund-exception"),
                              input={**REFUND, "amount": 5}, user=people["operator"])
    spent = approvals.request_open(run_id=run.pk, task_key="refund", reason="budget_exhausted",
                                   requested_by="system", detail="budget spent",
                                   run_started_by=people["operator"])
    outcome = approvals.request_open(run_id=run.pk, task_key="refund",
                                     reason="unknown_outcome", requested_by="system",
                                     run_started_by=people["operator"])
    reviewer = signed_in(people["reviewer"])
    queue = reviewer.get("/review/").content.decode()
    assert "Edit, see details" in row_of(queue, action)
    assert "Raise budget, see details" in row_of(queue, spent)
    assert "See details" in row_of(queue, outcome) and "budget" not in row_of(queue, outcome)
    assert 'value="raise_budget"' in reviewer.get(f"/review/{spent.pk}/").content.decode()
    for request in (action, outcome):
        page = reviewer.get(f"/review/{request.pk}/").content.decode()
        assert 'value="raise_budget"' not in page and 'name="tokens"' not in page
    refused = reviewer.post(f"/review/{outcome.pk}/decide", {"decision": "raise_budget",
                                                             "tokens": "1000"})
    assert refused.status_code == 400
    assert "raising the budget does not help" in refused.content.decode()
    assert not outcome.decisions.exists()
    raised = reviewer.post(f"/review/{spent.pk}/decide", {"decision": "raise_budget",
                                                          "tokens": "1000"})
    assert raised.status_code == 302
    spent.refresh_from_db()
    assert spent.status == "budget_raised"


# ---- approving identical low-risk requests together -----------------------------------------


@pytest.mark.django_db
def test_it_groups_identical_low_risk_requests_in_the_queue(people: dict,
                                                            lookups: Policy) -> None:
    same = [lookup_request(people["operator"]) for _ in range(3)]
    other = lookup_request(people["operator"], order="ORD-7")
    _open_request(people["operator"])  # financial: never grouped
    _open_request(people["operator"])
    groups = review_bulk.bulk_groups(review.pending_rows(people["reviewer"]))
    assert [sorted(str(r.pk) for r in g["requests"]) for g in groups] == [
        sorted(str(r.pk) for r in same)]
    queue = signed_in(people["reviewer"]).get("/review/").content.decode()
    assert "Review and approve these 3…" in queue and str(other.pk) not in queue.split(
        'id="bulk-groups"')[1].split("</div>")[0]


@pytest.mark.django_db
def test_it_approves_identical_requests_together_after_a_confirmation(people: dict,
                                                                      lookups: Policy) -> None:
    chosen = [lookup_request(people["operator"]) for _ in range(3)]
    reviewer = signed_in(people["reviewer"])
    ids = [str(r.pk) for r in chosen]
    shown = htmx_post(reviewer, "/review/bulk", {"requests": ids})
    assert shown.status_code == 200
    panel = shown.content.decode()
    assert "Approve these 3 identical requests?" in panel and 'id="bulk-confirm"' in panel
    assert all(f'value="{i}" checked' in panel for i in ids)
    assert not Decision.objects.exists()  # the first step only shows what would be approved

    done = htmx_post(reviewer, "/review/bulk", {
        "requests": ids, "confirm": "yes", "arguments_digest": chosen[0].arguments_digest})
    assert done.status_code == 200
    results = re.findall(r'<li class="(success|error)">(.*?)</li>', done.content.decode())
    assert [kind for kind, _ in results] == ["success"] * 3
    for request, (_, text) in zip(chosen, results, strict=True):
        assert f"for run {str(request.run_id)[:8]}: the run goes on" in text
    assert set(ApprovalRequest.objects.filter(pk__in=ids).values_list("status", flat=True)) \
        == {"approved"}
    assert Decision.objects.filter(decider=people["reviewer"], kind="approve").count() == 3


@pytest.mark.django_db
def test_it_reports_each_request_when_some_cannot_be_approved(people: dict,
                                                              lookups: Policy) -> None:
    mine = lookup_request(people["reviewer"])  # the reviewer started this run
    assign_perm("orchestration.start_run", people["operator"],
                Process.objects.get(slug="refund-exception"))
    others = [lookup_request(people["operator"]) for _ in range(2)]
    approvals.request_decide(request_id=others[1].pk, user=people["reviewer2"],
                             decision="reject", note="not this one")
    reviewer = signed_in(people["reviewer"])
    done = reviewer.post("/review/bulk", {"requests": [str(r.pk) for r in (mine, *others)],
                                          "confirm": "yes"})
    assert done.status_code == 302 and done["Location"] == "/review/"
    page = reviewer.get("/review/").content.decode()
    messages = re.findall(r'<li class="(success|error)">(.*?)</li>', page)
    assert [kind for kind, _ in messages] == ["error", "success", "error"]
    assert "you started this run" in messages[0][1]
    assert "the run goes on" in messages[1][1]
    assert "Not approved for run" in messages[2][1] and "already rejected" in \
        messages[2][1].lower()
    mine.refresh_from_db()
    assert mine.status == "pending" and not mine.decisions.exists()


@pytest.mark.django_db
def test_it_keeps_m_of_n_per_request_in_a_bulk_approval(people: dict, lookups: Policy) -> None:
    approvals.policy_publish(policy=lookups, tool="lookup_order", risk_class="", conditions=[],
                             decider_group=Group.objects.get(name="reviewer"),
                             required_approvals=2)
    chosen = [lookup_request(people["operator"]) for _ in range(2)]
    done = htmx_post(signed_in(people["reviewer"]), "/review/bulk", {
        "requests": [str(r.pk) for r in chosen], "confirm": "yes"}).content.decode()
    assert done.count("1 of 2 approvals recorded; waiting for one more") == 2
    assert set(ApprovalRequest.objects.values_list("status", flat=True)) == {"pending"}


@pytest.mark.django_db
@pytest.mark.parametrize("case", ["different", "financial", "not-a-proposed-action", "nothing",
                                  "not-an-id", "not-theirs"])
def test_it_refuses_a_selection_that_may_not_be_approved_together(
        people: dict, lookups: Policy, case: str) -> None:
    first = lookup_request(people["operator"])
    who = people["reviewer"]
    if case == "different":
        ids, problem = [first.pk, lookup_request(people["operator"], order="ORD-7").pk], \
            "only identical requests"
    elif case == "financial":
        ids = [_open_request(people["operator"]).pk, _open_request(people["operator"]).pk]
        problem = "issue_refund is a financial-risk tool: approve its requests one by one"
    elif case == "not-a-proposed-action":
        spent = approvals.request_open(run_id=first.run_id, task_key="investigate",
                                       reason="budget_exhausted", requested_by="system")
        ids, problem = [first.pk, spent.pk], "only proposed actions are approved together"
    elif case == "nothing":
        ids, problem = [], "select at least one request"
    elif case == "not-an-id":
        ids, problem = [first.pk, "<b>x</b>"], "not a request"
    else:
        ids, problem = [first.pk], "no request you may decide"
        who = people["operator"]
    client = signed_in(who)
    for confirm in ("", "yes"):
        answer = htmx_post(client, "/review/bulk", {"requests": [str(i) for i in ids],
                                                    "confirm": confirm})
        assert answer.status_code == 400
        assert problem in html.unescape(answer.content.decode())
        assert "<b>x</b>" not in answer.content.decode()
    assert not Decision.objects.exists()
    page = client.post("/review/bulk", {"requests": [str(i) for i in ids]})
    assert page.status_code == 400 and "Nothing was approved" in page.content.decode()


@pytest.mark.django_db
def test_it_refuses_a_low_risk_request_whose_call_was_matched_as_riskier(
        people: dict, lookups: Policy) -> None:
    chosen = [lookup_request(people["operator"]) for _ in range(2)]
    ApprovalRequest.objects.filter(pk=chosen[0].pk).update(
        context={**chosen[0].context, "risk_class": "financial"})
    answer = htmx_post(signed_in(people["reviewer"]), "/review/bulk",
                       {"requests": [str(r.pk) for r in chosen], "confirm": "yes"})
    assert answer.status_code == 400 and not Decision.objects.exists()
    assert "was matched as financial-risk: approve it on its own" in answer.content.decode()
