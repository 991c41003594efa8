"""The console's URLs: pages, reviews, the ledger, sign-in, the admin and the API."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from console import (
    health,
    ledger_views,
    metrics,
    review,
    run_list_views,
    screens,
    time_zone_views,
    trace_view,
    views,
)
from console.api import api
from console.auth_views import throttled
from console.notification_views import notification_settings

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("runs/", run_list_views.runs, name="run_list"),
    path("runs/start", views.run_start, name="run_start"),
    path("runs/start/form", views.run_start_form, name="run_start_form"),
    path("runs/<uuid:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<uuid:run_id>/cancel", views.run_cancel, name="run_cancel"),
    path("runs/<uuid:run_id>/replay", views.run_replay, name="run_replay"),
    path("runs/<uuid:run_id>/replay/checks", views.run_replay_checks, name="run_replay_checks"),
    path("runs/<uuid:run_id>/fork", views.run_fork, name="run_fork"),
    path("runs/<uuid:run_id>/retry", views.run_retry, name="run_retry"),
    path("runs/<uuid:run_id>/trace/", trace_view.run_trace, name="run_trace"),
    path("runs/<uuid:run_id>/trace/<slug:span_id>", trace_view.run_trace, name="run_trace_span"),
    path("agents/", screens.agent_list, name="agent_list"),
    path("agents/<slug:slug>/", screens.agent_detail, name="agent_detail"),
    path("agents/<slug:slug>/retire", screens.agent_retire, name="agent_retire"),
    path("tools/", screens.tool_list, name="tool_list"),
    path("analytics/", screens.analytics, name="analytics"),
    path("ledger/", ledger_views.ledger, name="ledger"),
    path("review/", review.queue, name="review_queue"),
    path("review/<uuid:request_id>/", review.detail, name="approval_detail"),
    path("review/<uuid:request_id>/decide", review.decide, name="approval_decide"),
    path("settings/notifications", notification_settings, name="notification_settings"),
    path("review/<uuid:request_id>/preview", review.preview, name="approval_preview"),
    path("review/bulk", review.bulk_approve, name="review_bulk"),
    path("settings/time-zone/", time_zone_views.time_zone_settings, name="time_zone_settings"),
    path("login/", throttled(auth_views.LoginView.as_view()), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Before admin.site.urls, so the admin's own sign-in shares the console's throttle.
    path("admin/login/", throttled(admin.site.login)),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    # Probes and scrapes: no sign-in (see console/health.py and console/metrics.py).
    path("health/live", health.live, name="health_live"),
    path("health/ready", health.ready, name="health_ready"),
    path("metrics", metrics.metrics, name="metrics"),
]
