"""Idempotency-Key on the API's actions, JSON errors with a request id, 503 when a dependency
is down."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import kombu.exceptions
import pytest
from django.contrib.auth.models import User
from django.db import OperationalError, close_old_connections, connection
from django.test import Client
from django.utils import timezone
from guardian.shortcuts import assign_perm

from approvals import services as approvals
from approvals.models import ApprovalRequest, Decision
from audit.models import Event
from console.idempotency import idempotency_keys_purge
from console.models import ApiToken, IdempotencyKey
from orchestration import services
from orchestration.models import Process, Run, Tool

RUNS = "/api/v1/runs"
REFUND = {"order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com"}



def _post(client: Client, token: str, path: str, body: Any, key: str | None = None,
          **headers: str) -> Any:
    if key is not None:
        headers["HTTP_IDEMPOTENCY_KEY"] = key
    return client.post(path, data=json.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {token}", **headers)


def _created_events() -> int:
    return Event.objects.filter(kind="run.created").count()


def _vendor_run(vendor_input: dict[str, str]) -> dict[str, Any]:
    return {"process": "vendor-onboarding", "input": vendor_input}


# --- starting runs --------------------------------------------------------------------------


def test_it_replays_a_retry_with_the_same_key(client: Client, api_token: str,
                                              vendor_input: dict[str, str]) -> None:
    first = _post(client, api_token, RUNS, _vendor_run(vendor_input), key="order-7-start")
    assert first.status_code == 201, first.content
    runs, events = Run.objects.count(), _created_events()

    again = _post(client, api_token, RUNS, _vendor_run(vendor_input), key="order-7-start")
    assert again.status_code == 201
    assert again.content == first.content
    assert again["Content-Type"] == first["Content-Type"]
    assert again["Idempotent-Replayed"] == "true"
    assert not first.has_header("Idempotent-Replayed")
    assert (Run.objects.count(), _created_events()) == (runs, events) == (1, 1)
    assert IdempotencyKey.objects.get().response_status == 201


def test_it_treats_a_reserialised_body_as_the_same_request(client: Client, api_token: str,
                                                           vendor_input: dict[str, str]) -> None:
    body = _vendor_run(vendor_input)
    first = _post(client, api_token, RUNS, body, key="k1")
    # Same JSON, other key order and spacing, as a client library may send it on retry.
    reordered = json.dumps({"input": dict(reversed(list(vendor_input.items()))),
                            "process": "vendor-onboarding"}, indent=2)
    again = client.post(RUNS, data=reordered, content_type="application/json",
                        HTTP_AUTHORIZATION=f"Bearer {api_token}", HTTP_IDEMPOTENCY_KEY="k1")
    assert again.status_code == 201
    assert again.content == first.content
    assert Run.objects.count() == 1


def test_it_refuses_a_key_reused_with_another_body(client: Client, api_token: str,
                                                   vendor_input: dict[str, str]) -> None:
    assert _post(client, api_token, RUNS, _vendor_run(vendor_input), key="k1").status_code == 201
    other = _post(client, api_token, RUNS,
                  _vendor_run({**vendor_input, "name": "Contoso"}), key="k1")
    assert other.status_code == 422
    assert set(other.json()) == {"error"}
    assert "different request" in other.json()["error"]
    assert Run.objects.count() == 1


def test_it_refuses_a_key_reused_on_another_path(client: Client, api_token: str,
                                                 vendor_input: dict[str, str]) -> None:
    assert _post(client, api_token, RUNS, _vendor_run(vendor_input), key="k1").status_code == 201
    decisions = Decision.objects.count()
    other = _post(client, api_token, f"/api/v1/approvals/{uuid.uuid4()}/decision",
                  {"decision": "approve"}, key="k1")
    assert other.status_code == 422
    assert Decision.objects.count() == decisions


def test_it_starts_a_run_for_each_request_without_a_key(client: Client, api_token: str,
                                                        vendor_input: dict[str, str]) -> None:
    for _ in range(2):
        assert _post(client, api_token, RUNS, _vendor_run(vendor_input)).status_code == 201
    assert Run.objects.count() == 2
    assert _created_events() == 2
    assert IdempotencyKey.objects.count() == 0


def test_it_keeps_keys_apart_per_user(client: Client, api_token: str, people: dict[str, User],
                                      vendor_input: dict[str, str]) -> None:
    other_token = ApiToken.issue(people["admin"])[1]
    mine = _post(client, api_token, RUNS, _vendor_run(vendor_input), key="shared")
    theirs = _post(client, other_token, RUNS, _vendor_run(vendor_input), key="shared")
    assert (mine.status_code, theirs.status_code) == (201, 201), theirs.content
    assert mine.json()["id"] != theirs.json()["id"]
    assert Run.objects.count() == 2


@pytest.mark.parametrize("key", ["", "x" * 201, "tab\there", "naïve"])
def test_it_refuses_an_invalid_key(client: Client, api_token: str,
                                   vendor_input: dict[str, str], key: str) -> None:
    response = client.post(RUNS, data=json.dumps(_vendor_run(vendor_input)),
                           content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {api_token}",
                           headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.content
    assert "Idempotency-Key" in response.json()["error"]
    assert Run.objects.count() == 0
    assert IdempotencyKey.objects.count() == 0


def test_it_accepts_a_key_of_200_printable_characters(client: Client, api_token: str,
                                                      vendor_input: dict[str, str]) -> None:
    key = "k ~" + "x" * 197
    assert _post(client, api_token, RUNS, _vendor_run(vendor_input), key=key).status_code == 201
    assert IdempotencyKey.objects.get().key == key


def test_it_does_not_keep_client_errors(client: Client, api_token: str,
                                        vendor_input: dict[str, str]) -> None:
    bad = _post(client, api_token, RUNS, {"process": "no-such-process"}, key="k1")
    assert bad.status_code == 400
    assert IdempotencyKey.objects.count() == 0
    # The client fixes its request and sends it again under the same key.
    fixed = _post(client, api_token, RUNS, _vendor_run(vendor_input), key="k1")
    assert fixed.status_code == 201, fixed.content
    assert Run.objects.count() == 1


def test_it_forgets_keys_after_a_day(client: Client, api_token: str,
                                     vendor_input: dict[str, str]) -> None:
    first = _post(client, api_token, RUNS, _vendor_run(vendor_input), key="k1")
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(hours=25))
    again = _post(client, api_token, RUNS, _vendor_run(vendor_input), key="k1")
    assert again.status_code == 201
    assert again.json()["id"] != first.json()["id"]
    assert Run.objects.count() == 2
    assert IdempotencyKey.objects.count() == 1


def test_it_purges_expired_keys(operator: User, people: dict[str, User]) -> None:
    now = timezone.now()
    for user, key, age in [(operator, "old", 25), (people["admin"], "old", 30),
                           (operator, "fresh", 23)]:
        row = IdempotencyKey.objects.create(user=user, key=key, request_digest="0" * 64)
        IdempotencyKey.objects.filter(pk=row.pk).update(created_at=now - timedelta(hours=age))
    assert idempotency_keys_purge() == 2
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["fresh"]


def test_it_rolls_back_the_key_with_a_failed_action(client: Client, api_token: str,
                                                    vendor_input: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(**kwargs: Any) -> Run:
        raise RuntimeError("boom")

    monkeypatch.setattr(services, "run_create", crash)
    assert _post(client, api_token, RUNS, _vendor_run(vendor_input), key="k1").status_code == 500
    assert IdempotencyKey.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_it_acts_once_for_concurrent_requests_with_one_key(
        api_token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run_create = services.run_create
    calls: list[int] = []

    def slow_run_create(**kwargs: Any) -> Run:
        calls.append(1)
        time.sleep(0.5)  # hold the transaction open while the other request arrives
        return real_run_create(**kwargs)

    monkeypatch.setattr(services, "run_create", slow_run_create)
    # A refund that parks on its approval: whatever runs after commit stops there quickly.
    body = {"process": "refund-exception", "input": {**REFUND, "amount": 500}}
    barrier = threading.Barrier(2)
    responses: list[Any] = []

    def send() -> None:
        close_old_connections()
        try:
            barrier.wait(timeout=10)
            responses.append(_post(Client(), api_token, RUNS, body, key="concurrent"))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(responses) == 2
    assert [r.status_code for r in responses] == [201, 201], [r.content for r in responses]
    assert responses[0].content == responses[1].content
    assert sorted(r.has_header("Idempotent-Replayed") for r in responses) == [False, True]
    assert len(calls) == 1
    assert Run.objects.count() == 1
    assert _created_events() == 1
    assert IdempotencyKey.objects.count() == 1


# --- deciding approvals ---------------------------------------------------------------------


def _open_request(starter: User) -> ApprovalRequest:
    """A refund run parked on its approval; tests here never commit, so no worker runs it."""
    process = Process.objects.get(slug="refund-exception")
    assign_perm("orchestration.start_run", starter, process)
    run = services.run_create(process=process, input={**REFUND, "amount": 500}, user=starter)
    arguments = {"order_id": "ORD-1042", "amount": 500}
    return approvals.request_open(
        run_id=run.pk, task_key="refund", call_key=f"{run.pk}:refund:1:0", tool="issue_refund",
        arguments=arguments, reason="sensitive_action",
        policy_version=approvals.policy_match(tool="issue_refund", risk_class="financial",
                                              arguments=arguments),
        requested_by="agent:refund-executor", run_started_by=starter,
        context={"input_schema": Tool.objects.get(slug="issue_refund").input_schema})


def test_it_replays_a_decision_retried_with_the_same_key(client: Client,
                                                         people: dict[str, User]) -> None:
    request = _open_request(people["operator"])
    token = ApiToken.issue(people["reviewer"])[1]
    path = f"/api/v1/approvals/{request.pk}/decision"
    body = {"decision": "approve", "note": "fine",
            "arguments_digest": request.arguments_digest}

    first = _post(client, token, path, body, key="decide-1")
    assert first.status_code == 200, first.content
    assert first.json()["decisions"][0]["by"] == "reviewer"
    again = _post(client, token, path, body, key="decide-1")
    assert again.status_code == 200
    assert again.content == first.content
    assert Decision.objects.filter(request=request).count() == 1
    assert Event.objects.filter(chain=request.run_id, kind="approval.decision").count() == 1

    # Without the key the same retry is a second decision, which is refused.
    unkeyed = _post(client, token, path, body)
    assert unkeyed.status_code == 409
    different = _post(client, token, path, {**body, "decision": "reject"}, key="decide-1")
    assert different.status_code == 422
    assert Decision.objects.filter(request=request).count() == 1


def test_it_does_not_keep_a_refused_decision(client: Client, people: dict[str, User]) -> None:
    request = _open_request(people["operator"])
    token = ApiToken.issue(people["operator"])[1]  # the run's starter may not decide it
    response = _post(client, token, f"/api/v1/approvals/{request.pk}/decision",
                     {"decision": "approve"}, key="decide-1")
    assert response.status_code == 403
    assert IdempotencyKey.objects.count() == 0
    assert Decision.objects.count() == 0


# --- errors and request ids -----------------------------------------------------------------


def test_it_answers_500_in_json_with_the_request_id(client: Client, api_token: str,
                                                   vendor_input: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def crash(**kwargs: Any) -> Run:
        raise RuntimeError("secret internals 0xdeadbeef")

    monkeypatch.setattr(services, "run_create", crash)
    with caplog.at_level(logging.ERROR, logger="switchboard.api"):
        response = _post(client, api_token, RUNS, _vendor_run(vendor_input),
                         HTTP_X_REQUEST_ID="trace-4711.a")
    assert response.status_code == 500
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "request_id"}
    assert body["request_id"] == response["X-Request-ID"] == "trace-4711.a"
    assert "0xdeadbeef" not in response.content.decode()
    [record] = [r for r in caplog.records if r.name == "switchboard.api"]
    assert "trace-4711.a" in record.getMessage()
    assert record.exc_info is not None and "0xdeadbeef" in str(record.exc_info[1])


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "-leading-dash", "a\u00e9"])
def test_it_makes_its_own_request_id_for_an_unusable_one(client: Client, api_token: str,
                                                         given: str) -> None:
    response = client.get("/api/v1/processes", HTTP_AUTHORIZATION=f"Bearer {api_token}",
                          headers={"X-Request-ID": given})
    assert response.status_code == 200
    assert response["X-Request-ID"] != given
    assert uuid.UUID(hex=response["X-Request-ID"]).hex == response["X-Request-ID"]


def test_it_sets_a_request_id_on_every_response(client: Client, db: Any) -> None:
    ids = {client.get(path)["X-Request-ID"] for path in ("/login/", "/api/v1/processes",
                                                         "/api/v1/openapi.json")}
    assert len(ids) == 3


@pytest.mark.parametrize("exc", [OperationalError("could not connect to server"),
                                 kombu.exceptions.OperationalError("broker down")])
def test_it_answers_503_when_a_dependency_is_down(client: Client, api_token: str,
                                                 vendor_input: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture,
                                                 exc: Exception) -> None:
    def unavailable(**kwargs: Any) -> Run:
        raise exc

    monkeypatch.setattr(services, "run_create", unavailable)
    with caplog.at_level(logging.ERROR, logger="switchboard.api"):
        response = _post(client, api_token, RUNS, _vendor_run(vendor_input), key="k1")
    assert response.status_code == 503
    assert int(response["Retry-After"]) > 0
    body = response.json()
    assert set(body) == {"error", "request_id"}
    assert "Idempotency-Key" in body["error"]
    assert str(exc) not in body["error"]
    assert body["request_id"] == response["X-Request-ID"]
    assert any(body["request_id"] in r.getMessage() and r.exc_info for r in caplog.records)
    assert IdempotencyKey.objects.count() == 0


def test_it_answers_503_when_the_database_is_down_before_the_view(
        client: Client, api_token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(raw: str) -> Any:
        raise OperationalError("connection refused")

    monkeypatch.setattr(ApiToken, "authenticate", unavailable)
    response = client.get("/api/v1/processes", HTTP_AUTHORIZATION=f"Bearer {api_token}")
    assert response.status_code == 503
    assert response.json()["request_id"] == response["X-Request-ID"]


def test_it_answers_json_for_an_unknown_api_path(client: Client, api_token: str) -> None:
    response = client.get("/api/v1/no-such-thing", HTTP_AUTHORIZATION=f"Bearer {api_token}")
    assert response.status_code == 404
    assert response.json() == {"error": "not found"}
    assert response.has_header("X-Request-ID")


def test_it_answers_json_for_a_wrong_method(client: Client, api_token: str) -> None:
    response = client.delete(RUNS, HTTP_AUTHORIZATION=f"Bearer {api_token}")
    assert response.status_code == 405
    assert response.json() == {"error": "method not allowed"}
    assert "POST" in response["Allow"]


# --- schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/runs", "/api/v1/approvals/{request_id}/decision"])
def test_it_documents_the_idempotency_key_header(client: Client, db: Any, path: str) -> None:
    operation = client.get("/api/v1/openapi.json").json()["paths"][path]["post"]
    [header] = [p for p in operation["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key"
    assert header["required"] is False
    assert "retry" in header["description"]
    assert {"422", "503"} <= set(operation["responses"])
