"""The JSON API under /api/v1/: bearer tokens, permissions, errors that write nothing."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from audit.models import Event
from console.models import ApiToken
from orchestration import demo as demo_data
from orchestration import services
from orchestration.models import Process, ProcessVersion, Run, Task

EVENT_KEYS = {"seq", "kind", "at", "actor", "data", "hash", "prev_hash"}



def _bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def _counts() -> tuple[int, int, int]:
    return Run.objects.count(), Task.objects.count(), Event.objects.count()


@pytest.fixture
def outsider(demo: None) -> User:
    """A signed-up user with no group and no permission at all."""
    return User.objects.create_user("outsider", password="outsider-password")


@pytest.fixture
def outsider_token(outsider: User) -> str:
    return ApiToken.issue(outsider, name="outsider")[1]


def _pending_run(user: Any, vendor_input: dict[str, str]) -> Run:
    # Non-transactional tests never commit, so on_commit never enqueues the run: it stays pending.
    return services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                               input=vendor_input, user=user)


# --- authentication -------------------------------------------------------------------------


def _assert_unauthorised(response: Any) -> None:
    assert response.status_code == 401, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert response["WWW-Authenticate"] == "Bearer"


def test_it_rejects_a_request_without_a_token(client: Client, demo: None) -> None:
    _assert_unauthorised(client.get("/api/v1/processes"))


@pytest.mark.parametrize("token", ["sb_" + "x" * 43, "not-a-switchboard-token", "sb_"])
def test_it_rejects_a_wrong_token(client: Client, api_token: str, token: str) -> None:
    _assert_unauthorised(client.get("/api/v1/processes", **_bearer(token)))


def test_it_rejects_a_token_sent_with_another_scheme(client: Client, api_token: str) -> None:
    _assert_unauthorised(client.get("/api/v1/processes",
                                    HTTP_AUTHORIZATION=f"Token {api_token}"))


def test_it_rejects_a_revoked_token(client: Client, api_token: str) -> None:
    assert client.get("/api/v1/processes", **_bearer(api_token)).status_code == 200
    ApiToken.objects.update(revoked_at=timezone.now())
    _assert_unauthorised(client.get("/api/v1/processes", **_bearer(api_token)))


def test_it_rejects_an_expired_token(client: Client, operator: User) -> None:
    _, raw = ApiToken.issue(operator, expires_at=timezone.now() - timedelta(seconds=1))
    _assert_unauthorised(client.get("/api/v1/processes", **_bearer(raw)))


def test_it_accepts_a_token_that_has_not_expired_yet(client: Client, operator: User) -> None:
    _, raw = ApiToken.issue(operator, expires_at=timezone.now() + timedelta(hours=1))
    assert client.get("/api/v1/processes", **_bearer(raw)).status_code == 200


def test_it_rejects_an_inactive_users_token(client: Client, operator: User,
                                            api_token: str) -> None:
    operator.is_active = False
    operator.save(update_fields=["is_active"])
    _assert_unauthorised(client.get("/api/v1/processes", **_bearer(api_token)))


def test_it_records_when_a_token_was_last_used(client: Client, api_token: str) -> None:
    token = ApiToken.objects.get()
    assert token.last_used_at is None
    client.get("/api/v1/processes", **_bearer(api_token))
    token.refresh_from_db()
    assert token.last_used_at is not None


# --- processes ------------------------------------------------------------------------------


def test_it_lists_the_demo_processes(api: Any) -> None:
    response = api.get("/api/v1/processes")
    assert response.status_code == 200
    body = response.json()
    assert sorted(p["slug"] for p in body) == sorted(spec["slug"] for spec in demo_data.PROCESSES)
    assert len(body) == 4
    for item in body:
        assert set(item) == {"slug", "name", "pattern", "version"}
        spec = next(s for s in demo_data.PROCESSES if s["slug"] == item["slug"])
        assert item["name"] == spec["name"]
        assert item["pattern"] == spec["pattern"]
        assert item["version"] == 1


def test_it_lists_no_processes_for_a_user_who_may_start_none(client: Client,
                                                             outsider_token: str) -> None:
    response = client.get("/api/v1/processes", **_bearer(outsider_token))
    assert response.status_code == 200
    assert response.json() == []


# --- starting runs --------------------------------------------------------------------------


def test_it_starts_a_run(api: Any, vendor_input: dict[str, str]) -> None:
    before = _counts()
    response = api.post("/api/v1/runs", {"process": "vendor-onboarding", "input": vendor_input})
    assert response.status_code == 201, response.content
    body = response.json()
    run = Run.objects.get(pk=body["id"])
    assert body["process"] == "vendor-onboarding"
    assert body["input"] == vendor_input
    assert run.created_by.username == "operator"
    assert Run.objects.count() == before[0] + 1
    assert Event.objects.filter(chain=run.pk, kind="run.created").count() == 1


def test_it_refuses_an_unknown_process(api: Any, vendor_input: dict[str, str]) -> None:
    before = _counts()
    response = api.post("/api/v1/runs", {"process": "no-such-process", "input": vendor_input})
    assert response.status_code == 400
    assert "no-such-process" in response.json()["error"]
    assert _counts() == before


def test_it_refuses_input_that_fails_the_schema(api: Any, vendor_input: dict[str, str]) -> None:
    del vendor_input["iban"]
    before = _counts()
    response = api.post("/api/v1/runs", {"process": "vendor-onboarding", "input": vendor_input})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "iban" in error
    assert "required" in error
    assert _counts() == before


def test_it_refuses_a_malformed_json_body(client: Client, api_token: str) -> None:
    before = _counts()
    response = client.post("/api/v1/runs", data='{"process": "vendor-onboarding", "input": {',
                           content_type="application/json", **_bearer(api_token))
    assert response.status_code == 400, response.content
    assert response["Content-Type"].startswith("application/json")
    assert _counts() == before


def test_it_reports_a_malformed_json_body_in_the_error_shape(client: Client,
                                                             api_token: str) -> None:
    response = client.post("/api/v1/runs", data="{not json", content_type="application/json",
                           **_bearer(api_token))
    assert response.status_code == 400
    assert isinstance(response.json().get("error"), str)


@pytest.mark.parametrize("bad_input", [["a", "list"], "a string", 42, None])
def test_it_refuses_input_that_is_not_an_object(api: Any, bad_input: Any) -> None:
    before = _counts()
    response = api.post("/api/v1/runs", {"process": "vendor-onboarding", "input": bad_input})
    assert response.status_code == 400, response.content
    assert "input" in response.json()["error"]
    assert _counts() == before


def test_it_refuses_a_body_without_a_process(api: Any, vendor_input: dict[str, str]) -> None:
    before = _counts()
    response = api.post("/api/v1/runs", {"input": vendor_input})
    assert response.status_code == 400
    assert "process" in response.json()["error"]
    assert _counts() == before


def test_it_forbids_starting_a_run_without_permission(client: Client, outsider_token: str,
                                                      vendor_input: dict[str, str]) -> None:
    before = _counts()
    response = client.post(
        "/api/v1/runs", data=json.dumps({"process": "vendor-onboarding", "input": vendor_input}),
        content_type="application/json", **_bearer(outsider_token))
    assert response.status_code == 403
    assert "vendor-onboarding" in response.json()["error"]
    assert _counts() == before


# --- reading runs ---------------------------------------------------------------------------


def test_it_hides_another_users_run(client: Client, operator: User, outsider_token: str,
                                    vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, vendor_input)
    for path in (f"/api/v1/runs/{run.pk}", f"/api/v1/runs/{run.pk}/events"):
        response = client.get(path, **_bearer(outsider_token))
        assert response.status_code == 404, path
        assert str(run.pk) not in response.content.decode()
        assert vendor_input["iban"] not in response.content.decode()
    response = client.post(f"/api/v1/runs/{run.pk}/cancel", **_bearer(outsider_token))
    assert response.status_code == 404
    run.refresh_from_db()
    assert run.status == "pending"
    assert not run.cancel_requested


def test_it_answers_404_for_an_unknown_run(api: Any) -> None:
    response = api.get(f"/api/v1/runs/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.json() == {"error": "no such run"}


@pytest.mark.parametrize("suffix", ["", "/events"])
def test_it_answers_404_for_a_run_id_that_is_not_a_uuid(api: Any, suffix: str) -> None:
    response = api.get(f"/api/v1/runs/not-a-uuid{suffix}")
    assert response.status_code == 404, (response.status_code, response.content)


def test_it_shows_a_run_to_its_owner(api: Any, operator: User,
                                     vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, vendor_input)
    response = api.get(f"/api/v1/runs/{run.pk}")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(run.pk)
    assert body["status"] == "pending"
    assert body["version"] == 1
    assert [t["key"] for t in body["tasks"]] == list(
        run.tasks.order_by("position").values_list("key", flat=True))
    assert body["usage"] == {"tokens_in": 0, "tokens_out": 0, "cost": "0.000000", "steps": 0,
                             "tool_calls": 0}


def test_it_returns_only_events_after_the_given_seq(api: Any, operator: User,
                                                    vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, vendor_input)
    services.run_cancel(run=run, user=operator)  # adds more events to the chain
    total = Event.objects.filter(chain=run.pk).count()
    assert total >= 3

    everything = api.get(f"/api/v1/runs/{run.pk}/events").json()["events"]
    assert [e["seq"] for e in everything] == list(range(1, total + 1))
    for event in everything:
        assert set(event) == EVENT_KEYS

    response = api.get(f"/api/v1/runs/{run.pk}/events?after=1")
    assert response.status_code == 200
    later = response.json()["events"]
    assert [e["seq"] for e in later] == list(range(2, total + 1))
    assert later == everything[1:]
    assert later[0]["prev_hash"] == everything[0]["hash"]

    assert api.get(f"/api/v1/runs/{run.pk}/events?after={total}").json()["events"] == []
    limited = api.get(f"/api/v1/runs/{run.pk}/events?after=1&limit=1").json()["events"]
    assert [e["seq"] for e in limited] == [2]


# --- cancelling -----------------------------------------------------------------------------


def test_it_cancels_an_active_run_once(api: Any, operator: User,
                                       vendor_input: dict[str, str]) -> None:
    run = _pending_run(operator, vendor_input)
    assert run.status == "pending"

    response = api.post(f"/api/v1/runs/{run.pk}/cancel")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    run.refresh_from_db()
    assert run.status == "cancelled"
    kinds = list(Event.objects.filter(chain=run.pk).values_list("kind", flat=True))
    assert "run.cancel_requested" in kinds

    before = _counts()
    again = api.post(f"/api/v1/runs/{run.pk}/cancel")
    assert again.status_code == 409
    assert "cancelled" in again.json()["error"]
    assert _counts() == before


def test_it_answers_404_when_cancelling_an_unknown_run(api: Any) -> None:
    assert api.post(f"/api/v1/runs/{uuid.uuid4()}/cancel").status_code == 404


# --- schema ---------------------------------------------------------------------------------


def test_it_publishes_an_openapi_schema(client: Client, db: Any) -> None:
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "Switchboard API"
    expected = {"/api/v1/processes", "/api/v1/runs", "/api/v1/runs/{run_id}",
                "/api/v1/runs/{run_id}/events", "/api/v1/runs/{run_id}/cancel"}
    assert expected <= set(schema["paths"])
    assert set(schema["paths"]["/api/v1/runs"]) == {"get", "post"}
    assert set(schema["paths"]["/api/v1/runs/{run_id}/cancel"]) == {"post"}


# --- management commands --------------------------------------------------------------------


def test_it_creates_an_api_token_and_stores_only_its_digest(client: Client,
                                                            operator: User) -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", "operator", "--name", "ci", stdout=out, stderr=err)
    raw = out.getvalue().strip().splitlines()[-1]
    assert raw.startswith("sb_")
    assert raw not in err.getvalue()

    token = ApiToken.objects.get(user=operator, name="ci")
    assert token.digest == hashlib.sha256(raw.encode()).hexdigest()
    assert token.expires_at is None
    for field in ApiToken._meta.concrete_fields:
        assert raw not in str(getattr(token, field.attname)), field.name
    assert not ApiToken.objects.filter(digest=raw).exists()

    assert client.get("/api/v1/processes", **_bearer(raw)).status_code == 200


def test_it_creates_an_expiring_api_token(operator: User) -> None:
    call_command("create_api_token", "operator", "--days", "2", stdout=io.StringIO(),
                 stderr=io.StringIO())
    token = ApiToken.objects.get(user=operator)
    assert token.expires_at is not None
    remaining = token.expires_at - timezone.now()
    assert timedelta(days=1, hours=23) < remaining <= timedelta(days=2)


def test_it_refuses_a_token_for_an_unknown_user(demo: None) -> None:
    with pytest.raises(CommandError, match="nobody"):
        call_command("create_api_token", "nobody", stdout=io.StringIO(), stderr=io.StringIO())
    assert ApiToken.objects.count() == 0


def test_it_seeds_the_demo_data_idempotently(demo: None) -> None:
    users_before = sorted(User.objects.values_list("username", flat=True))
    call_command("seed_demo", stdout=io.StringIO())
    for spec in demo_data.PROCESSES:
        process = Process.objects.get(slug=spec["slug"])
        assert ProcessVersion.objects.filter(process=process).count() == 1, spec["slug"]
        assert process.current_version is not None
        assert process.current_version.number == 1
    assert Process.objects.count() == 4
    users = sorted(User.objects.values_list("username", flat=True))
    assert users == users_before
    # The four people; the rest are the service accounts of the demo agents and processes.
    assert [u for u in users if not u.startswith(("agent-", "process-"))] == [
        "admin", "operator", "reviewer", "reviewer2"]
    assert [u for u in users if u.startswith("process-")] == [
        f"process-{slug}" for slug in sorted(p["slug"] for p in demo_data.PROCESSES)]
