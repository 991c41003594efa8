"""Who may use which URL: an owner / teammate / outsider cast (plus reviewer and admin) over
every page, API endpoint and websocket route. A route without a row fails the suite."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from guardian.shortcuts import assign_perm

from approvals import services as approvals
from approvals.models import Decision
from console.api import api
from console.models import ApiToken
from knowledge.models import Document
from orchestration import services
from orchestration.models import Agent, Process, ReplayCheck

ROLES = ("owner", "teammate", "outsider", "reviewer", "admin")
VENDOR = {"name": "Northwind Traders", "country": "DE", "iban": "DE89370400440532013000",
          "email": "ap@northwind.example"}
ALL = set(ROLES)
SEES_RUN = {"owner", "teammate", "reviewer", "admin"}
STARTS = {"owner", "teammate", "admin"}
CONSOLE = {"owner", "teammate", "reviewer", "admin"}  # holders of a console role

# (method, route) -> roles allowed. Everyone else must get 403 or 404 (or be refused without
# effect, for the decide rows, which answer with a message).
PAGES: dict[tuple[str, str], set[str]] = {
    ("GET", ""): ALL,
    ("GET", "runs/"): ALL,  # each person's list holds only the runs they may see
    ("POST", "runs/start"): STARTS,
    # The start form of the first process each may start (the outsider may start another).
    ("GET", "runs/start/form"): STARTS | {"outsider"},
    ("GET", "runs/<uuid:run_id>/"): SEES_RUN,
    ("POST", "runs/<uuid:run_id>/cancel"): STARTS,
    ("POST", "runs/<uuid:run_id>/replay"): STARTS,
    ("GET", "runs/<uuid:run_id>/replay"): SEES_RUN,  # back to the run page, queues nothing
    ("GET", "runs/<uuid:run_id>/replay/checks"): SEES_RUN,
    ("GET", "runs/<uuid:run_id>/trace/"): SEES_RUN,
    ("GET", "runs/<uuid:run_id>/trace/<slug:span_id>"): SEES_RUN,
    ("POST", "runs/<uuid:run_id>/fork"): STARTS,
    ("POST", "runs/<uuid:run_id>/retry"): STARTS,
    ("GET", "agents/"): CONSOLE,
    ("GET", "agents/<slug:slug>/"): CONSOLE,
    ("POST", "agents/<slug:slug>/retire"): {"admin"},
    ("GET", "tools/"): CONSOLE,
    ("GET", "analytics/"): CONSOLE,
    ("GET", "ledger/"): {"admin"},
    ("GET", "review/"): ALL,
    ("GET", "review/<uuid:request_id>/"): SEES_RUN,
    ("POST", "review/<uuid:request_id>/decide"): {"reviewer"},
    ("GET", "settings/notifications"): ALL,  # each person's own preference
    ("POST", "settings/notifications"): ALL,
    ("POST", "review/<uuid:request_id>/preview"): SEES_RUN,
    # Refused for everyone here (the cast's request is no proposed action), but only people who
    # may decide it get past "no request you may decide".
    ("POST", "review/bulk"): {"reviewer"},
    ("GET", "settings/time-zone/"): ALL,  # each person's own
    ("POST", "settings/time-zone/"): ALL,
    ("GET", "login/"): ALL,
    ("POST", "logout/"): ALL,
    ("GET", "admin/login/"): ALL,  # the admin's sign-in, routed through the sign-in throttle
    # Probes and the scrape: no sign-in, nothing about runs (tests/test_health.py and
    # tests/test_metrics.py test them, and who may scrape).
    ("GET", "health/live"): ALL,
    ("GET", "health/ready"): ALL,
    ("GET", "metrics"): ALL,
}
STAFF_ONLY = "admin/"
API: dict[tuple[str, str], set[str]] = {
    ("GET", "/processes"): ALL,
    ("GET", "/runs"): ALL,  # each person's list holds only the runs they may see
    ("POST", "/runs"): STARTS,
    ("GET", "/runs/{run_id}"): SEES_RUN,
    ("GET", "/runs/{run_id}/events"): SEES_RUN,
    ("POST", "/runs/{run_id}/cancel"): STARTS,
    ("POST", "/runs/{run_id}/fork"): STARTS,
    ("POST", "/runs/{run_id}/replay"): STARTS,
    ("GET", "/runs/{run_id}/replay/{check_id}"): SEES_RUN,
    ("GET", "/approvals"): ALL,
    ("GET", "/approvals/{request_id}"): SEES_RUN,
    ("POST", "/approvals/{request_id}/decision"): {"reviewer"},
    # The demo's refund-policy collection: read by the operator and admin groups, written by
    # the admin group; everyone's list holds only what they may read.
    ("GET", "/knowledge"): ALL,
    ("GET", "/knowledge/{slug}/search"): {"owner", "teammate", "admin"},
    ("POST", "/knowledge/{slug}/documents"): {"admin"},
    ("DELETE", "/knowledge/{slug}/documents/{document_id}"): {"admin"},
}
API_PUBLIC = {"openapi.json", ""}  # the schema and the API root need no object access
# Websocket routes: who may subscribe. A new route cannot appear without a rule.
WEBSOCKETS: dict[str, set[str]] = {
    "ws/runs/": ALL,  # like the dashboard: each socket gets only the runs its user may see
    "ws/runs/<uuid:run_id>/": SEES_RUN,
    "ws/review/": CONSOLE,
}


def _page_routes(patterns: list[Any], prefix: str = "") -> set[str]:
    routes: set[str] = set()
    for p in patterns:
        route = prefix + str(p.pattern)
        if isinstance(p, URLResolver):
            if route in (STAFF_ONLY, "api/v1/"):
                routes.add(route)
            else:
                routes |= _page_routes(p.url_patterns, route)
        elif isinstance(p, URLPattern):
            routes.add(route)
    return routes


def _api_operations() -> set[tuple[str, str]]:
    ops = set()
    for prefix, router in api._routers:
        for path, view in router.path_operations.items():
            for operation in view.operations:
                for method in operation.methods:
                    ops.add((method, prefix + path))
    return ops


def test_it_has_a_row_for_every_page() -> None:
    routes = _page_routes(get_resolver().url_patterns)
    assert routes - {STAFF_ONLY, "api/v1/"} == {route for _, route in PAGES}
    assert STAFF_ONLY in routes and "api/v1/" in routes


def test_it_has_a_row_for_every_api_operation() -> None:
    assert _api_operations() == set(API)


def test_it_has_a_row_for_every_websocket_route() -> None:
    try:
        from console.routing import websocket_urlpatterns
    except ImportError:
        websocket_urlpatterns = []
    assert {str(p.pattern) for p in _flatten(websocket_urlpatterns)} == set(WEBSOCKETS)


def _flatten(patterns: list[Any]) -> list[Any]:
    out = []
    for p in patterns:
        out.extend(_flatten(p.url_patterns) if isinstance(p, URLResolver) else [p])
    return out


# --- the cast ---------------------------------------------------------------------------------



@pytest.fixture
def cast(demo: None) -> dict[str, Any]:
    operators = Group.objects.get(name="operator")
    owner = User.objects.get(username="operator")
    teammate = User.objects.create_user("teammate")
    teammate.groups.add(operators)
    outsider = User.objects.create_user("outsider")
    assign_perm("orchestration.start_run", outsider, Process.objects.get(slug="customer-inquiry"))
    people = {"owner": owner, "teammate": teammate, "outsider": outsider,
              "reviewer": User.objects.get(username="reviewer"),
              "admin": User.objects.get(username="admin")}
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=VENDOR, user=owner)
    request = approvals.request_open(run_id=run.pk, task_key="check_sanctions",
                                     reason="budget_exhausted", requested_by="system",
                                     detail="budget spent", run_started_by=owner)
    check = ReplayCheck.objects.create(run=run, requested_by=owner, status="matched")
    return {"people": people, "run": run, "request": request,
            "agent": Agent.objects.first(), "check": check,
            "document": Document.objects.get(collection__slug="refund-policy")}


def _path(route: str, cast: dict[str, Any]) -> str:
    return ("/" + route).replace("<uuid:run_id>", str(cast["run"].pk)).replace(
        "<uuid:request_id>", str(cast["request"].pk)).replace(
        "<slug:slug>", cast["agent"].slug).replace("<slug:span_id>", "run")


def _body(route: str) -> dict[str, Any]:
    if route == "runs/start":
        return {"process": "vendor-onboarding", "input": json.dumps(VENDOR)}
    if route.endswith("decide"):
        return {"decision": "reject", "note": "no"}
    if route.endswith("preview"):
        return {"arguments": "{}"}
    if route.endswith("fork"):
        return {"step": "1"}
    return {}


def _decided(cast: dict[str, Any]) -> bool:
    return Decision.objects.filter(request=cast["request"]).exists()


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method, route", sorted(PAGES))
def test_it_enforces_the_page_matrix(cast: dict[str, Any], role: str, method: str,
                                     route: str) -> None:
    client = Client()
    client.force_login(cast["people"][role])
    path = _path(route, cast)
    response = client.post(path, _body(route)) if method == "POST" else client.get(path)
    allowed = role in PAGES[(method, route)]
    if route.endswith("decide"):
        assert _decided(cast) == allowed, (role, response.status_code)
        return
    if route == "review/bulk":
        response = client.post(path, {"requests": str(cast["request"].pk), "confirm": "yes"})
        assert response.status_code == 400 and not _decided(cast), role
        unknown = "no request you may decide" in response.content.decode()
        assert unknown != allowed, role
        assert str(cast["run"].pk) not in response.content.decode()
        return
    if allowed:
        ready = route == "health/ready" and response.status_code == 503  # no worker here
        assert response.status_code in (200, 302, 303) or ready, (role, response.status_code)
        if route != "logout/":
            assert "/login/" not in response.get("Location", "")
    else:
        assert response.status_code in (403, 404), (role, response.status_code)
        assert str(cast["run"].pk) not in response.content.decode() or route == ""


@pytest.mark.parametrize("role", ROLES)
def test_it_keeps_the_admin_to_staff(cast: dict[str, Any], role: str) -> None:
    client = Client()
    client.force_login(cast["people"][role])
    response = client.get("/admin/orchestration/agent/")
    if cast["people"][role].is_staff:
        assert response.status_code == 200
    else:
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def _api_path(path: str, cast: dict[str, Any]) -> str:
    url = "/api/v1" + path.replace("{run_id}", str(cast["run"].pk)).replace(
        "{request_id}", str(cast["request"].pk)).replace("{check_id}", str(cast["check"].pk))
    url = url.replace("{slug}", "refund-policy").replace("{document_id}",
                                                        str(cast["document"].pk))
    return url + ("?q=refund" if path.endswith("/search") else "")


API_BODIES: dict[str, Callable[[], dict[str, Any]]] = {
    "/runs": lambda: {"process": "vendor-onboarding", "input": VENDOR},
    "/runs/{run_id}/fork": lambda: {"step": 1},
    "/approvals/{request_id}/decision": lambda: {"decision": "reject", "note": "no"},
    "/knowledge/{slug}/documents": lambda: {"title": "Matrix", "text": "A note."},
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method, path", sorted(API))
def test_it_enforces_the_api_matrix(client: Client, cast: dict[str, Any], role: str,
                                    method: str, path: str) -> None:
    token = ApiToken.issue(cast["people"][role])[1]
    url = _api_path(path, cast)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    if method in ("POST", "DELETE"):
        body = API_BODIES.get(path, dict)()
        response = client.generic(method, url, json.dumps(body),
                                  content_type="application/json", **headers)
    else:
        response = client.get(url, **headers)
    allowed = role in API[(method, path)]
    if allowed:
        assert response.status_code not in (401, 403, 404), (role, response.content)
    else:
        assert response.status_code in (403, 404), (role, response.status_code)
        assert set(response.json()) == {"error"}
    if path == "/approvals/{request_id}/decision":
        assert _decided(cast) == allowed


@pytest.mark.parametrize("method, path", sorted(API))
def test_it_refuses_the_api_without_a_token(client: Client, cast: dict[str, Any], method: str,
                                            path: str) -> None:
    url = _api_path(path, cast)
    response = client.get(url) if method == "GET" else client.generic(
        method, url, "{}", content_type="application/json")
    assert response.status_code == 401


def test_it_hides_other_runs_from_the_outsider_in_lists(cast: dict[str, Any]) -> None:
    client = Client()
    client.force_login(cast["people"]["outsider"])
    assert str(cast["run"].pk) not in client.get("/").content.decode()
    token = ApiToken.issue(cast["people"]["outsider"])[1]
    listed = client.get("/api/v1/approvals", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert listed == []
    assert str(cast["run"].pk) not in client.get("/runs/").content.decode()
    runs = client.get("/api/v1/runs", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert runs["runs"] == [] and runs["count"] == 0
    assert client.get(f"/runs/?q={cast['run'].input['iban']}").content.decode().count(
        '<tr id="run-') == 0


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route", sorted(WEBSOCKETS))
async def test_it_enforces_the_websocket_matrix(cast: dict[str, Any], role: str,
                                                route: str) -> None:
    from tests.test_live import connect

    communicator, connected = await connect(_path(route, cast), cast["people"][role])
    try:
        assert connected == (role in WEBSOCKETS[route]), role
    finally:
        await communicator.disconnect()
