"""Structured logs: with SWITCHBOARD_LOG_FORMAT=json every line, in the web process and in the
worker, is one JSON object, and every line written while working on a run carries its run id
(and the task key, request id and trace id where there is one)."""

from __future__ import annotations

import copy
import json
import logging
import logging.config
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

import logcontext
from orchestration.models import Task
from tests.conftest import (
    DISTRIBUTED,
    ROOT,
    VENDOR_INPUT,
    celery_worker_process,
    wait_for,
    wait_for_run,
)

# The lines that are the work on a run itself: Switchboard's own, and Celery's about a task.
RUN_WORK_LOGGERS = ("switchboard.work", "switchboard.tasks", "celery.app.trace")


class Capture(logging.Handler):
    """Keeps each formatted line with the name of the thread that wrote it."""

    lines: list[tuple[str, str]]

    def __init__(self) -> None:
        super().__init__()
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.threadName or "", self.format(record)))


@pytest.fixture
def json_lines() -> Iterator[Capture]:
    """This process logs through console/settings.py LOGGING with the JSON format, at INFO,
    into a Capture instead of stderr."""
    config = copy.deepcopy(settings.LOGGING)
    config["handlers"]["console"] = {"()": Capture, "formatter": "json", "filters": ["context"]}
    config["root"]["level"] = "INFO"
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("switchboard").level
    logging.config.dictConfig(config)
    [capture] = [h for h in root.handlers if isinstance(h, Capture)]
    try:
        yield capture
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("switchboard").setLevel(saved[2])


@pytest.fixture
def json_worker(transactional_db: Any, demo: None) -> Iterator[Path | None]:
    """Where run work goes, logging JSON: in the distributed pass a Celery worker whose log
    lines (stderr, apart from its start-up banner on stdout) go to the file yielded; in the
    standalone pass the in-process pool (None)."""
    if not DISTRIBUTED:
        yield None
        return
    with celery_worker_process(log_name="celery-worker-json.out",
                               error_log_name="celery-worker-json.log",
                               env_extra={"SWITCHBOARD_LOG_FORMAT": "json"}) as (_proc, path):
        yield path


def parsed(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    return records


def start_run(api: Any) -> Any:
    created = api.post("/api/v1/runs", {"process": "vendor-onboarding",
                                        "input": dict(VENDOR_INPUT)})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"])
    assert run.status == "succeeded", run.error
    return run


def assert_carries_the_run(records: list[dict[str, Any]], run: Any) -> None:
    tasks = set(Task.objects.filter(run_id=run.pk).values_list("key", flat=True))
    assert records, "no line was written while working on the run"
    for record in records:
        assert record.get("run_id") == str(run.pk), record
    finished = {r["task_key"] for r in records if r["logger"] == "switchboard.work"}
    assert finished == tasks  # one line per task, each with its task key


@pytest.mark.django_db(transaction=True)
def test_every_line_is_json_and_the_run_work_carries_the_run_id(
        json_lines: Capture, json_worker: Path | None, api: Any) -> None:
    run = start_run(api)

    if json_worker is None:  # standalone: the work ran on this process's pool threads
        tasks = Task.objects.filter(run_id=run.pk).count()

        def work_records() -> list[dict[str, Any]] | None:
            # A task's line follows the commit that finishes it, so the run's last task may
            # be logged just after the run is seen to have ended.
            lines = list(json_lines.lines)
            records = parsed([line for _thread, line in lines])
            work = [r for (thread, _), r in zip(lines, records, strict=True)
                    if thread.startswith("switchboard-worker")]
            finished = [r for r in work if r["logger"] == "switchboard.work"]
            return work if len(finished) >= tasks else None

        assert_carries_the_run(wait_for(work_records, what="the pool's log lines about the run"),
                               run)
        return

    parsed([line for _thread, line in json_lines.lines])  # the web side's own lines
    tasks = Task.objects.filter(run_id=run.pk).count()

    def worker_records() -> list[dict[str, Any]] | None:
        records = parsed(json_worker.read_text().splitlines())
        done = [r for r in records if r["logger"] == "celery.app.trace"
                and "succeeded" in r["message"] and r.get("run_id") == str(run.pk)]
        finished = [r for r in records if r["logger"] == "switchboard.work"]
        return records if len(finished) >= tasks and done else None

    records = wait_for(worker_records, what="the worker's log lines about the run")
    assert any(r["message"].endswith(" ready.") for r in records)  # Celery's own, as JSON
    assert_carries_the_run([r for r in records if r["logger"].startswith(RUN_WORK_LOGGERS)],
                           run)


@pytest.mark.django_db
def test_a_request_s_lines_carry_its_request_id(json_lines: Capture, api: Any) -> None:
    response = api.get("/api/v1/no-such-thing", HTTP_X_REQUEST_ID="req-logs-1")
    assert response.status_code == 404
    records = [r for r in parsed([line for _thread, line in json_lines.lines])
               if r["logger"] == "django.request"]
    assert records and all(r["request_id"] == "req-logs-1" for r in records), records


def test_the_fields_are_bound_for_a_block_only(json_lines: Capture) -> None:
    log = logging.getLogger("switchboard.tests")
    with logcontext.bound(run_id="run-1", task_key="check"):
        with logcontext.bound(task_key="other"):
            log.info("inner")
        log.info("outer")
    log.info("after")
    records = parsed([line for _thread, line in json_lines.lines])
    fields = [(r.get("run_id"), r.get("task_key")) for r in records
              if r["logger"] == "switchboard.tests"]
    assert fields == [("run-1", "other"), ("run-1", "check"), (None, None)]


def test_the_active_span_s_trace_id_is_on_the_line(json_lines: Capture) -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    context = trace.SpanContext(trace_id=0x1234, span_id=0x56, is_remote=False,
                                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    with trace.use_span(trace.NonRecordingSpan(context)):
        logging.getLogger("switchboard.tests").warning("traced")
    [record] = [r for r in parsed([line for _thread, line in json_lines.lines])
                if r["message"] == "traced"]
    assert record["trace_id"] == f"{0x1234:032x}" and record["span_id"] == f"{0x56:016x}"


def settings_in_a_new_process(env: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "SWITCHBOARD_LOG_FORMAT")}
    environ.update({k: v for k, v in env.items() if v is not None})
    environ.update(DJANGO_SETTINGS_MODULE="console.settings", SECRET_KEY="x" * 50)
    return subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; "
                               "print(settings.SWITCHBOARD_LOG_FORMAT, "
                               "settings.LOGGING['handlers']['console']['formatter'])"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, expected", [
    ({}, "text text"),
    ({"REDIS_URL": "redis://127.0.0.1:6379/0"}, "json json"),
    ({"SWITCHBOARD_LOG_FORMAT": "JSON"}, "json json"),
    ({"REDIS_URL": "redis://127.0.0.1:6379/0", "SWITCHBOARD_LOG_FORMAT": "text"}, "text text"),
])
def test_the_format_defaults_to_the_mode_s(env: dict[str, str], expected: str) -> None:
    done = settings_in_a_new_process(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected.split()


@pytest.mark.parametrize("env, message", [
    ({"SWITCHBOARD_LOG_FORMAT": "yaml"}, "SWITCHBOARD_LOG_FORMAT='yaml' is not one of json, text"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud' is not one of debug, info, warning, error, critical"),
])
def test_a_bad_value_stops_start_up_with_a_clear_message(env: dict[str, str],
                                                         message: str) -> None:
    done = settings_in_a_new_process(env)
    assert done.returncode != 0
    assert message in done.stderr
