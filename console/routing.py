"""Websocket routes, behind an Origin check and sign-in (session).

A browser sends a websocket's session cookie whichever page opened it, so the Origin header is
what stops another site's page from reading a signed-in user's live updates. It is compared
exactly, scheme, host and port: ``http://127.0.0.1:9999`` is not ``http://127.0.0.1:8000``, nor is
``https://host`` ``http://host``. Accepted are the page's own origin (the socket's scheme,
``https`` for ``wss`` or behind ``SECURE_PROXY_SSL_HEADER``, and its Host header, whose host
must be in ALLOWED_HOSTS so that a rebound DNS name does not count as the same origin) and the
origins listed in ``SWITCHBOARD_WS_ALLOWED_ORIGINS`` (default: ``CSRF_TRUSTED_ORIGINS``).
"""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.urls import path

from console import consumers
from console.env import normalise_origin

websocket_urlpatterns = [
    path("ws/runs/", consumers.RunsConsumer.as_asgi(), name="ws_runs"),
    path("ws/runs/<uuid:run_id>/", consumers.RunConsumer.as_asgi(), name="ws_run"),
    path("ws/review/", consumers.ReviewConsumer.as_asgi(), name="ws_review"),
]


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    """The header's value; None when it is missing or sent more than once."""
    values = [value for key, value in scope.get("headers", []) if key.lower() == name]
    return values[0].decode("latin-1") if len(values) == 1 else None


def _secure(scope: dict[str, Any]) -> bool:
    if scope.get("scheme") == "wss":
        return True
    if not settings.SECURE_PROXY_SSL_HEADER:
        return False
    meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
    name = meta_name.removeprefix("HTTP_").replace("_", "-").lower().encode()
    value = _header(scope, name)  # read as Django's HttpRequest.is_secure() reads it
    return value is not None and value.split(",", 1)[0].strip() == secure_value


def own_origin(scope: dict[str, Any]) -> str | None:
    """The origin of a page served where this socket connects, if its host is one of ours."""
    host = _header(scope, b"host")
    if host is None:
        return None
    domain, _ = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]  # as Django's HttpRequest.get_host()
    if not domain or not validate_host(domain, allowed):
        return None
    try:
        return normalise_origin(f"{'https' if _secure(scope) else 'http'}://{host}")
    except ValueError:
        return None


def origin_allowed(scope: dict[str, Any]) -> bool:
    raw = _header(scope, b"origin")
    if raw is None:
        return False
    try:
        origin = normalise_origin(raw)
    except ValueError:
        return False  # "null", a path, another scheme
    return origin in settings.SWITCHBOARD_WS_ALLOWED_ORIGINS or origin == own_origin(scope)


class OriginCheck:
    """ASGI middleware: a websocket from an origin not allowed above is closed before it opens."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


def websocket_application() -> Any:
    from channels.routing import URLRouter

    return OriginCheck(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
