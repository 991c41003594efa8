"""Signal handlers: orchestration reacts to approvals without approvals importing it."""

from __future__ import annotations

from typing import Any

from orchestration import dispatch


def on_approval_resolved(sender: Any, request: Any, **kwargs: Any) -> None:
    # Resuming never holds the decider's request: it goes to the worker like any run work.
    dispatch.enqueue_resume(request.pk)
