"""ASGI entry point. With no REDIS_URL this is a complete standalone server: the worker pool
starts with the app and picks up any run a previous process left unfinished."""

import logging
import os

import django
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
django.setup(set_prefix=False)  # configures logging (console/settings.py LOGGING)
logging.captureWarnings(True)  # a Python warning is a log line like any other (JSON or text)

from console import tracing  # noqa: E402

tracing.setup("switchboard-web")  # before the handler below loads the middleware
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from console.routing import websocket_application  # noqa: E402
from orchestration import standalone  # noqa: E402

standalone.start()

application = ProtocolTypeRouter({
    "http": django_asgi_app,
    "websocket": websocket_application(),
})
