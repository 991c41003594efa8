"""Tasks a person does: ``executor: {type: human, ref: <group>}``.

Pure (no Django): the live executor (orchestration/humans.py) and replay
(orchestration/replay/driver.py) both decide a human task's outcome here, from the state of the
request the task opened (or the absence of one), so replay cannot drift from production.

The first execution parks the task with a ``human_task`` escalation addressed to the group,
carrying what the person needs (the task's title, spec, acceptance criteria and output schema,
the run's input and a summary of what the task's dependencies produced). Once someone responds,
the task is requeued and its next execution finds the response under the same call key and
hands it on as the task's output. Nothing here opens a second request while one is pending.
"""

from __future__ import annotations

import json
from typing import Any

from orchestration.engine.errors import EngineError
from orchestration.engine.refs import resolve
from orchestration.engine.runner import Outcome, TaskContext, stopped_outcome
from orchestration.engine.states import TaskStatus

HUMAN_TASK = "human_task"
# ApprovalRequest.Status values the outcome depends on.
PENDING, RESPONDED = "pending", "responded"
# How much of each dependency's output the person is shown, as JSON text.
SUMMARY_CHARS = 2000


def call_key(ctx: TaskContext) -> str:
    """The key the task's request is filed under: the same for every attempt of the task, so a
    re-execution finds the response to the request an earlier attempt opened."""
    return f"{ctx.run_id}:{ctx.spec.key}:human"


def summary(value: Any, limit: int = SUMMARY_CHARS) -> str:
    """A dependency's output as JSON text, cut to ``limit`` characters."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def brief(ctx: TaskContext) -> dict[str, Any]:
    """What the person needs to do the task (the request's context): with the task's ``args``
    resolved (``$input...``, ``$tasks...``) when the plan gives any."""
    spec = ctx.spec
    try:
        args = resolve(dict(spec.args), run_input=ctx.run_input, outputs=ctx.dep_outputs,
                       strict=False) if spec.args else {}
    except EngineError:
        args = {}
    return {"args": args,"title": spec.title or spec.key, "spec": spec.spec,
            "acceptance": list(spec.acceptance), "output_schema": dict(spec.output_schema),
            "group": spec.executor_ref, "run_input": ctx.run_input,
            "inputs": {key: summary(ctx.dep_outputs[key]) for key in spec.depends_on
                       if key in ctx.dep_outputs}}


def waiting_reason(ctx: TaskContext) -> str:
    return (f"human_task: waiting for {ctx.spec.executor_ref} to do "
            f"{ctx.spec.title or ctx.spec.key!r}")


def no_group(ctx: TaskContext, error: str = "") -> Outcome:
    """The task names a group that does not exist: nobody could ever do it, so a person must
    fix the configuration (an escalation opens); ``error`` is the recorded reason in replay."""
    reason = error or (f"configuration_error: the human task {ctx.spec.key!r} is for group "
                       f"{ctx.spec.executor_ref!r}, which does not exist; create it with the "
                       "people who do this task, then let the task go on")
    return stopped_outcome(reason, key=f"{ctx.run_id}:{ctx.spec.key}:configuration:"
                                       f"{ctx.attempt}")


def human_outcome(ctx: TaskContext, *, status: str | None, output: Any = None,
                  note: str = "") -> Outcome:
    """The task's outcome given its request: none yet (``status`` None) opens one; pending
    keeps waiting on it; responded hands the response on; anything else (rejected, expired,
    stopped, cancelled) ends the task with the reviewer's note."""
    key = call_key(ctx)
    if status is None:
        reason = waiting_reason(ctx)
        return Outcome(status=TaskStatus.WAITING, error=reason, escalation={
            "reason": HUMAN_TASK, "detail": reason, "call_key": key, "tool": "",
            "arguments": {}, "group": ctx.spec.executor_ref, "context": brief(ctx)})
    if status == PENDING:
        # Its request is open already (a re-delivered task): wait on it, open nothing.
        return Outcome(status=TaskStatus.WAITING, error=waiting_reason(ctx), escalation={
            "reason": "awaiting_approval", "call_key": key})
    if status == RESPONDED:
        return Outcome(output=output)
    return Outcome(status=TaskStatus.FAILED,
                   error=f"stopped by a reviewer: {note or f'request {status}'}")
