"""Observers of recorded steps, for metrics. The engine stays free of any metrics library:
``StoreLog.record`` reports each step it checkpointed here, and whoever registered an observer
(orchestration does, when the app is ready) turns it into figures. By default nobody listens.

An observer gets ``(run_id, kind, data, usage)``: the step's kind (``model.called``,
``tool.called``, ``tool.failed``...), the data it recorded (with ``latency_ms`` for a call that
was made) and its usage. It must be quick and must not raise; if it does, the error is dropped:
a step is never lost to its metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

StepObserver = Callable[[str, str, dict[str, Any], Any], None]

_observers: list[StepObserver] = []


def observe(observer: StepObserver) -> None:
    """Register ``observer`` (once; registering it again changes nothing)."""
    if observer not in _observers:
        _observers.append(observer)


def forget(observer: StepObserver) -> None:
    if observer in _observers:
        _observers.remove(observer)


def step_recorded(run_id: str, kind: str, data: dict[str, Any], usage: Any) -> None:
    for observer in tuple(_observers):
        try:
            observer(run_id, kind, data, usage)
        except Exception:  # metrics never break a step
            pass
