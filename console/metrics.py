"""``/metrics``: Prometheus figures, for a scraper on an allowed network with the token.

Two kinds of figures. Counters and histograms (tasks, model and tool calls, tokens and cost,
refusals, escalations, lease takeovers, ledger appends) are counted where the work happens
(orchestration/metrics.py, audit/metrics.py); with PROMETHEUS_MULTIPROC_DIR set, every
process writes its figures there and this view adds them up (so a Celery worker's count shows
here), otherwise it shows this process's own. Gauges about state (runs by status, approvals
pending, the outbox) are read from the database at scrape time, a grouped query each.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from datetime import timedelta
from ipaddress import ip_address

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import DatabaseError
from django.db.models import Count, Min, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from console.client_address import client_address
from console.health import get_only

log = logging.getLogger("switchboard.metrics")

# Pending approvals by how long they have waited: (label, at least this many seconds).
AGE_BANDS = (("under_5m", 0), ("5m_to_1h", 300), ("1h_to_1d", 3600), ("over_1d", 86400))


class StateCollector:
    """Gauges read from the database at scrape time."""

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: collecting needs the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("switchboard_database_up",
                               "1 when the scrape could read the state gauges from the database")
        try:
            families = [*self._runs(), *self._approvals(), *self._outbox()]
        except DatabaseError as exc:
            log.warning("metrics: could not read the database: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    @staticmethod
    def _runs() -> list[Metric]:
        from orchestration.models import Run

        runs = GaugeMetricFamily("switchboard_runs", "Runs by process and status",
                                 labels=["process", "status"])
        for row in (Run.objects.values("process_version__process__slug", "status")
                    .annotate(n=Count("id")).order_by()):
            runs.add_metric([row["process_version__process__slug"] or "", row["status"]],
                            row["n"])
        return [runs]

    @staticmethod
    def _approvals() -> list[Metric]:
        from approvals.models import ApprovalRequest

        now = timezone.now()
        bands = {}
        for i, (label, since) in enumerate(AGE_BANDS):
            window = Q(created_at__lte=now - timedelta(seconds=since))
            if i + 1 < len(AGE_BANDS):
                window &= Q(created_at__gt=now - timedelta(
                    seconds=AGE_BANDS[i + 1][1]))
            bands[label] = Count("id", filter=window)
        pending = GaugeMetricFamily(
            "switchboard_approvals_pending",
            "Approval requests waiting for a decision, by deciding group and age band",
            labels=["group", "age"])
        oldest = GaugeMetricFamily(
            "switchboard_approvals_pending_oldest_seconds",
            "Age of the oldest approval request waiting, by deciding group", labels=["group"])
        for row in (ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING)
                    .values("decider_group__name")
                    .annotate(first=Min("created_at"), **bands).order_by()):
            group = row["decider_group__name"] or ""
            for label, _ in AGE_BANDS:
                pending.add_metric([group, label], row[label])
            oldest.add_metric([group], max(0.0, (now - row["first"]).total_seconds()))
        return [pending, oldest]

    @staticmethod
    def _outbox() -> list[Metric]:
        from orchestration.models import Outbox

        now = timezone.now()
        depth = GaugeMetricFamily(
            "switchboard_outbox_depth", "Outbox messages not yet handled, by topic",
            labels=["topic"])
        lag = GaugeMetricFamily(
            "switchboard_outbox_lag_seconds",
            "Age of the oldest outbox message not yet handled, by topic", labels=["topic"])
        seen = set()
        for row in (Outbox.objects.values("topic").annotate(n=Count("id"),
                                                            first=Min("created_at"))
                    .order_by()):
            seen.add(row["topic"])
            depth.add_metric([row["topic"]], row["n"])
            lag.add_metric([row["topic"]], max(0.0, (now - row["first"]).total_seconds()))
        for topic in sorted({"advance", "execute", "resume", "replay"} - seen):
            depth.add_metric([topic], 0)
            lag.add_metric([topic], 0)
        return [depth, lag]


_state = CollectorRegistry(auto_describe=False)
_state.register(StateCollector())


def _counted() -> CollectorRegistry:
    path = settings.SWITCHBOARD_METRICS_MULTIPROC_DIR
    if not path:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


def exposition() -> bytes:
    """Every figure, in the Prometheus text format."""
    return generate_latest(_counted()) + generate_latest(_state)


def _address_allowed(request: HttpRequest) -> bool:
    try:
        address = ip_address(client_address(request))
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in settings.SWITCHBOARD_METRICS_ALLOW)


def _token_ok(request: HttpRequest) -> bool:
    expected = settings.SWITCHBOARD_METRICS_TOKEN
    if not expected:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode())


@login_not_required
@never_cache
@get_only
def metrics(request: HttpRequest) -> HttpResponse:
    if not _address_allowed(request):
        raise Http404  # not for this network: say nothing about it
    if not _token_ok(request):
        response = HttpResponse("metrics need the bearer token\n", status=403,
                                content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
