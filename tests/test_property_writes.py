"""Generated input against every write endpoint: no 5xx, and a 4xx writes nothing.

Every route the URL resolver knows and every operation of the JSON API has a case below or a
reasoned exclusion, so a new endpoint without one fails ``test_every_endpoint_has_a_case``.
Each case is sent, as the role that may use it (so input reaches validation, not a 403):

- arbitrary JSON documents (any nesting of null, booleans, huge integers, NaN, Infinity, strings
  with NUL and lone surrogates, keys alike, as escapes or as raw invalid UTF-8), very deep
  nesting, bytes that are not JSON at all;
- a valid body with hostile values put in, keys added or dropped (the structured mutations that
  get past the schema to the checks behind it);
- for page forms, field dicts of hostile strings, repeated fields, JSON fields mutated likewise.

Asserted for every example: the answer is not a 5xx; a 4xx changed no table (row counts, highest
ids, latest change times, over every concrete model: the ledger's events included); the API's
4xx answers say why in ``error``. Pages that only read must write nothing at all.

Each example runs in a savepoint that is rolled back, so each meets the same state (an active
run with a pending approval request, a cancelled run, an active agent) whatever the one before
it did. Bounded and reproducible: derandomized (the same examples on every run), 30 examples
per endpoint (``SWITCHBOARD_PROPERTY_EXAMPLES``; a fifth of that where only the path and the
role matter); ``HYPOTHESIS_PROFILE=switchboard-thorough`` explores 500 random ones instead."""

from __future__ import annotations

import copy
import inspect
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from django.apps import apps
from django.contrib.auth.models import User
from django.db import connection, models, transaction
from django.db.models import Count, Max, Q
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from approvals.models import ApprovalRequest, Decision
from console import auth_views
from console.models import ApiToken
from orchestration import services
from orchestration.models import Agent, Process, ReplayCheck, Run
from tests.test_approvals import REFUND, _open_request
from tests.test_authz_matrix import _api_operations, _page_routes

settings.register_profile(
    "switchboard-ci", max_examples=int(os.environ.get("SWITCHBOARD_PROPERTY_EXAMPLES", "30")),
    derandomize=True, deadline=None, database=None, print_blob=False,
    # Each example is a request and two dozen queries: slow by Hypothesis's measure, on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example])
settings.register_profile("switchboard-thorough", parent=settings.get_profile("switchboard-ci"),
                          max_examples=500, derandomize=False)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "switchboard-ci"))

PASSWORD = "switchboard"
# Every test here runs in the module's seeded world (below), each in a savepoint of its own.
pytestmark = pytest.mark.django_db


# --- the state every example meets ---------------------------------------------------------


@contextmanager
def rolled_back() -> Iterator[None]:
    """A savepoint undone afterwards: the next example meets the same state."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


@dataclass
class World:
    people: dict[str, User]
    tokens: dict[str, str]
    request: ApprovalRequest  # pending, for the reviewers, on ``active`` (not yet parked)
    active: Run
    cancelled: Run
    agent: str
    check: ReplayCheck  # a finished replay check of ``cancelled``


@pytest.fixture(scope="module")
def world(django_db_setup: Any, django_db_blocker: Any) -> Iterator[World]:
    """Seeded once for the module, in a transaction rolled back after its last test (each
    test's own savepoint, from the django_db mark, is rolled back after it)."""
    from django.core.management import call_command
    from django.test import override_settings

    fast = override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])
    with django_db_blocker.unblock(), fast, rolled_back():
        call_command("seed_demo", stdout=open(os.devnull, "w"))
        people = {u.username: u for u in User.objects.filter(
            username__in=["operator", "reviewer", "admin"])}
        request = _open_request(people["operator"])
        cancelled = services.run_create(process=Process.objects.get(slug="refund-exception"),
                                        input={**REFUND, "amount": 80}, user=people["operator"])
        services.run_cancel(run=cancelled, user=people["operator"])
        for user in people.values():
            user.set_password(PASSWORD)
            user.save(update_fields=["password"])
        tokens = {name: ApiToken.issue(user, name="property")[1] for name, user in people.items()}
        for token in tokens.values():
            # Authentication stamps last_used_at at most once a minute: let that happen here.
            Client().get("/api/v1/processes", HTTP_AUTHORIZATION=f"Bearer {token}")
        agent = Agent.objects.filter(status=Agent.Status.ACTIVE).order_by("slug").first()
        assert agent is not None
        yield World(people=people, tokens=tokens, request=request,
                    active=Run.objects.get(pk=request.run_id), cancelled=cancelled,
                    agent=agent.slug, check=ReplayCheck.objects.create(
                        run=cancelled, requested_by=people["operator"], status="matched",
                        summary="replay matches"))


# --- what "changed nothing" means ----------------------------------------------------------

# Columns that move on any answer, by design, and say nothing about the request's effect.
MOVES_ON_ANY_ANSWER = {("console.ApiToken", "last_used_at"), ("auth.User", "last_login")}


def _tables() -> Iterator[type[models.Model]]:
    for model in apps.get_models():
        if model._meta.managed and not model._meta.proxy:
            yield model


def _figures(model: type[models.Model]) -> dict[str, Any]:
    label = model._meta.label
    figures: dict[str, Any] = {"rows": Count("pk")}
    if isinstance(model._meta.pk, models.AutoField | models.BigAutoField):
        figures["last_id"] = Max("pk")
    for field in model._meta.concrete_fields:
        if (label, field.name) in MOVES_ON_ANY_ANSWER:
            continue
        if isinstance(field, models.DateTimeField) and not field.auto_now_add:
            figures[field.name] = Max(field.name)
        elif isinstance(field, models.BooleanField):
            figures[field.name] = Count("pk", filter=Q(**{field.name: True}))
        elif field.choices:
            for value, _ in field.flatchoices:
                figures[f"{field.name}={value}"] = Count("pk", filter=Q(**{field.name: value}))
    return figures


# Each table's aggregate query as the ORM wrote it the first time, by model: building it again
# took three quarters of a property test's time.
_statements: dict[str, tuple[str, Any]] = {}


def _statement(model: type[models.Model]) -> tuple[str, Any]:
    label = model._meta.label
    if label not in _statements:
        sent: list[tuple[str, Any]] = []

        def keep(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            sent.append((sql, params))
            return execute(sql, params, many, context)

        with connection.execute_wrapper(keep):
            model._base_manager.aggregate(**_figures(model))
        assert len(sent) == 1, f"{label}'s figures took {len(sent)} queries"
        _statements[label] = sent[0]
    return _statements[label]


def fingerprint() -> dict[str, dict[str, Any]]:
    """Per table, in one query: rows, the highest integer id, the latest of each change time,
    and how many rows hold each status (any field with choices) and each flag (booleans): a row
    written, a run cancelled, a request decided or an agent retired all show. An update of any
    other plain column (a note, a number) does not. Values are as the database returns them."""
    found = {}
    with connection.cursor() as cursor:
        for model in _tables():
            cursor.execute(*_statement(model))
            names = [column[0] for column in cursor.description]
            found[model._meta.label] = dict(zip(names, cursor.fetchone(), strict=True))
    return found


def _changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {table: (before[table], after[table]) for table in before
            if before[table] != after[table]}


# --- hostile values ------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text sent exactly as written: numbers and nesting no Python value serialises to."""

    text: str


HOSTILE_TEXT = [
    "", " ", "\ufeff", "\u202e", "\u00b2", "\u0661\u0662",
    "NaN", "Infinity", "-Infinity", "sNaN", "1E+999999999", "-0", "0.0000001", "-5", "1e-400",
    "9" * 5000, "a" * 3000, "<script>alert(1)</script>", "' OR 1=1 --", "../../etc/passwd", "%00",
    "null", "true", "{}", "[]", "[" * 70, "approve", "reject", "edit", "raise_budget", "stop",
]
RAW_NUMBERS = ["1E+999999999", "-1E+999999999", "9" * 5000, "1e-400", "-0", "NaN", "Infinity",
               "-Infinity", "9007199254740992", "-9007199254740993", "1.0e308", "0.1e-99999"]

# What neither database can store, drawn as often as all the rest of the list together.
UNSTORABLE_TEXT = ["\x00", "a\x00b", "\ud800", "x\udfffy"]
texts = st.one_of(st.sampled_from(UNSTORABLE_TEXT), st.sampled_from(HOSTILE_TEXT),
                  st.text(st.characters(exclude_categories=()), max_size=30))
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**53 - 2, max_value=2**70) | st.integers(min_value=-(2**70),
                                                                    max_value=-(2**53 - 2)),
    st.floats(),
    st.sampled_from(RAW_NUMBERS).map(Raw),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
deep = st.sampled_from([63, 64, 65, 200, 100_000]).map(lambda n: Raw("[" * n + "]" * n))
documents = st.one_of(deep, st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12))


def _paths(value: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value: the value itself, then each member and item, depth first."""
    yield here
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*here, index))


@st.composite
def mutated(draw: st.DrawFn, valid: Any) -> Any:
    """``valid`` with one or two places (never the whole) given a hostile value, a key added or
    dropped: the rest stays valid, so the request gets past the schema to the checks behind."""
    value = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 2))):
        places = list(_paths(value))[1:]
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent = value
        for step in path[:-1]:
            parent = parent[step]
        how = draw(st.sampled_from(["replace", "replace", "replace", "add", "drop"]))
        if how == "add" and isinstance(parent, dict):
            parent[draw(texts)] = draw(scalars | documents)
        elif how == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(scalars | documents)
    return value


def encode(value: Any, ascii_only: bool) -> str:
    """JSON text of ``value``, with ``Raw`` parts as written; NaN and Infinity as Python writes
    them; lone surrogates as \\u escapes (``ascii_only``) or kept raw (sent as invalid UTF-8)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{encode(str(k), ascii_only)}: {encode(v, ascii_only)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(encode(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@st.composite
def json_bodies(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "document", "not-json"]))
    if kind == "not-json":
        return draw(st.binary(max_size=64) |
                    st.sampled_from(UNSTORABLE_TEXT + HOSTILE_TEXT).map(utf8))
    value = draw(mutated(draw(valid))) if kind == "mutated" else draw(documents)
    return utf8(encode(value, ascii_only=draw(st.booleans())))


@st.composite
def form_fields(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]
                ) -> list[tuple[str, str]]:
    """A form submission: ``valid``'s fields (JSON ones as JSON text) with one or two of them
    given a hostile string (or, for JSON, a mutated value), dropped or repeated (mostly just
    one, so the others get it past the checks before), and now and then a field nobody asked
    for."""
    chosen = draw(valid)
    fields = {name: value if isinstance(value, str) else encode(value, ascii_only=True)
              for name, value in chosen.items()}
    sent = list(fields.items())
    if fields:
        altered = draw(st.sampled_from(sorted(fields)))
        for name in {altered, draw(st.sampled_from([altered] * 3 + sorted(fields)))}:
            original = chosen[name]
            how = draw(st.sampled_from(["hostile", "hostile", "drop", "repeat"] +
                                       ([] if isinstance(original, str) else ["mutated"] * 3)))
            sent = [(k, v) for k, v in sent if k != name]
            if how == "hostile":
                sent.append((name, draw(texts)))
            elif how == "mutated":
                sent.append((name, encode(draw(mutated(original)), draw(st.booleans()))))
            elif how == "repeat":
                sent += [(name, fields[name]), (name, draw(texts))]
    return sent + draw(st.lists(st.tuples(texts, texts), max_size=1))


def form_body(fields: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{quote(utf8(k))}={quote(utf8(v))}" for k, v in fields).encode()


# --- the cases -----------------------------------------------------------------------------


def no_fields(world: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.just({})


@dataclass(frozen=True)
class Page:
    """A page route: who sends what. ``valid`` draws a submission that would be accepted
    (fields holding JSON as values, sent as JSON text); ``reads``: it must never write."""

    role: str | None  # None: signed out
    path: Callable[[World], str]
    valid: Callable[[World], st.SearchStrategy[dict[str, Any]]] = no_fields
    method: str = "POST"
    reads: bool = False


REFUND_CALL = {"order_id": "ORD-1042", "amount": 80}


def _decision_form(w: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(Decision.Kind.values).map(lambda kind: {
        "decision": kind, "arguments": REFUND_CALL, "note": "checked", "tokens": "1000",
        "cost": "0.5", "steps": "3", "arguments_digest": w.request.arguments_digest})


def _decision_body(w: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(Decision.Kind.values).map(lambda kind: {
        "decision": kind, "arguments": REFUND_CALL, "note": "checked",
        "arguments_digest": w.request.arguments_digest,
        "budget": {"tokens": 1000, "cost": "0.5", "steps": 3, "wall_s": 60}})


def _start(w: World) -> st.SearchStrategy[dict[str, Any]]:
    return st.just({"process": "refund-exception", "input": {**REFUND, "amount": 5}})


def _active(w: World) -> str:
    return f"runs/{w.active.pk}/"


def _cancelled(w: World) -> str:
    return f"runs/{w.cancelled.pk}/"


PAGES: dict[str, Page] = {
    "runs/start": Page("operator", lambda w: "runs/start", _start),
    "runs/<uuid:run_id>/cancel": Page("operator", lambda w: _active(w) + "cancel"),
    "runs/<uuid:run_id>/replay": Page("operator", lambda w: _active(w) + "replay"),
    "runs/<uuid:run_id>/fork": Page("operator", lambda w: _cancelled(w) + "fork",
                                    lambda w: st.just({"step": "1"})),
    "runs/<uuid:run_id>/retry": Page("operator", lambda w: _cancelled(w) + "retry"),
    "agents/<slug:slug>/retire": Page("admin", lambda w: f"agents/{w.agent}/retire"),
    "review/<uuid:request_id>/decide": Page("reviewer",
                                            lambda w: f"review/{w.request.pk}/decide",
                                            _decision_form),
    "review/<uuid:request_id>/preview": Page(
        "reviewer", lambda w: f"review/{w.request.pk}/preview",
        lambda w: st.just({"arguments": REFUND_CALL})),
    "review/bulk": Page("reviewer", lambda w: "review/bulk", lambda w: st.just({
        "requests": str(w.request.pk), "confirm": "yes", "note": "checked",
        "arguments_digest": w.request.arguments_digest})),
    "login/": Page(None, lambda w: "login/", lambda w: st.just(
        {"username": "operator", "password": PASSWORD, "next": "/"})),
    "admin/login/": Page(None, lambda w: "admin/login/", lambda w: st.just(
        {"username": "admin", "password": PASSWORD, "next": "/admin/"})),
    "logout/": Page("operator", lambda w: "logout/"),
    "settings/time-zone/": Page("operator", lambda w: "settings/time-zone/", lambda w: (
        st.sampled_from([{"time_zone": "Europe/Paris"}, {"time_zone": ""}]))),
    "ledger/": Page("admin", lambda w: "ledger/", lambda w: st.just({
        "run": str(w.active.pk), "actor": "user:operator", "kind": "run.", "before": "1000",
        "since": "2020-01-01T00:00", "until": "2999-01-01T00:00"}), method="GET", reads=True),
    # Pages that only read: sent hostile fields anyway (GET or POST), they must write nothing.
    "": Page("operator", lambda w: "", reads=True),
    "runs/<uuid:run_id>/": Page("operator", _active, reads=True),
    "runs/<uuid:run_id>/replay/checks": Page("operator", lambda w: _active(w) + "replay/checks",
                                             reads=True),
    "agents/": Page("operator", lambda w: "agents/", reads=True),
    "health/live": Page(None, lambda w: "health/live", reads=True),
    "metrics": Page(None, lambda w: "metrics", reads=True),
    "agents/<slug:slug>/": Page("operator", lambda w: f"agents/{w.agent}/", reads=True),
    "tools/": Page("operator", lambda w: "tools/", reads=True),
    "analytics/": Page("operator", lambda w: "analytics/", reads=True),
    "runs/": Page("operator", lambda w: "runs/", lambda w: st.just({
        "status": "running", "q": "ORD", "since": "2020-01-01", "order": "oldest"}),
                  method="GET", reads=True),
    "review/": Page("reviewer", lambda w: "review/", reads=True),
    "runs/start/form": Page("operator", lambda w: "runs/start/form?process=refund-exception",
                            reads=True),
    "runs/<uuid:run_id>/trace/": Page("operator", lambda w: _active(w) + "trace/", reads=True),
    "runs/<uuid:run_id>/trace/<slug:span_id>": Page(
        "operator", lambda w: _active(w) + "trace/run", reads=True),
    # Each person's own preference (a row of theirs, written on POST).
    "settings/notifications": Page("operator", lambda w: "settings/notifications",
                                   lambda w: st.just({"email": "on"})),
    "review/<uuid:request_id>/": Page("reviewer", lambda w: f"review/{w.request.pk}/",
                                      reads=True),
}
EXCLUDED = {
    # Django's own admin site (staff only, its ModelForms validated by Django); its
    # customisations are tested in the admin tests.
    "admin/": "Django's admin site",
    # Every operation under it is a case of API_WRITES or API_READS.
    "api/v1/": "the JSON API, enumerated operation by operation below",
    # A probe that reads only; it answers 503 by design while a component is missing (here,
    # in the distributed pass, a worker). tests/test_health.py covers it.
    "health/ready": "the readiness probe",
}


@dataclass(frozen=True)
class Operation:
    role: str
    path: Callable[[World], str]
    valid: Callable[[World], st.SearchStrategy[Any]] = no_fields


API_WRITES: dict[tuple[str, str], Operation] = {
    ("POST", "/runs"): Operation("operator", lambda w: "/runs", _start),
    ("POST", "/runs/{run_id}/cancel"): Operation("operator",
                                                 lambda w: f"/runs/{w.active.pk}/cancel"),
    ("POST", "/runs/{run_id}/fork"): Operation("operator", lambda w: f"/runs/{w.cancelled.pk}/fork",
                                               lambda w: st.just({"step": 1})),
    ("POST", "/runs/{run_id}/replay"): Operation("operator",
                                                 lambda w: f"/runs/{w.cancelled.pk}/replay"),
    ("POST", "/approvals/{request_id}/decision"): Operation(
        "reviewer", lambda w: f"/approvals/{w.request.pk}/decision", _decision_body),
    ("POST", "/knowledge/{slug}/documents"): Operation(
        "admin", lambda w: "/knowledge/refund-policy/documents",
        lambda w: st.just({"title": "Returns", "text": "Returns are free within 30 days."})),
    ("DELETE", "/knowledge/{slug}/documents/{document_id}"): Operation(
        "admin", lambda w: f"/knowledge/refund-policy/documents/{_policy_document()}"),
}


def _policy_document() -> str:
    from knowledge.models import Document

    return str(Document.objects.get(collection__slug="refund-policy").pk)


# The API's reads: their query parameters are input too. They must write nothing, whatever
# they are sent (past the once-a-minute stamp authentication leaves on the token).
API_READS: dict[tuple[str, str], Operation] = {
    ("GET", "/processes"): Operation("operator", lambda w: "/processes"),
    ("GET", "/runs"): Operation("operator", lambda w: "/runs", lambda w: st.just(
        {"status": "running", "q": "ORD", "until": "2999-01-01", "limit": "5"})),
    ("GET", "/runs/{run_id}"): Operation("operator", lambda w: f"/runs/{w.active.pk}"),
    ("GET", "/runs/{run_id}/events"): Operation(
        "operator", lambda w: f"/runs/{w.active.pk}/events",
        lambda w: st.just({"after": "0", "limit": "10"})),
    ("GET", "/approvals"): Operation("reviewer", lambda w: "/approvals",
                                     lambda w: st.sampled_from(ApprovalRequest.Status.values)
                                     .map(lambda status: {"status": status})),
    ("GET", "/approvals/{request_id}"): Operation("reviewer",
                                                  lambda w: f"/approvals/{w.request.pk}"),
    ("GET", "/runs/{run_id}/replay/{check_id}"): Operation(
        "operator", lambda w: f"/runs/{w.cancelled.pk}/replay/{w.check.pk}"),
    ("GET", "/knowledge"): Operation("operator", lambda w: "/knowledge"),
    ("GET", "/knowledge/{slug}/search"): Operation(
        "operator", lambda w: "/knowledge/refund-policy/search",
        lambda w: st.just({"q": "refund window", "k": "3"})),
}


def _examples(valid: Callable[[World], Any]) -> settings:
    """A case that reads no input is sent fewer examples: only its path and role matter."""
    if valid is no_fields:
        return settings(PROFILE, max_examples=max(3, PROFILE.max_examples // 5))
    return PROFILE


def _own_or_unknown(path: str, world: World, unknown: bool) -> str:
    """Now and then the same path for an object that does not exist: 404, nothing written."""
    if not unknown:
        return path
    for own in (world.active.pk, world.cancelled.pk, world.request.pk, world.check.pk):
        path = path.replace(str(own), str(uuid.uuid4()))
    return path.replace(world.agent, "no-such-agent")


# --- coverage ------------------------------------------------------------------------------


def _route_views(patterns: list[Any], prefix: str = "") -> dict[str, Any]:
    views: dict[str, Any] = {}
    for p in patterns:
        route = prefix + str(p.pattern)
        if isinstance(p, URLResolver):
            if route not in EXCLUDED:
                views.update(_route_views(p.url_patterns, route))
        elif isinstance(p, URLPattern):
            views[route] = p.callback
    return views


def _only_writes(view: Any) -> bool:
    """The view refuses GET (``require_POST``, a class view without ``get``): it exists to
    write, so it is fuzzed as a form, never waved through as a page that only reads."""
    view_class = getattr(view, "view_class", None)
    if view_class is not None:
        return "get" not in view_class.http_method_names
    while view is not None:
        methods = inspect.getclosurevars(view).nonlocals.get("request_method_list")
        if methods is not None and "GET" not in methods:
            return True
        view = getattr(view, "__wrapped__", None)
    return False


def test_every_endpoint_has_a_case() -> None:
    routes = _page_routes(get_resolver().url_patterns)
    assert routes == set(PAGES) | set(EXCLUDED), "a route without a case here, or a stale one"
    writes = {op for op in _api_operations() if op[0] != "GET"}
    assert writes == set(API_WRITES), "an API write without a case here, or a stale one"
    assert _api_operations() - writes == set(API_READS), "an API read without a case here"
    for route, view in _route_views(get_resolver().url_patterns).items():
        if _only_writes(view):
            assert not PAGES[route].reads, f"{route} only takes POST: fuzz it as a form"


def test_the_fingerprint_sees_rows_written_and_states_changed(world: World) -> None:
    before = fingerprint()
    ApiToken.issue(world.people["operator"], name="another")
    assert set(_changes(before, fingerprint())) == {"console.ApiToken"}
    before = fingerprint()
    ApprovalRequest.objects.filter(pk=world.request.pk).update(status="approved")
    Agent.objects.filter(slug=world.agent).update(status=Agent.Status.RETIRED)
    User.objects.filter(pk=world.people["admin"].pk).update(is_active=False)
    assert set(_changes(before, fingerprint())) == {"approvals.ApprovalRequest",
                                                    "orchestration.Agent", "auth.User"}
    before = fingerprint()
    Run.objects.filter(pk=world.active.pk).update(error="touched")
    assert _changes(before, fingerprint()) == {}  # a plain column, and .update() skips auto_now
    world.active.save()
    assert set(_changes(before, fingerprint())) == {"orchestration.Run"}  # updated_at


# --- the properties ------------------------------------------------------------------------


@pytest.fixture
def _fresh_sign_in_limits() -> Iterator[None]:
    """Failed sign-ins are counted per address for the whole process: forget this test's."""
    auth_views.limiter().storage.reset()
    yield
    auth_views.limiter().storage.reset()


unknown_objects = st.sampled_from([False] * 9 + [True])
# Mostly none; sometimes a well-formed key (the request is then done under it), sometimes not.
idempotency_keys = st.sampled_from([None] * 6 + ["retry-1"]) | texts
# Mostly what the API expects; sometimes what a confused client sends with the same body.
CONFUSED_TYPES = ["text/plain", "multipart/form-data; boundary=x", "multipart/form-data"]
content_types = st.sampled_from(["application/json"] * 6 + CONFUSED_TYPES + [
    "application/json; charset=latin-1", "application/json; charset=nope",
    "application/x-www-form-urlencoded"])
form_content_types = st.sampled_from(["application/x-www-form-urlencoded"] * 6 + CONFUSED_TYPES + [
    "application/x-www-form-urlencoded; charset=latin-1",
    "application/x-www-form-urlencoded; charset=nope", "application/json"])


def _signed_in(role: str | None, world: World) -> Client:
    """A client signed in once for the test: each example's own sign-out, or a session or
    messages cookie it is sent, is undone by restoring the cookies (and the savepoint)."""
    client = Client()
    if role is not None:
        client.force_login(world.people[role])
    return client


@pytest.mark.usefixtures("_fresh_sign_in_limits")
@pytest.mark.parametrize("route", sorted(PAGES), ids=lambda r: r or "dashboard")
def test_a_page_answers_below_500_and_a_refusal_writes_nothing(world: World, route: str) -> None:
    case = PAGES[route]
    methods = st.sampled_from(["GET", "POST"]) if case.reads else st.just(case.method)
    client = _signed_in(case.role, world)
    cookies = copy.deepcopy(client.cookies)
    before = fingerprint()

    @_examples(case.valid)
    @given(fields=form_fields(case.valid(world)), method=methods, unknown=unknown_objects,
           content_type=form_content_types)
    def example(fields: list[tuple[str, str]], method: str, unknown: bool,
                content_type: str) -> None:
        client.cookies = copy.deepcopy(cookies)
        path = "/" + _own_or_unknown(case.path(world), world, unknown)
        body = form_body(fields)
        with rolled_back():
            if method == "GET":
                response = client.get(f"{path}?{body.decode()}")
            else:
                # generic(): the body goes as it is, whatever charset the header claims.
                response = client.generic("POST", path, data=body, content_type=content_type)
            after = fingerprint()
        status = response.status_code
        assert status < 500, (method, path, fields)
        if case.reads or 400 <= status < 500:
            changed = _changes(before, after)
            assert not changed, (status, method, path, fields)
        if 400 <= status < 500:
            assert response.content.strip(), "a refusal must say something"

    example()


@pytest.mark.parametrize("operation", sorted(API_WRITES), ids=" ".join)
def test_an_api_write_answers_below_500_and_a_refusal_writes_nothing(
        world: World, operation: tuple[str, str]) -> None:
    method, _ = operation
    case = API_WRITES[operation]
    client = Client(HTTP_AUTHORIZATION=f"Bearer {world.tokens[case.role]}")
    before = fingerprint()

    @_examples(case.valid)
    @given(body=json_bodies(case.valid(world)), key=idempotency_keys, unknown=unknown_objects,
           content_type=content_types)
    def example(body: bytes, key: str | None, unknown: bool, content_type: str) -> None:
        path = "/api/v1" + _own_or_unknown(case.path(world), world, unknown)
        headers = {} if key is None else {"HTTP_IDEMPOTENCY_KEY": key}
        with rolled_back():
            response = client.generic(method, path, data=body, content_type=content_type,
                                      **headers)
            after = fingerprint()
        status = response.status_code
        assert status < 500, (path, body[:500], response.content[:500])
        if 400 <= status < 500:
            changed = _changes(before, after)
            assert not changed, (status, path, body[:500])
            error = response.json().get("error")
            assert isinstance(error, str) and error, response.content[:500]

    example()


@pytest.mark.parametrize("operation", sorted(API_READS), ids=" ".join)
def test_an_api_read_answers_below_500_and_writes_nothing(
        world: World, operation: tuple[str, str]) -> None:
    case = API_READS[operation]
    client = Client(HTTP_AUTHORIZATION=f"Bearer {world.tokens[case.role]}")
    before = fingerprint()

    @_examples(case.valid)
    @given(query=form_fields(case.valid(world)), unknown=unknown_objects)
    def example(query: list[tuple[str, str]], unknown: bool) -> None:
        path = "/api/v1" + _own_or_unknown(case.path(world), world, unknown)
        with rolled_back():
            response = client.get(f"{path}?{form_body(query).decode()}")
            after = fingerprint()
        status = response.status_code
        assert status < 500, (path, query, response.content[:500])
        changed = _changes(before, after)
        assert not changed, (status, path, query)
        if 400 <= status < 500:
            error = response.json().get("error")
            assert isinstance(error, str) and error, response.content[:500]

    example()
