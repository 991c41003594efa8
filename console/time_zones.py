"""Time zones: the project's (settings.TIME_ZONE) and each person's own choice.

The middleware activates the person's zone for the request, so every ``{{ value|when }}``
(console/templatetags/times.py), date filter and form field reads and writes in it. The choice
is cached in the session, so a page costs no query for it; saving a new choice updates the
cache. Live fragments pushed over websockets render in the same zone (console/consumers.py).
Nothing is stored in a local zone: the database, the ledger and the API stay in UTC."""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from functools import cache
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils import timezone

SESSION_KEY = "console_time_zone"


@cache
def known_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def is_known_zone(name: str) -> bool:
    return name in known_zones()


def choices() -> list[str]:
    """The zones to offer, sorted, UTC first."""
    return ["UTC", *sorted(z for z in known_zones() if z != "UTC")]


def preferred_zone(user: Any, session: Any = None, *, keep: bool = True) -> str:
    """The zone ``user`` chose, or "" for the project's. Read from the session when it holds it,
    otherwise from the database (and then kept in the session, unless ``keep`` is false)."""
    if not getattr(user, "is_authenticated", False):
        return ""
    if session is not None:
        cached = session.get(SESSION_KEY)
        if isinstance(cached, list) and len(cached) == 2 and cached[0] == user.pk:
            return cached[1] if cached[1] == "" or is_known_zone(cached[1]) else ""
    from console.models import TimeZonePreference

    zone = (TimeZonePreference.objects.filter(user=user).values_list("time_zone", flat=True)
            .first() or "")
    zone = zone if is_known_zone(zone) else ""
    if session is not None and keep:
        remember(session, user, zone)
    return zone


def remember(session: Any, user: Any, zone: str) -> None:
    session[SESSION_KEY] = [user.pk, zone]


def on_logged_in(sender: Any, request: HttpRequest | None = None, user: Any = None,
                 **kwargs: Any) -> None:
    session = getattr(request, "session", None)
    if session is not None and user is not None:
        session.pop(SESSION_KEY, None)
        preferred_zone(user, session)


def time_zone_set(*, user: Any, zone: str) -> None:
    """Save ``user``'s choice; "" goes back to the project's zone."""
    from console.models import TimeZonePreference

    if zone and not is_known_zone(zone):
        raise ValueError(f"{zone!r} is not a known time zone")
    if zone:
        TimeZonePreference.objects.update_or_create(user=user, defaults={"time_zone": zone})
    else:
        TimeZonePreference.objects.filter(user=user).delete()


def activate_for(user: Any, session: Any = None) -> None:
    zone = preferred_zone(user, session)
    if zone:
        timezone.activate(zone)
    else:
        timezone.deactivate()


def time_zone_middleware(get_response: Callable[[HttpRequest], HttpResponse]
                         ) -> Callable[[HttpRequest], HttpResponse]:
    """Activate the signed-in person's zone for this request (after AuthenticationMiddleware)."""

    def middleware(request: HttpRequest) -> HttpResponse:
        activate_for(getattr(request, "user", None), getattr(request, "session", None))
        try:
            return get_response(request)
        finally:
            timezone.deactivate()

    return middleware
