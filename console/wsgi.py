"""The WSGI entry point (the ASGI one, console/asgi.py, also serves live updates)."""

import os

import django
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
django.setup(set_prefix=False)

from console import tracing  # noqa: E402

tracing.setup("switchboard-web")  # before the handler below loads the middleware
application = get_wsgi_application()
