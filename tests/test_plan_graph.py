"""The run's task graph as server-side SVG, and the checks of each answer on the run page."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders

from console.plan_graph import Node, plan_svg
from tests.test_pipeline_checks import LOOKUP, TOTAL_MATCHES, agent, answer, start


def test_it_lays_tasks_out_in_layers_by_dependency_depth_with_one_edge_per_dependency() -> None:
    svg = str(plan_svg([Node("a", "succeeded", ()), Node("b", "running", ("a",)),
                        Node("c", "pending", ("a",)), Node("d", "waiting", ("b", "c"))]))
    xs = {key: int(x) for key, x in re.findall(
        r'id="plan-node-(\w+)"><title>[^<]*</title><rect x="(\d+)"', svg)}
    assert xs["a"] < xs["b"] == xs["c"] < xs["d"]
    assert svg.count('class="plan-edge"') == 4
    assert 'class="plan-node status-waiting" id="plan-node-d"' in svg
    assert "<script" not in svg and "style=" not in svg


def test_a_delegated_task_sits_after_its_caller_with_a_dashed_edge() -> None:
    svg = str(plan_svg([Node("answer", "waiting", ()),
                        Node("answer_d1", "running", (), delegated_by="answer")]))
    xs = {key: int(x) for key, x in re.findall(
        r'id="plan-node-(\w+)"><title>[^<]*</title><rect x="(\d+)"', svg)}
    assert xs["answer"] < xs["answer_d1"]
    assert svg.count('class="plan-edge plan-delegation"') == 1
    assert "<title>answer delegated answer_d1</title>" in svg


def test_it_escapes_every_label_and_survives_a_cycle_or_an_unknown_dependency() -> None:
    svg = str(plan_svg([Node("x", "pending", ("y", "ghost"), label="<img src=x onerror=1>"),
                        Node("y", "pending", ("x",))], title='"><script>alert(1)</script>'))
    assert "<img" not in svg and "<script>" not in svg
    assert "&lt;img src=x onerror=1&gt;" in svg
    assert str(plan_svg([])) == ""


@pytest.mark.django_db(transaction=True)
def test_the_run_page_shows_the_graph_and_each_attempt_with_its_findings(
        runner: None, demo: None, client: Any) -> None:
    agent("reporter", [LOOKUP, answer("1"), answer("{{last.total|toml}}")], ["lookup_order"])
    run = start({"tools": ["lookup_order"], "checks": [TOTAL_MATCHES]})
    assert run.status == "succeeded", run.error
    client.force_login(User.objects.get(username="operator"))
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="plan-node-report"' in page and "status-succeeded" in page
    assert 'rel="icon" href="/static/img/favicon.svg"' in page
    assert finders.find("img/favicon.svg") is not None
    checks = page[page.index('id="checks"'):page.index('id="trace"')]
    assert checks.count('class="check-round"') == 2
    assert "mismatch: $output.key_facts.total is 1" in checks
    assert "sent back for another attempt" in checks
