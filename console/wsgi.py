"""The WSGI entry point (the ASGI one, console/asgi.py, also serves live updates)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
application = get_wsgi_application()

from console import tracing  # noqa: E402

tracing.setup("switchboard-web")
