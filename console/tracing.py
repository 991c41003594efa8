"""OpenTelemetry set-up: traces go over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set
(console/settings.py reads it); otherwise nothing is installed and the engine's spans
(orchestration/engine/tracing.py) are the API's no-ops.

Called once per process: by console/asgi.py and console/wsgi.py for the web process
(service.name ``switchboard-web``) before the request handler loads its middleware, and by
console/celery.py for a worker (``switchboard-worker``), in each prefork child after the fork,
since the batch span processor's export thread does not survive one. On the same switch, Django
requests get server spans (opentelemetry-instrumentation-django, in the web process) and Celery
messages carry the trace context from where they are sent to the task that runs them
(opentelemetry-instrumentation-celery, in both).
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

_lock = threading.Lock()
_provider: Any = None


def setup(service_name: str, endpoint: str | None = None) -> Any:
    """Install an SDK tracer provider exporting to ``endpoint`` (the settings' by default).
    Returns the provider, or None when tracing is off. Idempotent within a process."""
    global _provider
    if endpoint is None:
        from django.conf import settings

        endpoint = settings.OTEL_EXPORTER_OTLP_ENDPOINT
    if not endpoint:
        return None
    with _lock:
        if _provider is not None:
            return _provider
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        # The endpoint is the collector's base URL; traces go to its /v1/traces.
        exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        _instrument(web=service_name == "switchboard-web")
        atexit.register(shutdown)
        return provider


def _instrument(*, web: bool) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    if web:
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        DjangoInstrumentor().instrument()
    CeleryInstrumentor().instrument()


def _uninstrument() -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    for instrumentor in (DjangoInstrumentor(), CeleryInstrumentor()):
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def flush(timeout_millis: int = 10_000) -> bool:
    """Export what is buffered now (tests, and a worker before it exits)."""
    provider = _provider
    return provider.force_flush(timeout_millis) if provider is not None else True


def shutdown() -> None:
    provider = _provider
    if provider is not None:
        _uninstrument()
        provider.shutdown()


def installed() -> Any:
    """The provider this module installed, or None."""
    return _provider
