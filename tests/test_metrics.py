"""/metrics: the Prometheus families after demo runs, in either mode, and who may scrape."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from approvals.models import ApprovalRequest
from tests.conftest import DISTRIBUTED, ROOT
from tests.test_replay import REFUND, start

FAMILIES = {
    "switchboard_runs": "gauge",
    "switchboard_tasks_started": "counter",
    "switchboard_tasks_finished": "counter",
    "switchboard_model_call_seconds": "histogram",
    "switchboard_tool_call_seconds": "histogram",
    "switchboard_ledger_append_seconds": "histogram",
    "switchboard_tokens": "counter",
    "switchboard_cost": "counter",
    "switchboard_approvals_pending": "gauge",
    "switchboard_approvals_pending_oldest_seconds": "gauge",
    "switchboard_reservation_refusals": "counter",
    "switchboard_escalations": "counter",
    "switchboard_outbox_depth": "gauge",
    "switchboard_outbox_lag_seconds": "gauge",
    "switchboard_lease_takeovers": "counter",
    "switchboard_database_up": "gauge",
}


@pytest.fixture
def runner(runner: None, demo: None) -> None:
    """The worker, with the demo data seeded."""


TAKEOVERS_BEFORE = [0.0]


@pytest.fixture
def scraped(runner: None, client: Any, settings: Any, worker_metrics_dir: Path) -> str:
    """/metrics after a refund that goes through and one that waits for a reviewer."""
    if DISTRIBUTED:
        # The worker process counts; this process reads what it wrote.
        settings.SWITCHBOARD_METRICS_MULTIPROC_DIR = str(worker_metrics_dir)
    # Counters live as long as the process: an earlier test's lease takeovers are in them.
    before = client.get("/metrics", REMOTE_ADDR="127.0.0.1").content.decode()
    TAKEOVERS_BEFORE[0] = total(samples(before), "switchboard_lease_takeovers_total")
    assert start(client, "refund-exception", {**REFUND, "amount": 40}).status == "succeeded"
    assert start(client, "refund-exception", {**REFUND, "amount": 500}).status == "waiting"
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(value for have, value in found.get(name, [])
               if all(have.get(k) == v for k, v in labels.items()))


def test_it_exposes_every_family_with_plausible_figures(scraped: str) -> None:
    types = {family.name: family.type for family in text_string_to_metric_families(scraped)}
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, f"{name} missing or not a {kind}"
    found = samples(scraped)
    assert total(found, "switchboard_runs", process="refund-exception", status="succeeded") == 1
    assert total(found, "switchboard_runs", process="refund-exception", status="waiting") == 1
    # Counted where the task ran: in the Celery worker process in the distributed pass.
    started = total(found, "switchboard_tasks_started_total")
    finished = total(found, "switchboard_tasks_finished_total", outcome="succeeded")
    assert started >= finished > 0
    assert total(found, "switchboard_tasks_finished_total", outcome="waiting") >= 1
    assert total(found, "switchboard_tool_call_seconds_count", result="called") > 0
    assert total(found, "switchboard_tool_call_seconds_sum") > 0
    assert total(found, "switchboard_model_call_seconds_count") > 0
    assert total(found, "switchboard_ledger_append_seconds_count") > 0
    tokens = total(found, "switchboard_tokens_total", process="refund-exception")
    assert tokens > 0
    assert total(found, "switchboard_tokens_total", direction="in") > 0
    agents = {labels["agent"] for labels, _ in found["switchboard_tokens_total"]}
    assert "refund-investigator" in agents
    group = ApprovalRequest.objects.get(status="pending").decider_group.name
    assert total(found, "switchboard_approvals_pending", group=group, age="under_5m") == 1
    assert total(found, "switchboard_approvals_pending", age="over_1d") == 0
    assert 0 <= total(found, "switchboard_approvals_pending_oldest_seconds", group=group) < 300
    assert total(found, "switchboard_database_up") == 1
    # Two healthy runs take nothing over.
    assert total(found, "switchboard_lease_takeovers_total") == TAKEOVERS_BEFORE[0]
    assert "switchboard_outbox_depth" in found and "switchboard_outbox_lag_seconds" in found


def test_the_grafana_dashboard_queries_only_exposed_metrics(scraped: str) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    assert exprs, "the dashboard queries nothing"
    queried = {name for expr in exprs for name in re.findall(r"switchboard_[a-z0-9_]+", expr)}
    exposed = set(samples(scraped))
    assert queried - exposed == set()
    assert {name.removesuffix("_total") for name in queried} >= {
        "switchboard_runs", "switchboard_tasks_finished", "switchboard_tokens"}


@pytest.mark.django_db
def test_a_disallowed_address_gets_404_and_a_missing_token_403(client: Any,
                                                               settings: Any) -> None:
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 404
    settings.SWITCHBOARD_METRICS_TOKEN = "t" * 32
    refused = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert refused.status_code == 403 and b"switchboard_" not in refused.content
    wrong = client.get("/metrics", REMOTE_ADDR="127.0.0.1", HTTP_AUTHORIZATION="Bearer nope")
    assert wrong.status_code == 403
    good = client.get("/metrics", REMOTE_ADDR="127.0.0.1",
                      HTTP_AUTHORIZATION=f"Bearer {'t' * 32}")
    assert good.status_code == 200 and b"switchboard_runs" in good.content
    # The token does not open /metrics to an address outside the allowed networks.
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9",
                      HTTP_AUTHORIZATION=f"Bearer {'t' * 32}").status_code == 404
    settings.SWITCHBOARD_METRICS_ALLOW = ()
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1",
                      HTTP_AUTHORIZATION=f"Bearer {'t' * 32}").status_code == 404


@pytest.mark.django_db
def test_a_forwarded_address_counts_only_behind_a_trusted_proxy(client: Any,
                                                                settings: Any) -> None:
    from ipaddress import ip_network

    settings.SWITCHBOARD_METRICS_ALLOW = (ip_network("10.9.0.0/16"),)
    forged = client.get("/metrics", REMOTE_ADDR="203.0.113.9", HTTP_X_FORWARDED_FOR="10.9.0.5")
    assert forged.status_code == 404
    settings.SWITCHBOARD_TRUSTED_PROXIES = (ip_network("203.0.113.9/32"),)
    proxied = client.get("/metrics", REMOTE_ADDR="203.0.113.9", HTTP_X_FORWARDED_FOR="10.9.0.5")
    assert proxied.status_code == 200


@pytest.mark.django_db
def test_metrics_need_no_sign_in_and_refuse_other_methods(client: Any) -> None:
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200 and "Location" not in response
    assert client.post("/metrics", REMOTE_ADDR="127.0.0.1").status_code in (403, 405)


@pytest.mark.parametrize("env, message", [
    ({"SWITCHBOARD_METRICS_ALLOW": "10.0.0.0/33"}, "SWITCHBOARD_METRICS_ALLOW"),
    ({"SWITCHBOARD_METRICS_TOKEN": "short"}, "SWITCHBOARD_METRICS_TOKEN"),
    ({"PROMETHEUS_MULTIPROC_DIR": "/nonexistent/metrics"}, "PROMETHEUS_MULTIPROC_DIR"),
])
def test_a_bad_setting_stops_start_up(env: dict[str, str], message: str) -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import console.settings"], cwd=ROOT, capture_output=True,
        env={**os.environ, "DEBUG": "true", **env}, timeout=60)
    assert result.returncode != 0
    assert b"ImproperlyConfigured" in result.stderr and message.encode() in result.stderr


def test_refusals_count_by_their_reason_code() -> None:
    from orchestration import metrics

    def count(reason: str) -> float:
        return metrics.RESERVATION_REFUSALS.labels(reason)._value.get()

    before = count("budget_exhausted"), count("other")
    metrics.refused("budget_exhausted: run tokens 10 used + 0 reserved + 5 needed > cap 12")
    metrics.refused("a message with no reason code")
    metrics.refused("")
    assert (count("budget_exhausted"), count("other")) == (before[0] + 1, before[1] + 1)


def test_an_instrumented_executor_counts_its_start_and_how_it_ended() -> None:
    from orchestration import metrics
    from orchestration.engine.runner import Outcome

    def boom(ctx: Any) -> Outcome:
        raise RuntimeError("an executor's own bug")

    wrapped = metrics.instrumented({"agent": lambda ctx: Outcome(status="failed"),
                                    "tool": boom})

    def started(kind: str) -> float:
        return metrics.TASKS_STARTED.labels(kind)._value.get()

    def finished(kind: str, outcome: str) -> float:
        return metrics.TASKS_FINISHED.labels(kind, outcome)._value.get()

    before = started("agent"), finished("agent", "failed"), finished("tool", "error")
    assert wrapped["agent"](None).status == "failed"
    with pytest.raises(RuntimeError):
        wrapped["tool"](None)
    assert (started("agent"), finished("agent", "failed"), finished("tool", "error")) == (
        before[0] + 1, before[1] + 1, before[2] + 1)
