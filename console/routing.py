"""Websocket routes, behind sign-in (session) and an Origin check against ALLOWED_HOSTS."""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from console import consumers

websocket_urlpatterns = [
    path("ws/runs/", consumers.RunsConsumer.as_asgi(), name="ws_runs"),
    path("ws/runs/<uuid:run_id>/", consumers.RunConsumer.as_asgi(), name="ws_run"),
    path("ws/review/", consumers.ReviewConsumer.as_asgi(), name="ws_review"),
]


def websocket_application() -> Any:
    from channels.routing import URLRouter

    return AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
