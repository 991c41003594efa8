"""The runs table's indexes beyond its keys, each named with the page that reads it, so that
each of those reads stays an index scan (mostly index-only) whatever the number of runs."""

from __future__ import annotations

from django.db import models

from orchestration.engine.states import RunStatus

RUN_INDEXES = [
    # The runs list: newest first, by status, and its counts read from an index alone.
    models.Index(fields=["-created_at", "-id"], name="run_newest"),
    models.Index(fields=["status", "-created_at"], name="run_status_newest"),
    models.Index(fields=["status", "process_version", "created_by"], name="run_status_visible"),
    # The dashboard's figures, each from an index alone, with the columns visible_runs tests:
    # runs finished in its window by outcome (cost), runs created today (spend against caps).
    # Trailing key columns rather than INCLUDE, which SQLite lacks: the scans are the same. Only
    # finished runs in the first, so the updates of runs at work never add entries to it.
    models.Index(fields=["finished_at", "status", "cost", "process_version", "created_by"],
                 name="run_finished_figures",
                 condition=models.Q(status__in=[RunStatus.SUCCEEDED.value, RunStatus.FAILED.value,
                                                RunStatus.CANCELLED.value])),
    models.Index(fields=["created_at", "cost", "budget_cost", "process_version", "created_by"],
                 name="run_created_figures"),
    # The dashboard's latest runs waiting on people.
    models.Index(fields=["-updated_at"], name="run_waiting_latest",
                 condition=models.Q(status__in=[RunStatus.WAITING.value,
                                                RunStatus.AWAITING_PLAN_APPROVAL.value])),
]
