"""Health probes, open to anyone (they name components, never addresses or credentials).

``/health/live``: the process serves requests. ``/health/ready``: it can do its job: the
database answers and has every migration applied; in distributed mode Redis and the broker
answer and a worker wrote its heartbeat recently (orchestration/heartbeat.py); in standalone
mode the in-process worker pool is up. 200 when every component is ok, else 503 with the
failing ones named in ``failing``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, HttpResponseBase, HttpResponseNotAllowed, JsonResponse
from django.views.decorators.cache import never_cache

log = logging.getLogger("switchboard.health")
OK = {"status": "ok"}
NOT_USED = {"status": "not used"}
# Migrations are read from disk and the database; once all are applied, look again after this.
_MIGRATIONS_RECHECK_S = 60.0
_migrations_ok_at = 0.0
_migrations_lock = threading.Lock()


def get_only(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """GET and HEAD only; anything else gets a 405 that says so."""

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.method not in ("GET", "HEAD"):
            return HttpResponseNotAllowed(["GET", "HEAD"], "only GET and HEAD\n",
                                          content_type="text/plain")
        return view(request, *args, **kwargs)

    return guarded


class Unready(Exception):
    """A component is up but not ready; the message is shown as is (keep it generic)."""


def _failed(component: str, exc: Exception) -> dict[str, str]:
    if isinstance(exc, Unready):
        detail = str(exc)
    else:
        # The class of the error only: messages can carry hosts, users or DSNs.
        detail = f"unreachable ({type(exc).__name__})"
        log.warning("health: %s failed: %s", component, exc)
    return {"status": "fail", "detail": detail}


def _check(component: str, probe: Callable[[], None]) -> dict[str, str]:
    try:
        probe()
    except Exception as exc:
        return _failed(component, exc)
    return dict(OK)


def _database() -> None:
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:
        try:
            connection.close()  # the next probe connects afresh
        except Exception:
            pass
        raise


def _migrations() -> None:
    global _migrations_ok_at
    with _migrations_lock:
        if time.monotonic() - _migrations_ok_at < _MIGRATIONS_RECHECK_S:
            return
    executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if plan:
        raise Unready(f"{len(plan)} migration(s) not applied")
    with _migrations_lock:
        _migrations_ok_at = time.monotonic()


def _redis() -> None:
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2,
                                  socket_connect_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


def _broker() -> None:
    from console.celery import app

    with app.connection_for_write(url=settings.CELERY_BROKER_URL) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)


def _workers() -> None:
    from orchestration import heartbeat

    window = settings.SWITCHBOARD_WORKER_HEARTBEAT_SECONDS
    last = heartbeat.latest(settings.REDIS_URL)
    if last is None or time.time() - last > window:
        raise Unready(f"no worker heartbeat in the last {window} s")


def _worker_pool() -> None:
    from orchestration import dispatch

    pool = dispatch.pool()
    if getattr(pool, "_shutdown", False):
        raise Unready("the worker pool is shut down")


def components() -> dict[str, dict[str, str]]:
    found = {"database": _check("database", _database)}
    if found["database"]["status"] == "ok":
        found["migrations"] = _check("migrations", _migrations)
    else:
        found["migrations"] = {"status": "fail", "detail": "not checked: no database"}
    if settings.SWITCHBOARD_MODE == "distributed":
        found["redis"] = _check("redis", _redis)
        found["broker"] = _check("broker", _broker)
        found["workers"] = _check("workers", _workers)
    else:
        found["redis"] = dict(NOT_USED)
        found["broker"] = dict(NOT_USED)
        found["workers"] = _check("workers", _worker_pool)
    return found


@login_not_required
@never_cache
@get_only
def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@login_not_required
@never_cache
@get_only
def ready(request: HttpRequest) -> JsonResponse:
    found = components()
    failing = [name for name, state in found.items() if state["status"] == "fail"]
    return JsonResponse({"status": "fail" if failing else "ok", "mode": settings.SWITCHBOARD_MODE,
                         "failing": failing, "components": found},
                        status=503 if failing else 200)
