"""The ledger's own figure for /metrics (console/metrics.py): how long an append takes."""

from __future__ import annotations

from prometheus_client import Histogram

LEDGER_APPEND_SECONDS = Histogram(
    "switchboard_ledger_append_seconds",
    "Time to append one event to its run's hash chain (inside the step's transaction; a "
    "batched append is written when its batch ends)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
