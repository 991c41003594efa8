"""Access control: roles, agent retirement, API tokens, sign-in throttling, config auditing."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.contrib.contenttypes.models import ContentType
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import Client
from django.utils import timezone
from guardian.models import UserObjectPermission

from approvals.models import ApprovalRequest, Policy
from approvals.services import policy_publish
from audit.config import CONFIG_CHAIN
from audit.models import Event
from console import auth_views
from console.models import ApiToken
from orchestration import grants, services
from orchestration.models import Agent, ModelPrice, Process, Tool
from orchestration.precheck import grant_checker
from tests.conftest import wait_for_run

REFUND = {"order_id": "ORD-1042", "amount": 40, "reason": "damaged",
          "customer_email": "kim@example.com"}



@pytest.fixture(autouse=True)
def _fresh_login_counts() -> None:
    auth_views.limiter().storage.reset()


def config_events(kind: str = "") -> list[Event]:
    qs = Event.objects.filter(chain=CONFIG_CHAIN).order_by("seq")
    return list(qs.filter(kind=kind) if kind else qs)


# --- roles -------------------------------------------------------------------------------------


def test_it_gives_each_role_its_model_permissions(demo: None) -> None:
    operator, reviewer, admin = (User.objects.get(username=n)
                                 for n in ("operator", "reviewer", "admin"))
    assert operator.has_perm("orchestration.start_run")
    assert not operator.has_perm("orchestration.view_run")
    assert not operator.has_perm("approvals.add_decision")
    assert reviewer.has_perm("approvals.add_decision")
    assert not reviewer.has_perm("orchestration.start_run")
    admins = Group.objects.get(name="admin")
    assert admins.permissions.filter(codename="change_agent").exists()
    assert admins.permissions.filter(codename="invoke_tool").exists()
    assert admin.is_staff and admin.groups.filter(name="admin").exists()


def test_it_keeps_the_demo_logins_working_after_seeding_twice(demo: None) -> None:
    call_command("seed_demo", stdout=io.StringIO())
    for name in ("operator", "reviewer", "reviewer2", "admin"):
        assert Client().login(username=name, password="switchboard"), name


def test_it_writes_no_config_events_when_seeding_again(demo: None) -> None:
    before = len(config_events())
    call_command("seed_demo", stdout=io.StringIO())
    assert len(config_events()) == before


def test_it_grants_demo_agents_only_their_tools(demo: None) -> None:
    agent = Agent.objects.first()
    holds = grant_checker(agent.user_id)
    from orchestration import demo as demo_data

    spec = next(s for s in demo_data.AGENTS if s["slug"] == agent.slug)
    for tool in Tool.objects.all():
        assert holds(tool) == (tool.slug in spec["tools"]), tool.slug


# --- agents are identities; retiring one --------------------------------------------------------


def test_it_stops_a_retired_agents_grants_at_once(demo: None, operator: User) -> None:
    # An agent holding a tool (demo agents also hold read grants on a knowledge collection).
    granted = UserObjectPermission.objects.filter(
        content_type=ContentType.objects.get_for_model(Tool), user__agent_identity__isnull=False)
    grant = granted.order_by("user__agent_identity__slug").first()
    agent, tool = grant.user.agent_identity, grant.content_object
    holds = grant_checker(agent.user_id)
    assert holds(tool)
    grants.agent_retire(agent=agent, by=operator)
    assert not holds(tool)
    agent.refresh_from_db()
    agent.user.refresh_from_db()
    assert agent.status == Agent.Status.RETIRED and not agent.user.is_active
    (event,) = config_events("config.agent.retire")
    assert event.actor == "user:operator"
    assert event.data["old"] == {"status": "active", "user_active": True}
    assert event.data["new"] == {"status": "retired", "user_active": False}


def test_it_escalates_a_retired_agents_waiting_task(demo: None, operator: User) -> None:
    from orchestration.models import Task
    from orchestration.store import DjangoRunStore

    run = services.run_create(process=Process.objects.get(slug="refund-exception"),
                              input=REFUND, user=operator)
    task = Task.objects.filter(run=run, executor_type="agent").first()
    store = DjangoRunStore()
    Task.objects.filter(pk=task.pk).update(status="running")
    store.finish_task(str(run.pk), task.key, "waiting", error="waiting for a person")
    agent = Agent.objects.get(slug=task.executor_ref)
    outcome = grants.agent_retire(agent=agent, by=operator)
    assert outcome["escalated"] == 1
    request = ApprovalRequest.objects.get(run_id=run.pk, task_key=task.key)
    assert request.reason == "agent_retired" and request.status == "pending"


@pytest.mark.django_db(transaction=True)
def test_it_parks_a_run_started_after_its_agent_retired(runner: None, api: Any) -> None:
    admin = User.objects.get(username="admin")
    from orchestration import demo as demo_data

    for spec in demo_data.AGENTS:
        grants.agent_retire(agent=Agent.objects.get(slug=spec["slug"]), by=admin)
    created = api.post("/api/v1/runs", {"process": "refund-exception", "input": REFUND})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"])
    assert run.status == "waiting", run.error
    body = api.get(f"/api/v1/runs/{run.pk}").json()
    assert body["waiting_on"][0]["reason"] == "agent_retired"
    assert not Event.objects.filter(chain=run.pk, kind="model.called").exists()


def test_it_names_the_agent_or_the_person_on_every_run_event(demo: None,
                                                             operator: User) -> None:
    run = services.run_create(process=Process.objects.get(slug="refund-exception"),
                              input=REFUND, user=operator)
    actors = set(Event.objects.filter(chain=run.pk).values_list("actor", flat=True))
    assert actors == {"user:operator"}


# --- API tokens --------------------------------------------------------------------------------


def test_it_creates_a_token_that_expires(operator: User, client: Client) -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", "operator", "--expires-in-days", "3", stdout=out,
                 stderr=err)
    raw = out.getvalue().strip().splitlines()[-1]
    token = ApiToken.objects.get(prefix=raw[:10])
    assert timedelta(days=2, hours=23) < token.expires_at - timezone.now() <= timedelta(days=3)
    assert token.digest != raw and raw not in token.digest
    assert client.get("/api/v1/processes", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 200
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now())
    assert client.get("/api/v1/processes", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401


def test_it_refuses_a_nonpositive_expiry(operator: User) -> None:
    with pytest.raises(CommandError, match="at least 1"):
        call_command("create_api_token", "operator", "--expires-in-days", "0",
                     stdout=io.StringIO(), stderr=io.StringIO())


def test_it_revokes_a_token_by_its_prefix(operator: User, client: Client) -> None:
    token, raw = ApiToken.issue(operator, name="ci")
    out = io.StringIO()
    call_command("revoke_api_token", token.prefix, stdout=out)
    assert "Revoked" in out.getvalue()
    assert client.get("/api/v1/processes", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401
    with pytest.raises(CommandError, match="no active token"):
        call_command("revoke_api_token", token.prefix, stdout=io.StringIO())


def test_it_refuses_an_ambiguous_or_short_prefix(operator: User) -> None:
    with pytest.raises(CommandError, match="at least"):
        call_command("revoke_api_token", "sb_", stdout=io.StringIO())
    ApiToken.objects.create(user=operator, prefix="sb_AAAAAAA", digest="a" * 64)
    ApiToken.objects.create(user=operator, prefix="sb_AAAAAAB", digest="b" * 64)
    with pytest.raises(CommandError, match="2 active tokens"):
        call_command("revoke_api_token", "sb_AAAAAA", stdout=io.StringIO())


# --- sign-in throttling ------------------------------------------------------------------------


def _login(client: Client, username: str, password: str, addr: str = "10.0.0.1") -> Any:
    return client.post("/login/", {"username": username, "password": password},
                       REMOTE_ADDR=addr)


def test_it_throttles_guessing_one_username(demo: None) -> None:
    client = Client()
    for i in range(5):
        assert _login(client, "operator", f"guess-{i}", addr=f"10.0.1.{i}").status_code == 200
    blocked = _login(client, "operator", "switchboard", addr="10.0.2.1")
    assert blocked.status_code == 429
    assert b"Too many failed sign-in attempts" in blocked.content
    assert "_auth_user_id" not in client.session
    assert _login(Client(), "reviewer", "switchboard", addr="10.0.2.1").status_code == 302


def test_it_throttles_one_address_guessing_many_usernames(demo: None) -> None:
    for i in range(20):
        assert _login(Client(), f"nobody-{i}", "x", addr="10.9.9.9").status_code == 200
    assert _login(Client(), "operator", "switchboard", addr="10.9.9.9").status_code == 429
    assert _login(Client(), "operator", "switchboard", addr="10.9.9.8").status_code == 302


def test_it_does_not_count_a_successful_sign_in(demo: None) -> None:
    for _ in range(8):
        assert _login(Client(), "operator", "switchboard").status_code == 302


# --- configuration changes are ledger events ----------------------------------------------------


def test_it_records_a_grant_and_a_revoke_once_each(demo: None) -> None:
    admin = User.objects.get(username="admin")
    agent = Agent.objects.first()
    tool = Tool.objects.get(slug="run_python")
    grants.tool_revoke(agent=agent, tool=tool, by=admin)
    before = len(config_events("config.grant"))
    assert grants.tool_grant(agent=agent, tool=tool, by=admin)
    assert not grants.tool_grant(agent=agent, tool=tool, by=admin)
    assert grants.tool_revoke(agent=agent, tool=tool, by=admin)
    granted, revoked = config_events("config.grant")[before:]
    assert granted.actor == revoked.actor == "user:admin"
    assert granted.data == {"model": "orchestration.tool", "object": "run_python",
                            "grantee": f"agent:{agent.slug}", "old": {"perms": []},
                            "new": {"perms": ["invoke_tool"]}}
    assert revoked.data["old"] == {"perms": ["invoke_tool"]}
    assert revoked.data["new"] == {"perms": []}


def test_it_records_a_process_publish_with_old_and_new_budgets(demo: None) -> None:
    admin = User.objects.get(username="admin")
    process = Process.objects.get(slug="vendor-onboarding")
    version = process.current_version
    services.process_publish(process=process, plan=version.plan,
                             input_schema=version.input_schema, budgets={"tokens": 500},
                             by=admin)
    event = config_events("config.process.publish")[-1]
    assert event.actor == "user:admin"
    assert event.data["old"] == {"budgets": {}, "number": version.number}
    assert event.data["new"] == {"budgets": {"tokens": 500}, "number": version.number + 1}


def test_it_records_a_policy_publish(demo: None) -> None:
    admin = User.objects.get(username="admin")
    policy = Policy.objects.first()
    current = policy.current_version
    policy_publish(policy=policy, acting_user=admin, tool=current.tool,
                   risk_class=current.risk_class, conditions=current.conditions,
                   decider_group=current.decider_group, required_approvals=3,
                   deadline_minutes=current.deadline_minutes, on_expiry=current.on_expiry,
                   escalation_group=current.escalation_group)
    event = config_events("config.policy.publish")[-1]
    assert event.actor == "user:admin"
    assert event.data["old"] == {"number": current.number,
                                 "required_approvals": current.required_approvals}
    assert event.data["new"] == {"number": current.number + 1, "required_approvals": 3}


def test_it_rolls_back_the_event_of_a_change_that_fails(demo: None) -> None:
    admin = User.objects.get(username="admin")
    agent, tool = Agent.objects.first(), Tool.objects.get(slug="run_python")
    grants.tool_revoke(agent=agent, tool=tool, by=admin)
    before = len(config_events())
    with pytest.raises(RuntimeError), transaction.atomic():
        grants.tool_grant(agent=agent, tool=tool, by=admin)
        raise RuntimeError("the surrounding change failed")
    assert len(config_events()) == before
    assert not grant_checker(agent.user_id)(tool)


@pytest.fixture
def admin_client(demo: None) -> Client:
    client = Client()
    client.force_login(User.objects.get(username="admin"))
    return client


def _admin_form(client: Client, url: str) -> dict[str, Any]:
    """The admin form's current values, as the browser would send them back."""
    response = client.get(url)
    assert response.status_code == 200
    form = response.context["adminform"].form
    data: dict[str, Any] = {}
    for name, field in form.fields.items():
        value = form.initial.get(name, field.initial)
        if value is None:
            continue
        if isinstance(value, (list, tuple)) or hasattr(value, "all"):
            data[name] = [getattr(v, "pk", v) for v in (value.all() if hasattr(value, "all")
                                                        else value)]
        elif isinstance(value, (dict,)) or name in ("input_schema", "output_schema",
                                                     "model_params"):
            import json

            data[name] = json.dumps(value)
        elif isinstance(value, bool):
            if value:
                data[name] = "on"
        else:
            data[name] = getattr(value, "pk", value)
    for formset in response.context.get("inline_admin_formsets", []):
        mgmt = formset.formset.management_form
        for key, value in mgmt.initial.items():
            data[f"{mgmt.prefix}-{key}"] = value
    return data


@pytest.mark.parametrize("url, change, kind, field", [
    ("orchestration/tool/{tool}/change/", {"timeout_s": 7.5}, "config.tool.change",
     "timeout_s"),
    ("orchestration/modelprice/{price}/change/", {"input_per_mtok": "9.5"},
     "config.price.change", "input_per_mtok"),
    ("orchestration/agent/{agent}/change/", {"step_budget": 9}, "config.agent.change",
     "step_budget"),
])
def test_it_records_an_admin_change_with_old_and_new_values(
        admin_client: Client, url: str, change: dict[str, Any], kind: str, field: str) -> None:
    ids = {"tool": Tool.objects.get(slug="lookup_order").pk,
           "price": ModelPrice.objects.first().pk, "agent": Agent.objects.first().pk}
    path = "/admin/" + url.format(**ids)
    data = _admin_form(admin_client, path)
    old = data.get(field)
    data.update(change)
    response = admin_client.post(path, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    (event,) = config_events(kind)
    assert event.actor == "user:admin"
    assert set(event.data["new"]) == {field}
    assert str(event.data["new"][field]) == str(change[field])
    assert str(event.data["old"][field]).rstrip("0").rstrip(".") == str(old).rstrip(
        "0").rstrip(".")


def test_it_records_a_role_change_in_the_admin(admin_client: Client) -> None:
    operator = User.objects.get(username="operator")
    # The admin's date widget carries whole seconds only.
    User.objects.filter(pk=operator.pk).update(
        date_joined=operator.date_joined.replace(microsecond=0))
    operator.refresh_from_db()
    reviewers = Group.objects.get(name="reviewer")
    path = f"/admin/auth/user/{operator.pk}/change/"
    data = _admin_form(admin_client, path)
    data["groups"] = [*data.get("groups", []), reviewers.pk]
    data["date_joined_0"], data["date_joined_1"] = operator.date_joined.strftime(
        "%Y-%m-%d"), operator.date_joined.strftime("%H:%M:%S")
    response = admin_client.post(path, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    (event,) = config_events("config.person.change")
    assert event.actor == "user:admin"
    assert event.data["old"] == {"groups": ["operator"]}
    assert event.data["new"] == {"groups": ["operator", "reviewer"]}


def test_it_retires_an_agent_from_the_admin(admin_client: Client) -> None:
    agent = Agent.objects.first()
    response = admin_client.post("/admin/orchestration/agent/", {
        "action": "retire", "_selected_action": [str(agent.pk)]})
    assert response.status_code == 302
    agent.refresh_from_db()
    assert agent.status == "retired"
    assert [e.actor for e in config_events("config.agent.retire")] == ["user:admin"]
