"""Who may see and do what. One helper per object, used by views and the API alike."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet
from django.http import Http404

from orchestration.models import Process, ProcessVersion, Run

ADMIN_GROUP = "admin"
ROLES = ("operator", "reviewer", ADMIN_GROUP)


def is_console_user(user) -> bool:  # type: ignore[no-untyped-def]
    """Signed in and holding a console role (or a superuser)."""
    return bool(user.is_authenticated and (
        user.is_superuser or user.groups.filter(name__in=ROLES).exists()))


def is_admin(user) -> bool:  # type: ignore[no-untyped-def]
    """A superuser or a member of the admin group (looked up once per request's user)."""
    if not user.is_authenticated:
        return False
    if user.is_superuser:
        return True
    cached = getattr(user, "_is_admin", None)
    if cached is None:
        cached = user._is_admin = user.groups.filter(name=ADMIN_GROUP).exists()
    return bool(cached)


def can_start(user, process: Process) -> bool:  # type: ignore[no-untyped-def]
    return bool(
        user.is_authenticated
        and (user.has_perm("orchestration.start_run") or
             user.has_perm("orchestration.start_run", process))
    )


def startable_processes(user) -> QuerySet[Process]:  # type: ignore[no-untyped-def]
    qs = Process.objects.filter(current_version__isnull=False).select_related("current_version")
    if user.has_perm("orchestration.start_run"):
        return qs.order_by("slug")
    from guardian.shortcuts import get_objects_for_user

    return get_objects_for_user(user, "orchestration.start_run", qs, accept_global_perms=False)


def visible_runs(user) -> QuerySet[Run]:  # type: ignore[no-untyped-def]
    """Runs a person started, runs of processes they may start (their team's), or all of them
    with the ``view_run`` model permission (reviewers, admins)."""
    qs = Run.objects.select_related("process_version__process", "created_by")
    if not user.is_authenticated or not user.is_active:
        return qs.none()
    if user.has_perm("orchestration.view_run"):
        return qs
    processes = startable_processes(user).values("pk")
    # By version ids, not by a join: the runs list counts every visible run by status, which
    # stays an index-only scan (run_status_visible) when the test needs no other table.
    versions = ProcessVersion.objects.filter(process__in=processes).values("pk")
    return qs.filter(Q(created_by=user) | Q(process_version__in=versions))


def get_run_for_user(user, run_id) -> Run:  # type: ignore[no-untyped-def]
    """The run if this user may see it; 404 otherwise (never reveal that it exists)."""
    try:
        return visible_runs(user).get(pk=run_id)
    except (Run.DoesNotExist, ValidationError, ValueError, TypeError):
        raise Http404("no such run") from None


def can_cancel(user, run: Run) -> bool:  # type: ignore[no-untyped-def]
    """The starter, anyone who may start runs of its process, or ``change_run`` (admins)."""
    if not user.is_authenticated or not user.is_active:
        return False
    return bool(user.has_perm("orchestration.change_run") or run.created_by_id == user.pk
                or can_start(user, run.process_version.process))


def can_replay(user, run: Run) -> bool:  # type: ignore[no-untyped-def]
    """Who may start a replay check of a run (it takes a worker): those who may act on it, as
    for cancelling. Everyone who sees the run sees the checks' verdicts."""
    return can_cancel(user, run)
