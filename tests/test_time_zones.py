"""Time zones: the project's default (TIME_ZONE, UTC unless set, checked at start-up), each
person's own choice at /settings/time-zone/, and ``{{ value|when }}`` showing moments in it."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.template import Context, Template
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from console.env import envtimezone
from console.models import TimeZonePreference
from orchestration import services
from orchestration.models import Process, Run
from tests.conftest import ROOT

WINTER = datetime(2026, 1, 15, 12, 34, 56, 789012, tzinfo=UTC)
SUMMER = datetime(2026, 7, 15, 12, 34, 56, 789012, tzinfo=UTC)



@pytest.fixture
def run(operator: User, vendor_input: dict[str, str]) -> Run:
    """A pending run created at WINTER (never dispatched: the test never commits)."""
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=vendor_input, user=operator)
    Run.objects.filter(pk=run.pk).update(created_at=WINTER)
    return run


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def render(value: Any, arg: str = "") -> str:
    source = "{{ value|when" + (f':"{arg}"' if arg else "") + ' }}'
    return Template(source).render(Context({"value": value}))


def test_it_renders_a_moment_to_the_second_with_its_zone_in_a_time_element() -> None:
    assert render(WINTER) == ('<time datetime="2026-01-15T12:34:56Z">'
                              '2026-01-15 12:34:56 UTC</time>')
    assert render(WINTER, "time") == '<time datetime="2026-01-15T12:34:56Z">12:34:56 UTC</time>'
    with timezone.override("Europe/Paris"):
        assert render(WINTER) == ('<time datetime="2026-01-15T12:34:56Z">'
                                  '2026-01-15 13:34:56 CET</time>')
        assert render(SUMMER) == ('<time datetime="2026-07-15T12:34:56Z">'
                                  '2026-07-15 14:34:56 CEST</time>')
    with timezone.override("America/New_York"):
        assert "2026-01-15 07:34:56 EST" in render(WINTER)
    assert render(None) == ""
    assert Template('{{ value|when|default:"never" }}').render(Context({"value": None})) == \
        "never"


def test_the_default_zone_is_utc_and_pages_say_so(
        settings: Any, operator: User, run: Run) -> None:
    assert settings.TIME_ZONE == "UTC"
    page = signed_in(operator).get("/").content.decode()
    assert '<time datetime="2026-01-15T12:34:56Z">2026-01-15 12:34:56 UTC</time>' in page
    assert ".789" not in page


def test_a_person_who_chose_paris_sees_paris_time_and_its_zone(
        operator: User, run: Run, api: Any) -> None:
    client = signed_in(operator)
    form = client.get("/settings/time-zone/")
    assert form.status_code == 200 and 'id="current-zone">UTC<' in form.content.decode()

    saved = client.post("/settings/time-zone/", {"time_zone": "Europe/Paris"})
    assert saved.status_code == 302 and saved["Location"] == "/settings/time-zone/"
    assert TimeZonePreference.objects.get(user=operator).time_zone == "Europe/Paris"
    assert 'id="current-zone">Europe/Paris<' in client.get(saved["Location"]).content.decode()

    for path in ("/", "/runs/"):
        page = client.get(path).content.decode()
        assert '<time datetime="2026-01-15T12:34:56Z">2026-01-15 13:34:56 CET</time>' in page, \
            path
        assert "12:34:56 UTC" not in page, path
    # The run page shows its events' times, in Paris time too.
    events = client.get(f"/runs/{run.pk}/").content.decode()
    assert " CET</time>" in events or " CEST</time>" in events
    assert " UTC</time>" not in events

    # Someone else still reads UTC.
    other = signed_in(User.objects.get(username="admin")).get("/").content.decode()
    assert "2026-01-15 12:34:56 UTC" in other

    # The API stays in UTC, whoever asks.
    body = api.get(f"/api/v1/runs/{run.pk}").json()
    assert body["created_at"] == "2026-01-15T12:34:56.789Z"

    # Back to the default.
    assert client.post("/settings/time-zone/", {"time_zone": ""}).status_code == 302
    assert not TimeZonePreference.objects.filter(user=operator).exists()
    assert "2026-01-15 12:34:56 UTC" in client.get("/").content.decode()


def test_an_unknown_zone_is_refused_on_the_settings_page(operator: User) -> None:
    client = signed_in(operator)
    refused = client.post("/settings/time-zone/", {"time_zone": "Mars/Olympus_Mons"})
    assert refused.status_code == 400
    assert "Select a valid choice" in refused.content.decode()
    assert not TimeZonePreference.objects.filter(user=operator).exists()


def test_the_chosen_zone_comes_from_the_session_not_a_query_per_page(
        operator: User, run: Run) -> None:
    TimeZonePreference.objects.create(user=operator, time_zone="Asia/Tokyo")
    client = signed_in(operator)  # read once, at sign-in
    with CaptureQueriesContext(connection) as captured:
        page = client.get("/").content.decode()
    assert "2026-01-15 21:34:56 JST" in page
    assert not [q for q in captured.captured_queries
                if "console_timezonepreference" in q["sql"]]


def test_an_unknown_project_zone_is_a_configuration_error(monkeypatch: Any) -> None:
    monkeypatch.setenv("TIME_ZONE", "Mars/Olympus_Mons")
    with pytest.raises(ImproperlyConfigured,
                       match="TIME_ZONE='Mars/Olympus_Mons' is not a time zone"):
        envtimezone("TIME_ZONE", "UTC")
    monkeypatch.setenv("TIME_ZONE", "Europe/Paris")
    assert envtimezone("TIME_ZONE", "UTC") == "Europe/Paris"
    monkeypatch.delenv("TIME_ZONE")
    assert envtimezone("TIME_ZONE", "UTC") == "UTC"


def test_the_server_refuses_to_start_with_an_unknown_zone() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(TIME_ZONE="Europe/Atlantis", DJANGO_SETTINGS_MODULE="tests.settings")
    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "TIME_ZONE='Europe/Atlantis' is not a time zone" in done.stderr
    env["TIME_ZONE"] = "Europe/Paris"
    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_live_fragments_render_in_the_readers_zone(operator: User, run: Run) -> None:
    """What a websocket pushes (console/consumers.py) reads the same zone as the page."""
    from importlib import import_module

    from django.conf import settings

    from console.consumers import RunsConsumer

    client = signed_in(operator)
    assert client.post("/settings/time-zone/", {"time_zone": "Europe/Paris"}).status_code == 302
    consumer = RunsConsumer()
    store = import_module(settings.SESSION_ENGINE).SessionStore
    consumer.scope = {"user": operator, "session": store(client.session.session_key)}
    fragment = consumer._render()
    assert fragment and "2026-01-15 13:34:56 CET" in fragment
    assert timezone.get_current_timezone_name() == "UTC"  # nothing left active afterwards
