"""/health/live and /health/ready: open to probes, and naming what is not ready."""

from __future__ import annotations

import socket
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections

from tests.conftest import DISTRIBUTED, POSTGRES, wait_for


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(client: Any) -> Any:
    return client.get("/health/ready", REMOTE_ADDR="198.51.100.7")


def test_live_answers_ok_without_sign_in(client: Any) -> None:
    response = client.get("/health/live", REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_ready_is_200_with_every_component_ok(runner: None, client: Any) -> None:
    # Distributed: the worker's sweep thread writes its heartbeat as it starts.
    response = wait_for(lambda: (r := ready(client)).status_code == 200 and r,
                        timeout=30, what="/health/ready to say ready")
    body = response.json()
    assert body["status"] == "ok" and body["failing"] == []
    states = {name: state["status"] for name, state in body["components"].items()}
    if DISTRIBUTED:
        assert states == {"database": "ok", "migrations": "ok", "redis": "ok", "broker": "ok",
                          "workers": "ok"}
    else:
        assert states == {"database": "ok", "migrations": "ok", "redis": "not used",
                          "broker": "not used", "workers": "ok"}


def test_ready_is_503_naming_redis_when_redis_is_unreachable(transactional_db: Any,
                                                             client: Any,
                                                             settings: Any) -> None:
    # The shared Redis stays up: the check is pointed at a port nothing listens on.
    settings.SWITCHBOARD_MODE = "distributed"
    settings.REDIS_URL = f"redis://:hunter2@127.0.0.1:{closed_port()}/9"
    response = ready(client)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail" and "redis" in body["failing"]
    assert body["components"]["redis"]["status"] == "fail"
    assert body["components"]["database"]["status"] == "ok"
    assert "hunter2" not in response.content.decode()
    assert "127.0.0.1" not in response.content.decode()


def test_ready_is_503_naming_the_database_when_it_is_unreachable(
        transactional_db: Any, client: Any) -> None:
    # Only this thread's connection is pointed elsewhere; the shared database stays up.
    wrapper = connections[DEFAULT_DB_ALIAS]
    kept = wrapper.settings_dict
    if POSTGRES:
        broken = {**kept, "HOST": "127.0.0.1", "PORT": str(closed_port()), "PASSWORD": "hunter2"}
    else:
        broken = {**kept, "NAME": "/nonexistent/hunter2/db.sqlite3"}
    wrapper.close()
    wrapper.settings_dict = broken
    try:
        response = ready(client)
    finally:
        wrapper.close()
        wrapper.settings_dict = kept
    assert response.status_code == 503
    body = response.json()
    assert "database" in body["failing"]
    assert body["components"]["database"]["status"] == "fail"
    assert "hunter2" not in response.content.decode()


def test_health_needs_no_https_redirect(client: Any, settings: Any) -> None:
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/health/live").status_code == 200
    assert client.get("/").status_code == 301  # everything else is still redirected


def test_ready_is_503_naming_migrations_when_one_is_not_applied(
        transactional_db: Any, client: Any, monkeypatch: Any) -> None:
    from django.db.migrations.executor import MigrationExecutor

    from console import health

    monkeypatch.setattr(health, "_migrations_ok_at", 0.0)
    monkeypatch.setattr(MigrationExecutor, "migration_plan",
                        lambda self, targets: [("a migration", False)])
    response = ready(client)
    assert response.status_code == 503
    body = response.json()
    assert "migrations" in body["failing"]
    assert body["components"]["migrations"] == {"status": "fail",
                                                "detail": "1 migration(s) not applied"}
