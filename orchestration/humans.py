"""The ``human`` executor: a task a member of a group does, answered through an approval
request (reason ``human_task``) with the decision ``respond``.

The outcome rule is the engine's (orchestration/engine/human.py), shared with replay; here it is
only asked with the state of the task's newest request, read from the database."""

from __future__ import annotations

from django.contrib.auth.models import Group

from approvals.models import ApprovalRequest, Reason
from orchestration.engine.human import call_key, human_outcome, no_group
from orchestration.engine.runner import Outcome, TaskContext


def run_human_task(ctx: TaskContext) -> Outcome:
    request = (ApprovalRequest.objects.filter(run_id=ctx.run_id, call_key=call_key(ctx),
                                              reason=Reason.HUMAN_TASK)
               .order_by("-created_at").only("status", "resolution").first())
    if request is None:
        if not Group.objects.filter(name=ctx.spec.executor_ref).exists():
            return no_group(ctx)
        return human_outcome(ctx, status=None)
    resolution = request.resolution or {}
    return human_outcome(ctx, status=request.status, output=resolution.get("output"),
                         note=str(resolution.get("note") or ""))
