"""The executors the engine uses here: registered contracts for tool and function tasks."""

from __future__ import annotations

from functools import cache

from orchestration.builtin_tools import registry
from orchestration.engine.runner import Executor, default_executors


@cache
def executors() -> dict[str, Executor]:
    return default_executors(registry)
