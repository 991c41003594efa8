"""Input hygiene: values no row or ledger event can hold (NaN, Infinity, out-of-range numbers, NUL,
lone surrogates, deep nesting) and budget raises a run cannot apply are refused with 400 and a
message naming what and where, on the API and the page forms alike, and nothing is written."""

from __future__ import annotations

import html
import json
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from approvals.models import ApprovalRequest, Decision
from audit import hygiene
from audit.models import Event
from console.models import ApiToken
from orchestration import services
from orchestration.models import Process, Run, Task
from tests.test_approvals import _open_request


def _counts() -> tuple[int, int, int, int]:
    return (Run.objects.count(), Task.objects.count(), Decision.objects.count(),
            Event.objects.count())


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _refund_input(**raw: str) -> str:
    """The refund process's input as JSON text, with fields given as raw JSON text (so that
    NaN, escapes and nesting reach the server exactly as written)."""
    fields = {"order_id": '"ORD-1042"', "amount": "500", "reason": '"damaged"',
              "customer_email": '"kim@example.com"', **raw}
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" if not k.startswith('"') else f"{k}: {v}"
                           for k, v in fields.items()) + "}"


# (id, input JSON text, what the message says, where it says it is)
BAD_INPUTS = [
    ("nan", _refund_input(amount="NaN"), "NaN is not allowed", "input/amount"),
    ("infinity", _refund_input(amount="Infinity"), "Infinity", "input/amount"),
    ("minus-infinity", _refund_input(amount="-Infinity"), "Infinity", "input/amount"),
    ("overflowing-literal", _refund_input(amount="1E+999999999"), "Infinity", "input/amount"),
    ("out-of-range", _refund_input(amount="9007199254740992"), "out of range", "input/amount"),
    ("surrogate-in-value", _refund_input(reason='"a\\ud800b"'), "lone surrogate (\\ud800)",
     "input/reason"),
    ("surrogate-in-key", _refund_input(**{'"\\udfffx"': "1"}), "lone surrogate (\\udfff)",
     "input/\\udfffx"),
    ("nul-in-value", _refund_input(reason='"a\\u0000b"'), "NUL character", "input/reason"),
    ("nul-in-key", _refund_input(**{'"x\\u0000"': "1"}), "NUL character", "input/x\\u0000"),
    ("deep", _refund_input(reason=_deep(65)), "deeper than 64 levels", "input/reason/0"),
]


# --- the checker --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    {"a": [1, 2.5, "text", None, True, {"b": "ü😀"}]},
    2**53 - 1, -(2**53 - 1), 1e-300, Decimal("12.5"), "",
    json.loads(_deep(64)),
], ids=["nested", "max", "min", "tiny", "decimal", "empty", "64-deep"])
def test_it_accepts_values_every_store_holds(value: Any) -> None:
    hygiene.check(value, "input")


@pytest.mark.parametrize("value, problem, path", [
    (float("nan"), "NaN", "v"),
    ({"a": [1, float("inf")]}, "Infinity", "v/a/1"),
    (Decimal("NaN"), "NaN", "v"),
    (Decimal("-Infinity"), "Infinity", "v"),
    (Decimal("1E+999999999"), "out of range", "v"),
    (-(2**53), "out of range", "v"),
    (10**5000, "out of range", "v"),
    ({"a/b~": "\x00"}, "NUL", "v/a~1b~0"),
    (["\ud800"], "lone surrogate (\\ud800)", "v/0"),
    ({"\x00": 1}, "NUL", "v/\\u0000"),
    (json.loads(_deep(65)), "deeper than 64", "v/0/0"),
], ids=["nan", "inf", "decimal-nan", "decimal-inf", "decimal-huge", "int-low", "int-huge",
        "nul-escaped-pointer", "surrogate", "nul-key", "deep"])
def test_it_refuses_a_bad_value_and_says_where(value: Any, problem: str, path: str) -> None:
    with pytest.raises(hygiene.Refused) as refused:
        hygiene.check(value, "v")
    assert problem in str(refused.value)
    assert refused.value.path.startswith(path)


@pytest.mark.parametrize("text, problem", [
    (_deep(100_000), "deeper than 64"),
    ("1" * 5000, "out of range"),
    (b'"\xff"', "not valid UTF-8"),
    ("[NaN]", "NaN"),
], ids=["100000-deep", "5000-digits", "bad-utf8", "nan-literal"])
def test_it_parses_strictly(text: Any, problem: str) -> None:
    with pytest.raises(hygiene.Refused, match=problem):
        hygiene.loads(text, "input")


def test_it_leaves_syntax_errors_to_the_caller() -> None:
    with pytest.raises(json.JSONDecodeError):
        hygiene.loads('{"a": ', "input")


# --- the API --------------------------------------------------------------------------------


def _api(client: Client, user: User) -> Any:
    token = ApiToken.issue(user)[1]

    def post(path: str, body: str) -> Any:
        return client.post(path, data=body, content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")

    return post


def _assert_refused_by_api(response: Any, *fragments: str) -> None:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    for fragment in fragments:
        assert fragment in error, error


@pytest.mark.django_db
@pytest.mark.parametrize("text, problem, path", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_it_refuses_a_bad_run_input_on_the_api(client: Client, people: dict, text: str,
                                               problem: str, path: str) -> None:
    post = _api(client, people["operator"])
    before = _counts()
    response = post("/api/v1/runs", f'{{"process": "refund-exception", "input": {text}}}')
    _assert_refused_by_api(response, problem, f"at {path}")
    assert _counts() == before


@pytest.mark.django_db
@pytest.mark.parametrize("process", ['"refund\\u0000"', '"refund\\ud800"'],
                         ids=["nul", "surrogate"])
def test_it_refuses_a_bad_process_name_on_the_api(client: Client, people: dict,
                                                  process: str) -> None:
    post = _api(client, people["operator"])
    before = _counts()
    response = post("/api/v1/runs", f'{{"process": {process}, "input": {{}}}}')
    assert response.status_code == 400, response.content
    assert _counts() == before


@pytest.mark.django_db
def test_it_refuses_100000_deep_json_on_the_api(client: Client, people: dict) -> None:
    post = _api(client, people["operator"])
    before = _counts()
    response = post("/api/v1/runs", f'{{"process": "refund-exception", "input": '
                                    f'{{"reason": {_deep(100_000)}}}}}')
    _assert_refused_by_api(response, "invalid request")
    assert _counts() == before


# (id, decision body as JSON text, what the message says)
BAD_DECISIONS = [
    ("edit-nan", '{"decision": "edit", "arguments": {"order_id": "ORD-1042", "amount": NaN}}',
     "NaN is not allowed at arguments/amount"),
    ("edit-infinity", '{"decision": "edit", "arguments": {"order_id": "ORD-1042", '
                      '"amount": Infinity}}', "Infinity"),
    ("edit-overflow", '{"decision": "edit", "arguments": {"order_id": "ORD-1042", '
                      '"amount": 1e999}}', "at arguments/amount"),
    ("edit-surrogate", '{"decision": "edit", "arguments": {"order_id": "\\ud800", '
                       '"amount": 80}}',
     "lone surrogate (\\ud800) in a string is not allowed at arguments/order_id"),
    ("edit-nul-key", '{"decision": "edit", "arguments": {"order_id": "ORD-1042", '
                     '"amount": 80, "\\u0000": 1}}',
     "NUL character (\\u0000) in a key is not allowed at arguments/\\u0000"),
    ("edit-deep", '{"decision": "edit", "arguments": {"order_id": ' + _deep(65) + "}}",
     "deeper than 64 levels"),
    ("cost-infinity-string", '{"decision": "raise_budget", "budget": {"cost": "Infinity"}}',
     "finite"),
    ("cost-minus-infinity", '{"decision": "raise_budget", "budget": {"cost": "-Infinity"}}',
     "finite"),
    ("cost-nan-string", '{"decision": "raise_budget", "budget": {"cost": "NaN"}}', "finite"),
    ("cost-snan-string", '{"decision": "raise_budget", "budget": {"cost": "sNaN"}}', "finite"),
    ("cost-huge-string", '{"decision": "raise_budget", "budget": {"cost": "1E+999999999"}}',
     "at most 10000"),
    ("cost-nan", '{"decision": "raise_budget", "budget": {"cost": NaN}}',
     "NaN is not allowed at budget/cost"),
    ("cost-overflow", '{"decision": "raise_budget", "budget": {"cost": 1e999}}',
     "at budget/cost"),
    ("cost-too-precise", '{"decision": "raise_budget", "budget": {"cost": "0.0000001"}}',
     "6 decimal places"),
    ("cost-negative", '{"decision": "raise_budget", "budget": {"cost": "-5"}}', "positive"),
    ("cost-bool", '{"decision": "raise_budget", "budget": {"cost": true}}', "decimal amount"),
    ("tokens-nan", '{"decision": "raise_budget", "budget": {"tokens": NaN}}',
     "NaN is not allowed at budget/tokens"),
    ("tokens-fraction", '{"decision": "raise_budget", "budget": {"tokens": 1.5}}',
     "positive integer"),
    ("tokens-over-ceiling", '{"decision": "raise_budget", "budget": {"tokens": 10000001}}',
     "at most 10000000"),
    ("steps-over-ceiling", '{"decision": "raise_budget", "budget": {"steps": 1001}}',
     "at most 1000"),
    ("wall-over-ceiling", '{"decision": "raise_budget", "budget": {"wall_s": 86401}}',
     "at most 86400"),
    ("note-nul", '{"decision": "approve", "note": "ok\\u0000"}',
     "NUL character (\\u0000) in a string is not allowed at note"),
    # A typed string field: the schema refuses it first, in its own words.
    ("note-surrogate", '{"decision": "reject", "note": "\\udc00"}',
     "note: Input should be a valid string"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("body, problem", [c[1:] for c in BAD_DECISIONS],
                         ids=[c[0] for c in BAD_DECISIONS])
def test_it_refuses_a_bad_decision_on_the_api(client: Client, people: dict, body: str,
                                              problem: str) -> None:
    # A raise is only for a spent budget; the other decisions are about a proposed action.
    reason = "budget_exhausted" if "raise_budget" in body else "sensitive_action"
    request = _open_request(people["operator"], reason=reason)
    post = _api(client, people["reviewer"])
    before = _counts()
    response = post(f"/api/v1/approvals/{request.pk}/decision", body)
    _assert_refused_by_api(response, problem)
    assert _counts() == before
    request.refresh_from_db()
    assert request.status == ApprovalRequest.Status.PENDING


@pytest.mark.django_db
@pytest.mark.parametrize("budget", [{"cost": "10000", "tokens": 10_000_000},
                                    {"cost": 0.5, "steps": 1000}, {"cost": "0.000001"}],
                         ids=["at-the-ceilings", "float-cost", "finest-cost"])
def test_it_accepts_a_raise_up_to_the_ceilings(client: Client, people: dict,
                                               budget: dict[str, Any]) -> None:
    request = _open_request(people["operator"], reason="budget_exhausted")
    post = _api(client, people["reviewer"])
    response = post(f"/api/v1/approvals/{request.pk}/decision",
                    json.dumps({"decision": "raise_budget", "budget": budget}))
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "budget_raised"


@pytest.mark.django_db
@pytest.mark.parametrize("reason", ["sensitive_action", "quota_exhausted", "low_confidence"])
def test_it_refuses_a_raise_for_a_request_a_budget_does_not_help(client: Client, people: dict,
                                                                 reason: str) -> None:
    """The API holds the same rule as the review page: a raise answers only a spent budget,
    so it can never stand in for the approval of a proposed action."""
    request = _open_request(people["operator"], reason=reason)
    before = _counts()
    refused = _api(client, people["reviewer"])(
        f"/api/v1/approvals/{request.pk}/decision",
        '{"decision": "raise_budget", "budget": {"tokens": 100}}')
    _assert_refused_by_api(refused, "raising the budget does not help")
    assert _counts() == before
    request.refresh_from_db()
    assert request.status == ApprovalRequest.Status.PENDING


@pytest.mark.django_db
def test_it_takes_the_raise_ceiling_from_the_settings(client: Client, people: dict,
                                                      settings: Any) -> None:
    settings.SWITCHBOARD_MAX_BUDGET_RAISE_TOKENS = 100
    request = _open_request(people["operator"], reason="step_budget_exhausted")
    post = _api(client, people["reviewer"])
    path = f"/api/v1/approvals/{request.pk}/decision"
    refused = post(path, '{"decision": "raise_budget", "budget": {"tokens": 101}}')
    _assert_refused_by_api(refused, "at most 100 at once")
    assert post(path, '{"decision": "raise_budget", "budget": {"tokens": 100}}'
                ).status_code == 200


@pytest.mark.django_db
def test_it_refuses_to_fork_a_run_whose_input_holds_a_bad_value(people: dict) -> None:
    # A run stored before these checks existed: a fork starts from its input, so it is
    # checked again rather than carried into a new run.
    run = services.run_create(process=Process.objects.get(slug="refund-exception"),
                              input={"order_id": "ORD-1042", "amount": 500, "reason": "damaged",
                                     "customer_email": "kim@example.com"},
                              user=people["operator"])
    run.input["amount"] = float("nan")
    before = _counts()
    with pytest.raises(services.RunInputInvalid, match="NaN is not allowed at input/amount"):
        services.run_fork(run=run, step=1, user=people["operator"])
    assert _counts() == before


# --- the page forms -------------------------------------------------------------------------


def _signed_in(client: Client, user: User) -> Client:
    client.force_login(user)
    return client


def _assert_refused_on_page(response: Any, *fragments: str) -> None:
    assert response.status_code == 400, response.content[:500]
    page = response.content.decode()
    assert 'role="alert"' in page
    for fragment in fragments:
        assert html.escape(fragment) in page, fragment


PAGE_INPUTS = [*BAD_INPUTS,
               ("100000-deep", _refund_input(reason=_deep(100_000)), "deeper than 64 levels",
                "input"),
               ("5000-digits", _refund_input(amount="1" * 5000), "out of range", "input")]


@pytest.mark.django_db
@pytest.mark.parametrize("text, problem, path", [c[1:] for c in PAGE_INPUTS],
                         ids=[c[0] for c in PAGE_INPUTS])
def test_it_refuses_a_bad_run_input_on_the_start_form(client: Client, people: dict, text: str,
                                                      problem: str, path: str) -> None:
    page = _signed_in(client, people["operator"])
    before = _counts()
    response = page.post("/runs/start", {"process": "refund-exception", "input": text})
    _assert_refused_on_page(response, "Input refused", problem, f"at {path}")
    assert _counts() == before


@pytest.mark.django_db
def test_it_answers_404_for_a_process_name_with_a_nul(client: Client, people: dict) -> None:
    page = _signed_in(client, people["operator"])
    before = _counts()
    response = page.post("/runs/start", {"process": "refund\x00", "input": "{}"})
    assert response.status_code == 404
    assert _counts() == before


def _edit(arguments: str) -> dict[str, str]:
    return {"decision": "edit", "arguments": arguments}


def _raise(**fields: str) -> dict[str, str]:
    return {"decision": "raise_budget", **fields}


# (id, form fields, what the message says)
BAD_FORMS = [
    ("edit-nan", _edit('{"order_id": "ORD-1042", "amount": NaN}'),
     "NaN is not allowed at arguments/amount"),
    ("edit-infinity", _edit('{"order_id": "ORD-1042", "amount": -Infinity}'), "Infinity"),
    ("edit-overflow", _edit('{"order_id": "ORD-1042", "amount": 1E+999999999}'),
     "at arguments/amount"),
    ("edit-surrogate", _edit('{"order_id": "\\ud800", "amount": 80}'),
     "lone surrogate (\\ud800) in a string is not allowed at arguments/order_id"),
    ("edit-nul", _edit('{"order_id": "ORD\\u0000", "amount": 80}'),
     "NUL character (\\u0000) in a string is not allowed at arguments/order_id"),
    ("edit-deep", _edit('{"order_id": ' + _deep(65) + "}"), "deeper than 64 levels"),
    ("edit-100000-deep", _edit(_deep(100_000)),
     "deeper than 64 levels is not allowed at arguments"),
    ("edit-5000-digits", _edit('{"amount": ' + "9" * 5000 + "}"), "out of range"),
    ("cost-infinity", _raise(cost="Infinity"), "finite"),
    ("cost-nan", _raise(cost="NaN"), "finite"),
    ("cost-snan", _raise(cost="sNaN"), "finite"),
    ("cost-huge", _raise(cost="1E+999999999"), "at most 10000"),
    ("cost-too-precise", _raise(cost="0.0000001"), "6 decimal places"),
    ("cost-zero", _raise(cost="0"), "positive"),
    ("tokens-superscript", _raise(tokens="\u00b2"), "whole number"),
    ("tokens-5000-digits", _raise(tokens="9" * 5000), "out of range"),
    ("tokens-over-ceiling", _raise(tokens="10000001"), "at most 10000000"),
    ("steps-over-ceiling", _raise(steps="1001"), "at most 1000"),
    ("note-nul", {"decision": "approve", "note": "fine\x00"},
     "NUL character (\\u0000) in a string is not allowed at note"),
]


def _spent_budget_request(starter: User) -> ApprovalRequest:
    """A run's spent budget waiting on a reviewer: the review form offers a raise only here."""
    from approvals import services as approvals

    run = _open_request(starter).run_id
    return approvals.request_open(run_id=run, task_key="refund", reason="budget_exhausted",
                                  requested_by="system", run_started_by=starter)


@pytest.mark.django_db
@pytest.mark.parametrize("form, problem", [c[1:] for c in BAD_FORMS],
                         ids=[c[0] for c in BAD_FORMS])
def test_it_refuses_a_bad_decision_on_the_review_form(client: Client, people: dict,
                                                      form: dict[str, str], problem: str) -> None:
    request = (_spent_budget_request(people["operator"]) if form["decision"] == "raise_budget"
               else _open_request(people["operator"]))
    page = _signed_in(client, people["reviewer"])
    before = _counts()
    response = page.post(f"/review/{request.pk}/decide",
                         {**form, "arguments_digest": request.arguments_digest})
    _assert_refused_on_page(response, problem)
    assert _counts() == before
    request.refresh_from_db()
    assert request.status == ApprovalRequest.Status.PENDING


@pytest.mark.django_db
def test_it_records_a_raise_within_the_ceilings_from_the_review_form(client: Client,
                                                                     people: dict) -> None:
    request = _spent_budget_request(people["operator"])
    page = _signed_in(client, people["reviewer"])
    response = page.post(f"/review/{request.pk}/decide", {
        **_raise(tokens="10000000", steps="1000", cost="10000"),
        "arguments_digest": request.arguments_digest})
    assert response.status_code == 302
    request.refresh_from_db()
    assert request.status == ApprovalRequest.Status.BUDGET_RAISED
    assert request.decisions.get().budget == {"tokens": 10_000_000, "steps": 1000,
                                              "cost": "10000"}


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["\x00", "nonsense"], ids=["nul", "unknown"])
def test_it_refuses_an_unknown_status_filter_on_the_approvals_list(client: Client, people: dict,
                                                                   status: str) -> None:
    # A NUL in the filter used to reach PostgreSQL, which cannot compare it: a 500.
    request = _open_request(people["operator"])
    bearer = {"HTTP_AUTHORIZATION": f"Bearer {ApiToken.issue(people['reviewer'])[1]}"}
    response = client.get("/api/v1/approvals", {"status": status}, **bearer)
    _assert_refused_by_api(response, "invalid request: status")
    listed = client.get("/api/v1/approvals", {"status": "pending"}, **bearer)
    assert [r["id"] for r in listed.json()] == [str(request.pk)]
