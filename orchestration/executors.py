"""The executors the engine uses here: registered contracts for tool and function tasks, and
the governed agent loop for agent tasks."""

from __future__ import annotations

from functools import cache

from orchestration.builtin_tools import registry
from orchestration.engine.runner import Executor, default_executors


@cache
def executors() -> dict[str, Executor]:
    from orchestration.agents import run_agent_task

    table = default_executors(registry)
    table["agent"] = run_agent_task
    return table
