"""Signal handlers: orchestration reacts to approvals without approvals importing it."""

from __future__ import annotations

from typing import Any

from orchestration import outbox


def on_approval_resolved(sender: Any, request: Any, **kwargs: Any) -> None:
    # Called inside the deciding transaction. Resuming never holds the decider's request: it
    # goes to a worker like any run work, as an outbox message of that same transaction.
    outbox.emit("resume", request.run_id, request_id=request.pk)
