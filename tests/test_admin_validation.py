"""The admin cannot break runs: configuration a run could not use is refused with a form error
(never a 500, nothing saved, nothing on the configuration chain), model validation refuses the
same values, and what the runtime records cannot be deleted or edited from the admin."""

from __future__ import annotations

import html
import json
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError
from django.test import Client

from approvals import conditions
from approvals.models import ApprovalRequest, Policy, PolicyVersion, Reason
from approvals.services import ApprovalError, policy_match, policy_publish, request_open
from audit.config import CONFIG_CHAIN
from audit.models import Event
from orchestration import services
from orchestration.model_params import check_model_params
from orchestration.models import Agent, ModelPrice, Process, Task, Tool
from tests.test_access import _admin_form

ADMIN = "/admin/"



@pytest.fixture
def admin_client(demo: None) -> Client:
    client = Client()
    client.force_login(User.objects.get(username="admin"))
    return client


def chain_length() -> int:
    return Event.objects.filter(chain=CONFIG_CHAIN).count()


def form_errors(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 200, response.status_code
    return dict(response.context["adminform"].form.errors)


def post_refused(client: Client, path: str, data: dict[str, Any], field: str,
                 expected: str) -> None:
    """POST ``data``: answered 200 with ``expected`` in ``field``'s error on the page."""
    response = client.post(path, data)
    errors = form_errors(response)
    assert field in errors, errors
    assert expected in " ".join(errors[field]), errors[field]
    assert expected in html.unescape(response.content.decode())


# --- tools -------------------------------------------------------------------------------------

BAD_TOOL_VALUES = [
    ("input_schema", "[1, 2]", "must be a JSON Schema object"),
    ("input_schema", '{"type": "bogus"}', "is not a valid JSON Schema (2020-12)"),
    ("input_schema", '{"type": "string"}', 'must describe an object ("type": "object")'),
    ("input_schema", '{"type": "object", "properties": {"a": {"pattern": "("}}}',
     "is not a 'regex'"),
    ("output_schema", "true", "must be a JSON Schema object"),
    ("output_schema", '{"type": "object", "required": "amount"}',
     "is not a valid JSON Schema (2020-12)"),
    ("rate_limit", "banana", '"10/minute"'),
    ("rate_limit", "0/minute", "allows no call at all"),
    ("rate_limit", "10/minute;5/second", "holds 2 limits"),
    ("timeout_s", "0", "above 0"),
    ("timeout_s", "-3", "above 0"),
    ("timeout_s", "86400", "at most 3600"),
    ("cost_per_call", "-0.5", "at least 0"),
    ("implementation", "no_such_tool", "is not a registered tool"),
    ("quota_per_window", "0", "allows no call at all"),
    ("quota_window_s", "0", "at least 1 second"),
]


@pytest.mark.parametrize("field, value, expected", BAD_TOOL_VALUES)
def test_it_refuses_a_tool_change_a_run_could_not_use(admin_client: Client, field: str,
                                                       value: str, expected: str) -> None:
    tool = Tool.objects.get(slug="lookup_order")
    path = f"{ADMIN}orchestration/tool/{tool.pk}/change/"
    data = _admin_form(admin_client, path)
    before = (Tool.objects.filter(pk=tool.pk).values().get(), chain_length())
    post_refused(admin_client, path, {**data, field: value}, field, expected)
    assert (Tool.objects.filter(pk=tool.pk).values().get(), chain_length()) == before


def test_it_saves_a_tool_change_with_a_rate_limit_it_can_read(admin_client: Client) -> None:
    tool = Tool.objects.get(slug="lookup_order")
    path = f"{ADMIN}orchestration/tool/{tool.pk}/change/"
    data = _admin_form(admin_client, path)
    before = chain_length()
    response = admin_client.post(path, {**data, "rate_limit": "10/minute", "timeout_s": "2.5"})
    assert response.status_code == 302, form_errors(response)
    tool.refresh_from_db()
    assert (tool.rate_limit, tool.timeout_s) == ("10/minute", 2.5)
    assert chain_length() == before + 1


def _new_tool(**values: str) -> dict[str, Any]:
    return {"slug": "crm_lookup", "name": "CRM lookup", "kind": "python", "implementation": "",
            "http_method": "POST", "url_template": "", "credential_ref": "",
            "input_schema": json.dumps({"type": "object",
                                        "properties": {"id": {"type": "string"}}}),
            "output_schema": '{"type": "object"}', "timeout_s": "10", "idempotent": "on",
            "risk_class": "read", "cost_per_call": "0", "quota_window_s": "3600",
            "rate_limit": "", **values}


@pytest.mark.parametrize("values, field, expected", [
    ({"kind": "python", "implementation": ""}, "implementation", "is not a registered tool"),
    ({"kind": "http", "url_template": ""}, "url_template", "needs a URL"),
    ({"kind": "http", "url_template": "crm.example/customers"}, "url_template",
     "http:// or https://"),
    ({"kind": "http", "url_template": "https://crm.example/customers/{customer}"},
     "url_template", "placeholder {customer} is not an argument"),
    ({"kind": "http", "url_template": "https://crm.example/c", "http_method": "FETCH"},
     "http_method", "must be one of GET"),
])
def test_it_refuses_a_new_tool_it_cannot_call(admin_client: Client, values: dict[str, str],
                                              field: str, expected: str) -> None:
    before = (Tool.objects.count(), chain_length())
    post_refused(admin_client, f"{ADMIN}orchestration/tool/add/", _new_tool(**values),
                 field, expected)
    assert (Tool.objects.count(), chain_length()) == before


@pytest.mark.parametrize("values", [
    {"kind": "python", "implementation": "lookup_order"},
    {"kind": "http", "url_template": "https://crm.example/api/customers/{id}"},
])
def test_it_adds_a_tool_it_can_call(admin_client: Client, values: dict[str, str]) -> None:
    before = chain_length()
    response = admin_client.post(f"{ADMIN}orchestration/tool/add/",
                                 _new_tool(**values))
    assert response.status_code == 302, form_errors(response)
    assert Tool.objects.get(slug="crm_lookup").kind == values["kind"]
    assert Event.objects.filter(chain=CONFIG_CHAIN).order_by("-seq").first().kind == \
        "config.tool.create"
    assert chain_length() == before + 1


# --- agents ------------------------------------------------------------------------------------

SCRIPTED_BAD = [
    ("model_params", "[1]", "must be a JSON object"),
    ("model_params", "{}", "script must be a non-empty list"),
    ("model_params", '{"script": []}', "script must be a non-empty list"),
    ("model_params", '{"script": [1]}', "script turn 1 must be an object"),
    ("model_params", '{"script": [{"tool_calls": [{"arguments": {}}]}]}',
     'tool call 1 must be an object with a "name"'),
    ("model_params", '{"script": [{"text": "hi"}], "temprature": 1}', "unknown key 'temprature'"),
    ("model_params", '{"script": [{"text": "hi"}], "max_tokens": 0}', "max_tokens must be"),
    ("provider", "gemini", "unknown provider 'gemini'"),
    ("step_budget", "0", "at least 1 step"),
]


@pytest.mark.parametrize("field, value, expected", SCRIPTED_BAD)
def test_it_refuses_agent_settings_its_model_cannot_take(admin_client: Client, field: str,
                                                         value: str, expected: str) -> None:
    agent = Agent.objects.get(slug="frontdesk")
    path = f"{ADMIN}orchestration/agent/{agent.pk}/change/"
    data = _admin_form(admin_client, path)
    before = (Agent.objects.filter(pk=agent.pk).values().get(), chain_length())
    post_refused(admin_client, path, {**data, field: value}, field, expected)
    assert (Agent.objects.filter(pk=agent.pk).values().get(), chain_length()) == before


@pytest.mark.parametrize("provider, params, field, expected", [
    ("openai", {"temperature": 3}, "model_params", "temperature must be a number from 0 to 2"),
    ("anthropic", {"temperature": 1.5}, "model_params", "from 0 to 1 for the anthropic"),
    ("openai", {"temperature": "hot"}, "model_params", "temperature must be a number"),
    ("openai", {"base_url": "localhost:8080"}, "model_params", "base_url must be an http://"),
    ("openai", {"timeout_s": "fast"}, "model_params", "timeout_s must be a number of seconds"),
    ("openai", {"max_retries": -1}, "model_params", "max_retries must be a whole number"),
    ("anthropic", {"stop": ["x"]}, "model_params", "unknown key 'stop'"),
    ("openai", {"script": [{"text": "x"}]}, "model_params", "unknown key 'script'"),
    ("openai", {}, "model_name", "needs a model name"),
])
def test_it_refuses_provider_params_per_provider(admin_client: Client, provider: str,
                                                 params: dict[str, Any], field: str,
                                                 expected: str) -> None:
    agent = Agent.objects.get(slug="frontdesk")
    path = f"{ADMIN}orchestration/agent/{agent.pk}/change/"
    data = _admin_form(admin_client, path)
    data.update(provider=provider, model_params=json.dumps(params),
                model_name="" if field == "model_name" else "gpt-test")
    before = Agent.objects.filter(pk=agent.pk).values().get()
    post_refused(admin_client, path, data, field, expected)
    assert Agent.objects.filter(pk=agent.pk).values().get() == before


def test_it_saves_an_agent_its_provider_can_run(admin_client: Client) -> None:
    agent = Agent.objects.get(slug="frontdesk")
    path = f"{ADMIN}orchestration/agent/{agent.pk}/change/"
    data = _admin_form(admin_client, path)
    params = {"base_url": "http://127.0.0.1:8080/v1", "temperature": 0.2, "max_tokens": 256,
              "timeout_s": 30, "max_retries": 1, "stop": ["END"], "seed": 7}
    data.update(provider="openai", model_name="gpt-test", model_params=json.dumps(params))
    before = chain_length()
    response = admin_client.post(path, data)
    assert response.status_code == 302, form_errors(response)
    agent.refresh_from_db()
    assert (agent.provider, agent.model_params) == ("openai", params)
    assert chain_length() == before + 1


def test_it_adds_an_agent_only_with_a_script_it_can_replay(admin_client: Client) -> None:
    identity = User.objects.create(username="agent-new")
    data = {"slug": "new", "name": "New", "user": identity.pk, "instructions": "",
            "provider": "scripted", "model_name": "", "model_params": '{"script": []}',
            "credential_ref": "", "step_budget": 5,
            "token_budget": 20000, "status": "active"}
    before = (Agent.objects.count(), chain_length())
    post_refused(admin_client, f"{ADMIN}orchestration/agent/add/", data, "model_params",
                 "script must be a non-empty list")
    assert (Agent.objects.count(), chain_length()) == before
    data["model_params"] = json.dumps({"script": [{"text": "Done."}]})
    response = admin_client.post(f"{ADMIN}orchestration/agent/add/", data)
    assert response.status_code == 302, form_errors(response)
    assert Agent.objects.get(slug="new").model_params == {"script": [{"text": "Done."}]}


@pytest.mark.parametrize("field, value, expected", [
    ("input_per_mtok", "-1", "at least 0"),
    ("provider", "opneai", "unknown provider 'opneai'"),
])
def test_it_refuses_a_price_no_call_could_use(admin_client: Client, field: str, value: str,
                                              expected: str) -> None:
    price = ModelPrice.objects.first()
    path = f"{ADMIN}orchestration/modelprice/{price.pk}/change/"
    data = _admin_form(admin_client, path)
    before = (ModelPrice.objects.filter(pk=price.pk).values().get(), chain_length())
    post_refused(admin_client, path, {**data, field: value}, field, expected)
    assert (ModelPrice.objects.filter(pk=price.pk).values().get(), chain_length()) == before


# --- policies ----------------------------------------------------------------------------------


def _policy_data(**values: Any) -> dict[str, Any]:
    policy = Policy.objects.get(slug="refund-over-100")
    data: dict[str, Any] = {}
    data.update({"policy": policy.pk, "tool": "issue_refund", "risk_class": "",
                 "conditions": json.dumps([{"arg": "amount", "op": ">", "value": 100}]),
                 "decider_group": Group.objects.get(name="reviewer").pk,
                 "required_approvals": 1, "deadline_minutes": 60, "on_expiry": "reject",
                 "escalation_group": ""})
    data.update({k: json.dumps(v) if k == "conditions" else v for k, v in values.items()})
    return data


@pytest.mark.parametrize("values, field, expected", [
    ({"required_approvals": 0}, "required_approvals", "at least 1 person must approve"),
    ({"conditions": {"value": "x"}}, "conditions", "conditions must be a list"),
    ({"conditions": [{"value": "x"}]}, "conditions", "condition 1 ({\"value\": \"x\"}): "
                                                     "names no argument"),
    ({"conditions": [{"arg": "amount", "value": 5}]}, "conditions", '"op" must be one of'),
    ({"conditions": [{"arg": "amount", "op": ">"}]}, "conditions", 'has no "value"'),
    ({"conditions": [{"arg": "amount", "op": ">", "value": "x"}]}, "conditions",
     '">" compares numbers'),
    ({"conditions": [{"arg": "amount", "op": "in", "value": 5}]}, "conditions",
     '"in" needs "value": a non-empty list'),
    ({"conditions": [{"arg": "amont", "op": ">", "value": 5}]}, "conditions",
     "'amont' is not an argument of issue_refund"),
    ({"conditions": [{"arg": "order_id", "op": ">", "value": 5}]}, "conditions",
     '">" compares numbers'),
    ({"tool": "issue_refunds"}, "tool", "no tool is named 'issue_refunds'"),
    ({"risk_class": "financal"}, "risk_class", "'financal' is not a risk class"),
    ({"required_approvals": 3}, "required_approvals", "has 2 active people"),
])
def test_it_refuses_a_policy_version_that_could_not_work(admin_client: Client,
                                                         values: dict[str, Any], field: str,
                                                         expected: str) -> None:
    current = Policy.objects.get(slug="refund-over-100").current_version_id
    before = (PolicyVersion.objects.count(), chain_length())
    post_refused(admin_client, f"{ADMIN}approvals/policyversion/add/",
                 _policy_data(**values), field, expected)
    assert (PolicyVersion.objects.count(), chain_length()) == before
    assert Policy.objects.get(slug="refund-over-100").current_version_id == current


def test_it_publishes_a_policy_version_that_works(admin_client: Client) -> None:
    before = chain_length()
    response = admin_client.post(f"{ADMIN}approvals/policyversion/add/", _policy_data(
        conditions=[{"arg": "amount", "op": ">", "value": 500},
                                  {"arg": "order_id", "op": "in", "value": ["ORD-1", "ORD-2"]}],
        required_approvals=2))
    assert response.status_code == 302, form_errors(response)
    version = Policy.objects.get(slug="refund-over-100").current_version
    assert version.required_approvals == 2
    assert chain_length() == before + 1
    assert policy_match(tool="issue_refund", risk_class="financial",
                        arguments={"amount": 600, "order_id": "ORD-2"}) is not None


def test_it_keeps_publishing_changes_to_current_version_only(admin_client: Client) -> None:
    policy = Policy.objects.get(slug="refund-over-100")
    path = f"{ADMIN}approvals/policy/{policy.pk}/change/"
    form = admin_client.get(path).context["adminform"].form
    assert "current_version" not in form.fields


# --- model validation, the same rules ---------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("input_schema", [1, 2], "must be a JSON Schema object"),
    ("input_schema", {"type": "bogus"}, "is not a valid JSON Schema"),
    ("rate_limit", "banana", '"10/minute"'),
    ("timeout_s", float("inf"), "above 0"),
    ("timeout_s", float("nan"), "above 0"),
    ("implementation", "nope", "is not a registered tool"),
])
def test_full_clean_refuses_the_same_tools(demo: None, field: str, value: Any,
                                           expected: str) -> None:
    tool = Tool.objects.get(slug="lookup_order")
    tool.full_clean()
    setattr(tool, field, value)
    with pytest.raises(ValidationError) as caught:
        tool.full_clean()
    assert expected in " ".join(caught.value.message_dict[field])


@pytest.mark.parametrize("provider, params, expected", [
    ("scripted", [1], "must be a JSON object"),
    ("scripted", {"script": []}, "script must be a non-empty list"),
    ("openai", {"temperature": "hot"}, "temperature must be a number"),
    ("openai", {"max_tokens": 1.5}, "max_tokens must be a whole number"),
])
def test_full_clean_refuses_the_same_agents(demo: None, provider: str, params: Any,
                                            expected: str) -> None:
    agent = Agent.objects.get(slug="frontdesk")
    agent.full_clean()
    agent.provider, agent.model_name, agent.model_params = provider, "m", params
    with pytest.raises(ValidationError) as caught:
        agent.full_clean()
    assert expected in " ".join(caught.value.message_dict["model_params"])


def test_full_clean_checks_only_the_fields_it_is_asked_to(demo: None) -> None:
    tool = Tool.objects.get(slug="lookup_order")
    tool.rate_limit = "banana"
    tool.full_clean(exclude=["rate_limit"])
    with pytest.raises(ValidationError):
        tool.full_clean()


@pytest.mark.parametrize("fields, where", [
    ({"required_approvals": 0}, "required_approvals"),
    ({"conditions": [{"value": "x"}]}, "conditions"),
    ({"conditions": {"value": "x"}}, "conditions"),
])
def test_full_clean_and_publishing_refuse_the_same_policies(demo: None, fields: dict[str, Any],
                                                            where: str) -> None:
    policy = Policy.objects.get(slug="refund-over-100")
    current = policy.current_version
    values = {"tool": current.tool, "risk_class": current.risk_class,
              "conditions": current.conditions, "decider_group": current.decider_group,
              "required_approvals": 1, "deadline_minutes": 60, "on_expiry": "reject",
              "escalation_group": None, **fields}
    with pytest.raises(ValidationError) as caught:
        PolicyVersion(policy=policy, number=99, **values).full_clean()
    assert where in caught.value.message_dict
    before = (PolicyVersion.objects.count(), chain_length())
    with pytest.raises(ApprovalError, match=where):
        policy_publish(policy=policy, **values)
    assert (PolicyVersion.objects.count(), chain_length()) == before


def test_the_shipped_configuration_passes_its_own_checks(demo: None) -> None:
    for model in (Tool, Agent, ModelPrice, PolicyVersion):
        for obj in model.objects.all():
            obj.full_clean()


def test_model_params_are_checked_per_provider() -> None:
    assert check_model_params("scripted", {"script": [{"text": "ok"}], "max_tokens": 10}) == []
    assert check_model_params("anthropic", {"temperature": 1, "top_p": 0.9}) == []
    assert check_model_params("openai", {"temperature": 1.5}) == []
    assert check_model_params("anthropic", {"temperature": 1.5}) != []
    assert check_model_params("scripted", {"script": [{"text": "ok"}], "temperature": 1}) != []
    assert check_model_params("nope", {}) == ["unknown provider 'nope': one of scripted, openai, "
                                             "anthropic"]


def test_the_matcher_reads_conditions_with_the_same_parser() -> None:
    amount = conditions.parse({"arg": "order.amount", "op": ">=", "value": 100})
    assert amount.holds({"order": {"amount": 100}})
    assert not amount.holds({"order": {"amount": 99}})
    assert not amount.holds({"order": {"amount": "a lot"}})
    assert not amount.holds({"amount": 500})
    assert set(conditions.OPS) == {">", ">=", "<", "<=", "==", "!=", "in"}
    # A condition written to the database around the checks makes its policy ask a person.
    assert conditions.holds({"value": "x"}, {"amount": 1})


def test_a_policy_written_around_the_checks_asks_rather_than_lets_calls_through(
        demo: None) -> None:
    policy = Policy.objects.get(slug="refund-over-100")
    PolicyVersion.objects.filter(pk=policy.current_version_id).update(
        conditions=[{"value": "x"}])
    match = policy_match(tool="issue_refund", risk_class="financial", arguments={"amount": 1})
    assert match is not None and match.policy_id == policy.pk


def test_configuration_error_is_an_escalation_reason(demo: None, vendor_input: dict) -> None:
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=vendor_input, user=User.objects.get(username="operator"))
    request = request_open(run_id=run.pk, task_key="t", reason=Reason.CONFIGURATION_ERROR,
                           requested_by="system", detail="tool x has a broken schema")
    request.full_clean()
    assert ApprovalRequest.objects.get(pk=request.pk).reason == "configuration_error"


# --- what the runtime records cannot be deleted or edited -------------------------------------


@pytest.fixture
def records(demo: None, vendor_input: dict) -> dict[str, Any]:
    operator = User.objects.get(username="operator")
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=vendor_input, user=operator)
    task = Task.objects.filter(run=run).first() or Task.objects.create(
        run=run, key="validate", executor_type="tool", executor_ref="validate_vendor")
    request = request_open(run_id=run.pk, task_key=task.key, reason=Reason.BUDGET_EXHAUSTED,
                           requested_by="system")
    event = Event.objects.filter(chain=run.pk).first()
    return {"orchestration/run": run, "approvals/approvalrequest": request,
            "audit/event": event, "task": task}


RECORDS = ["orchestration/run", "approvals/approvalrequest", "audit/event"]


@pytest.mark.parametrize("model", RECORDS)
def test_it_refuses_to_delete_runtime_records(admin_client: Client, records: dict[str, Any],
                                              model: str) -> None:
    obj = records[model]
    path = f"{ADMIN}{model}/{obj.pk}/delete/"
    assert admin_client.get(path).status_code == 403
    assert admin_client.post(path, {"post": "yes"}).status_code == 403
    assert type(obj).objects.filter(pk=obj.pk).exists()


@pytest.mark.parametrize("model", RECORDS)
def test_it_offers_no_bulk_delete_of_runtime_records(admin_client: Client,
                                                     records: dict[str, Any],
                                                     model: str) -> None:
    obj = records[model]
    listing = admin_client.get(f"{ADMIN}{model}/")
    assert listing.status_code == 200
    choices = dict(listing.context["action_form"].fields["action"].choices) if listing.context[
        "action_form"] else {}
    assert "delete_selected" not in choices
    admin_client.post(f"{ADMIN}{model}/", {"action": "delete_selected",
                                           "_selected_action": [str(obj.pk)], "post": "yes"})
    assert type(obj).objects.filter(pk=obj.pk).exists()


@pytest.mark.parametrize("model", RECORDS)
def test_it_shows_runtime_records_without_letting_them_be_edited(
        admin_client: Client, records: dict[str, Any], model: str) -> None:
    obj = records[model]
    path = f"{ADMIN}{model}/{obj.pk}/change/"
    assert admin_client.get(path).status_code == 200
    assert admin_client.post(path, {}).status_code == 403
    assert admin_client.get(f"{ADMIN}{model}/add/").status_code == 403


def test_tasks_have_no_admin_of_their_own_and_stay_with_their_run(
        admin_client: Client, records: dict[str, Any]) -> None:
    task = records["task"]
    assert admin_client.get(f"{ADMIN}orchestration/task/{task.pk}/delete/").status_code == 404
    run = records["orchestration/run"]
    response = admin_client.post(f"{ADMIN}orchestration/run/{run.pk}/change/", {
        "tasks-TOTAL_FORMS": 1, "tasks-INITIAL_FORMS": 1, "tasks-0-id": str(task.pk),
        "tasks-0-DELETE": "on"})
    assert response.status_code == 403
    assert Task.objects.filter(pk=task.pk).exists()


def test_agents_are_retired_not_deleted(admin_client: Client) -> None:
    agent = Agent.objects.get(slug="frontdesk")
    assert admin_client.get(f"{ADMIN}orchestration/agent/{agent.pk}/delete/").status_code == 403
    listing = admin_client.get(f"{ADMIN}orchestration/agent/")
    choices = dict(listing.context["action_form"].fields["action"].choices)
    assert "retire" in choices and "delete_selected" not in choices
    assert Agent.objects.filter(pk=agent.pk).exists()


def test_deleting_a_tool_is_on_the_configuration_chain(admin_client: Client) -> None:
    tools = list(Tool.objects.filter(slug__in=["run_python", "notify_procurement"]))
    response = admin_client.post(f"{ADMIN}orchestration/tool/", {
        "action": "delete_selected", "_selected_action": [str(t.pk) for t in tools],
        "post": "yes"})
    assert response.status_code == 302
    assert not Tool.objects.filter(pk__in=[t.pk for t in tools]).exists()
    deleted = Event.objects.filter(chain=CONFIG_CHAIN, kind="config.tool.delete")
    assert sorted(e.data["object"] for e in deleted) == ["notify_procurement", "run_python"]
    assert {e.actor for e in deleted} == {"user:admin"}
