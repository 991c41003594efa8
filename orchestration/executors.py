"""The executors the engine uses here: plan-level tool and function tasks through the gate as
their process's service identity, the governed agent loop for agent tasks, the auditor for a
run's own check, and people (a group's members, through an approval request) for human
tasks."""

from __future__ import annotations

from functools import cache

from orchestration.engine.runner import Executor


@cache
def executors() -> dict[str, Executor]:
    from orchestration.agents import run_agent_task, run_audit_task
    from orchestration.humans import run_human_task
    from orchestration.metrics import instrumented
    from orchestration.tooling import run_tool_task

    return instrumented(
        {"tool": run_tool_task, "function": run_tool_task, "agent": run_agent_task,
         "audit": run_audit_task, "human": run_human_task})
