"""The console: the web UI, the API and live updates, and the project's settings; importing it
loads the Celery app."""

from console.celery import app as celery_app

__all__ = ["celery_app"]
