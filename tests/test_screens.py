"""Agents, tools and analytics screens and the dashboard's figures: pages, numbers, access."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.db import transaction
from django.test import Client
from django.utils import timezone
from guardian.shortcuts import assign_perm, get_objects_for_user

from approvals.models import ApprovalRequest
from audit import ledger
from console import charts, selectors
from orchestration import services
from orchestration.models import Agent, Process, Run, Task, Tool
from tests.conftest import wait_for_run

PAYLOAD = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
PAGES = ("/", "/agents/", "/agents/frontdesk/", "/tools/", "/analytics/")
INQUIRY = {"customer_email": "kim@example.com", "order_id": "ORD-1042",
           "message": "Where is my order?"}
REFUND = {"order_id": "ORD-1042", "amount": 500, "reason": "damaged",
          "customer_email": "kim@example.com"}



def signed_in(user: User, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


def _run(slug: str, status: str, cost: str, *, finished_ago: timedelta | None = timedelta(0),
         budget: str | None = None, by: User | None = None) -> Run:
    now = timezone.now()
    run = Run.objects.create(
        process_version=Process.objects.get(slug=slug).current_version, status=status,
        cost=Decimal(cost), budget_cost=Decimal(budget) if budget else None, created_by=by,
        finished_at=None if finished_ago is None else now - finished_ago)
    return run


def _task(run: Run, key: str, agent: str, status: str, cost: str) -> Task:
    now = timezone.now()
    return Task.objects.create(run=run, key=key, executor_type="agent", executor_ref=agent,
                               status=status, used_cost=Decimal(cost), started_at=now,
                               finished_at=now if status in ("succeeded", "failed") else None)


def _escalation(run: Run, task: str, agent: str, reason: str, *,
                waited: timedelta | None = None) -> ApprovalRequest:
    request = ApprovalRequest.objects.create(
        run_id=run.pk, task_key=task, reason=reason, requested_by=f"agent:{agent}",
        decider_group=Group.objects.get(name="reviewer"),
        deadline=timezone.now() + timedelta(hours=1),
        status="pending" if waited is None else "approved")
    if waited is not None:
        ApprovalRequest.objects.filter(pk=request.pk).update(
            decided_at=request.created_at + waited)
    return request


def _model_calls(run: Run, agent: str, n: int) -> None:
    with transaction.atomic():
        for step in range(n):
            ledger.append(run.pk, "model.called", {"step": step}, actor=f"agent:{agent}")


@pytest.fixture
def dataset(people: dict[str, User]) -> dict[str, Run]:
    """2 succeeded and 1 failed refund runs, 1 waiting; 3 frontdesk tasks, one escalation."""
    op = people["operator"]
    won = _run("refund-exception", "succeeded", "0.30", budget="1.00", by=op)
    won2 = _run("refund-exception", "succeeded", "0.10", budget="1.00", by=op)
    lost = _run("refund-exception", "failed", "0.20", by=op)
    waiting = _run("customer-inquiry", "waiting", "0.05", finished_ago=None, budget="0.50",
                   by=op)
    _task(won, "work", "frontdesk", "succeeded", "0.30")
    _task(won2, "work", "frontdesk", "succeeded", "0.10")
    _task(lost, "work", "frontdesk", "failed", "0.20")
    _escalation(won, "work", "frontdesk", "sensitive_action", waited=timedelta(minutes=10))
    _escalation(waiting, "reply", "customer-comms", "budget_exhausted")
    _model_calls(won, "frontdesk", 2)
    _model_calls(lost, "frontdesk", 4)
    return {"won": won, "lost": lost, "waiting": waiting}


def test_it_scores_agents_on_a_hand_checked_dataset(dataset: dict[str, Run]) -> None:
    card = selectors.agent_scorecards(["frontdesk", "refund-executor"])
    frontdesk = card["frontdesk"]
    assert (frontdesk.runs, frontdesk.tasks, frontdesk.succeeded) == (3, 3, 2)
    assert f"{frontdesk.success_rate:.3f}" == "0.667"
    assert f"{frontdesk.escalation_rate:.3f}" == "0.333"
    assert frontdesk.steps_per_task == 2.0
    # 0.60 spent in all, failed attempt included, over 2 completed tasks.
    assert frontdesk.cost_per_completed == Decimal("0.30")
    assert frontdesk.last_used is not None
    assert card["refund-executor"].tasks == 0 and card["refund-executor"].success_rate is None


def test_it_shows_the_scorecard_on_the_agents_page(dataset: dict[str, Run],
                                                   people: dict[str, User]) -> None:
    page = signed_in(people["operator"]).get("/agents/").content.decode()
    row = page[page.index('id="agent-frontdesk"'):]
    row = row[:row.index("</tr>")]
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
    assert "search_knowledge, send_customer_email" in cells
    assert cells[-7:-1] == ["3", "3", "66.7%", "1 (33.3%)", "2.0", "0.3000"]


def test_it_computes_the_dashboard_figures(dataset: dict[str, Run],
                                           people: dict[str, User]) -> None:
    figures = selectors.dashboard_figures(people["reviewer"])
    assert (figures.active, figures.waiting) == (0, 1)  # waiting on people is not working
    assert figures.pending_for_me == 1
    assert f"{figures.success_rate:.3f}" == "0.667"
    assert figures.cost_per_completed == Decimal("0.30")
    assert figures.spend_today == Decimal("0.65") and figures.budget_today == Decimal("2.50")
    assert figures.uncapped_today == 1
    assert figures.capped_spend_today == Decimal("0.45")  # against the 2.50 of their caps
    assert figures.uncapped_spend_today == Decimal("0.20")
    assert f"{figures.budget_used:.2f}" == "0.18"
    [(run, requests)] = figures.waiting_on
    assert run.pk == dataset["waiting"].pk and [r.reason for r in requests] == [
        "budget_exhausted"]

    page = signed_in(people["reviewer"]).get("/").content.decode()
    assert 'id="figure-success-rate">66.7%<' in page
    found = re.search(r'id="figure-spend-today">(.*?)</dd>', page, re.S)
    assert found is not None
    spend = " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())
    assert "runs with a cost cap: 0.4500 of 2.5000 (18.0%)" in spend
    assert "1 run without a cost cap: 0.2000" in spend
    assert "Start a run" not in page  # a reviewer may start nothing: no start card
    assert f'href="/review/{requests[0].pk}/"' in page


def test_it_breaks_cost_down_by_process_pattern_and_agent(dataset: dict[str, Run],
                                                          people: dict[str, User]) -> None:
    process, pattern, agent = selectors.cost_breakdowns(timezone.now())
    [row] = process.rows
    assert (row.key, row.finished, row.completed, row.cost) == (
        "refund-exception", 3, 2, Decimal("0.60"))
    assert row.cost_per_completed == Decimal("0.30")
    assert row.review_wait == timedelta(minutes=10)
    assert [(r.key, r.completed) for r in pattern.rows] == [("agent_workflow", 2)]
    [task_row] = agent.rows
    assert (task_row.key, task_row.cost_per_completed) == ("frontdesk", Decimal("0.30"))
    assert task_row.review_wait == timedelta(minutes=10)
    assert selectors.escalation_reasons(timezone.now()) == [
        ("budget exhausted", 1), ("sensitive action", 1)]

    page = signed_in(people["operator"]).get("/analytics/").content.decode()
    assert "<svg" in page and "<polyline" in page
    assert "<td>0.3000</td><td>10m 00s</td>" in page


def test_it_scales_charts_from_numbers_only() -> None:
    bars = charts.bar_chart([("a", 4), ("b", Decimal(1)), ("c", 0)]).bars
    assert [b.width for b in bars] == [bars[0].width, bars[0].width / 4, 0]
    assert bars[0].width == charts.WIDTH - charts.LABEL_WIDTH - charts.PAD
    line = charts.line_chart(["2026-01-01", "2026-01-02"], {"x": [None, 2], "y": [1, 0]})
    assert [s.points for s in line.series] == [
        f"{charts.PAD}.0,{line.baseline}.0 {charts.WIDTH - charts.PAD}.0,{charts.PAD}.0",
        f"{charts.PAD}.0,{(line.baseline + charts.PAD) / 2} "
        f"{charts.WIDTH - charts.PAD}.0,{line.baseline}.0"]


def _add_agents(n: int, start: int) -> None:
    tool = Tool.objects.get(slug="lookup_order")
    for i in range(start, start + n):
        user = User.objects.create(username=f"agent-extra-{i}")
        Agent.objects.create(slug=f"extra-{i}", name=f"Extra {i}", user=user)
        assign_perm("orchestration.invoke_tool", user, tool)


def test_it_reads_the_agents_page_in_queries_that_do_not_grow_with_agents(
        dataset: dict[str, Run], people: dict[str, User],
        django_assert_max_num_queries: Any) -> None:
    client = signed_in(people["operator"])
    client.get("/agents/")  # session and permission caches warm
    with django_assert_max_num_queries(12) as few:
        assert client.get("/agents/").status_code == 200
    _add_agents(15, 0)
    with django_assert_max_num_queries(len(few.captured_queries)):
        page = client.get("/agents/")
    assert page.content.decode().count('id="agent-extra-') == 15
    for path in ("/tools/", "/analytics/", "/"):
        with django_assert_max_num_queries(15):
            assert client.get(path).status_code == 200


def test_it_lists_the_same_grants_as_guardian(people: dict[str, User]) -> None:
    agents = list(Agent.objects.all())
    grants = selectors.agent_grants(agents)
    for agent in agents:
        expected = get_objects_for_user(agent.user, "orchestration.invoke_tool", Tool,
                                        with_superuser=False)
        assert [t.slug for t in grants[agent.slug]] == sorted(t.slug for t in expected)


def test_it_lets_only_admins_retire_an_agent(people: dict[str, User]) -> None:
    for who in ("operator", "reviewer"):
        response = signed_in(people[who]).post("/agents/frontdesk/retire")
        assert response.status_code == 403
    assert Agent.objects.get(slug="frontdesk").status == "active"
    assert "Retire frontdesk" not in signed_in(people["operator"]).get(
        "/agents/frontdesk/").content.decode()

    admin = signed_in(people["admin"], csrf=True)
    assert admin.post("/agents/frontdesk/retire").status_code == 403  # no CSRF token
    assert Agent.objects.get(slug="frontdesk").status == "active"
    page = admin.get("/agents/frontdesk/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token and "Retire frontdesk" in page
    response = admin.post("/agents/frontdesk/retire", {"csrfmiddlewaretoken": token.group(1)})
    assert response.status_code == 302
    agent = Agent.objects.select_related("user").get(slug="frontdesk")
    assert agent.status == "retired" and not agent.user.is_active
    assert admin.get("/agents/frontdesk/retire").status_code == 405


def test_it_refuses_outsiders_and_sends_strangers_to_sign_in(people: dict[str, User]) -> None:
    outsider = signed_in(User.objects.create(username="outsider"))
    for path in PAGES[1:]:
        assert outsider.get(path).status_code == 403, path
        response = Client().get(path)
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert outsider.post("/agents/frontdesk/retire").status_code == 403


def test_it_escapes_what_admins_write_into_a_tool(people: dict[str, User]) -> None:
    Tool.objects.filter(slug="lookup_order").update(
        description=PAYLOAD, input_schema={"type": "object", "description": PAYLOAD})
    page = signed_in(people["operator"]).get("/tools/").content.decode()
    assert PAYLOAD not in page
    assert ESCAPED in page
    assert html.escape(f'"description": "{PAYLOAD}"', quote=True) in page


@pytest.mark.django_db(transaction=True)
def test_it_renders_every_screen_after_real_runs(runner: None, people: dict[str, User]) -> None:
    operator = people["operator"]
    inquiry = Process.objects.get(slug="customer-inquiry")
    done = [services.run_create(process=inquiry, input=INQUIRY, user=operator).pk
            for _ in range(2)]
    refund = services.run_create(process=Process.objects.get(slug="refund-exception"),
                                 input=REFUND, user=operator)
    assert [wait_for_run(pk).status for pk in done] == ["succeeded", "succeeded"]
    assert wait_for_run(refund.pk).status == "waiting"

    client = signed_in(operator)
    pages = {path: client.get(path) for path in PAGES}
    assert all(r.status_code == 200 for r in pages.values()), {
        p: r.status_code for p, r in pages.items()}
    card = selectors.agent_scorecards(["frontdesk"])["frontdesk"]
    assert (card.runs, card.succeeded, card.steps) == (2, 2, 6)
    assert card.success_rate == 1.0 and card.cost_per_completed > 0
    tools = pages["/tools/"].content.decode()
    lookup = tools[tools.index('id="tool-lookup_order"'):]
    # Two inquiries and the refund's investigation each look the order up once.
    assert '<td class="calls">3 / 3</td>' in lookup[:lookup.index("</tr>")]
    approval = ApprovalRequest.objects.get(run_id=refund.pk, status="pending")
    assert f'href="/review/{approval.pk}/"' in pages["/"].content.decode()
    assert "customer-inquiry" in pages["/analytics/"].content.decode()


def _figures_by_hand(user: User, now: Any) -> dict[str, Any]:
    """The dashboard's figures counted run by run over what visible_runs lets ``user`` see."""
    from console.access import visible_runs
    from orchestration.engine.states import RUN_TERMINAL

    ended = {s.value for s in RUN_TERMINAL}
    waits = {"waiting", "awaiting_plan_approval"}
    today = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    runs = list(visible_runs(user))
    done = [r for r in runs if r.status in ended and r.finished_at
            and r.finished_at >= now - timedelta(days=14)]
    new = [r for r in runs if r.created_at >= today]
    return {"active": sum(r.status not in ended | waits for r in runs),
            "waiting": sum(r.status in waits for r in runs),
            "spend_today": sum((r.cost for r in new), Decimal(0)),
            "budget_today": sum((r.budget_cost for r in new if r.budget_cost), Decimal(0)),
            "capped_spend_today": sum((r.cost for r in new if r.budget_cost is not None),
                                      Decimal(0)),
            "uncapped_today": sum(r.budget_cost is None for r in new),
            "finished": len(done), "succeeded": sum(r.status == "succeeded" for r in done),
            "failed": sum(r.status == "failed" for r in done),
            "finished_cost": sum((r.cost for r in done), Decimal(0))}


def test_the_dashboard_figures_match_a_count_of_the_runs_each_person_may_see(
        people: dict[str, User]) -> None:
    from orchestration.engine.states import RunStatus

    team = User.objects.create(username="refund-team")
    assign_perm("orchestration.start_run", team, Process.objects.get(slug="refund-exception"))
    now = timezone.now()
    for n, status in enumerate(RunStatus):
        for slug in ("refund-exception", "customer-inquiry"):
            for by in (team, people["operator"], None):
                run = _run(slug, status.value, f"0.{n + 1:02d}", by=by,
                           budget="1.00" if n % 2 else None,
                           finished_ago=timedelta(days=20 if n % 3 == 0 else n % 3))
                if n % 4 == 0:  # started before today
                    Run.objects.filter(pk=run.pk).update(created_at=now - timedelta(days=2))
    for user in (team, people["operator"], people["reviewer"]):
        figures = selectors.dashboard_figures(user, now=now)
        expected = _figures_by_hand(user, now)
        assert {k: getattr(figures, k) for k in expected} == expected, user.username
    assert selectors.dashboard_figures(team, now=now).finished < selectors.dashboard_figures(
        people["reviewer"], now=now).finished
