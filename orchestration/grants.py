"""Who may call which tool: grants of tools to agents and to processes' service identities
(django-guardian object permissions, each change in the configuration audit), and retiring an
agent, which ends all its grants at once."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from approvals.models import ApprovalRequest, Reason
from audit import config as config_audit
from audit.ledger import actor_of
from orchestration import outbox
from orchestration.engine.states import RUN_TERMINAL, TaskStatus
from orchestration.models import Agent, Process, Task, Tool
from orchestration.plans import plan_for
from orchestration.services import ServiceError, process_identity


def grant_plan_tools(process: Process, *, by: AbstractBaseUser | None) -> list[str]:
    """Grant the process's service identity every tool its current plan's ``tool`` and
    ``function`` steps call; returns the slugs newly granted. Publishing does not grant: an
    admin does (this, or the tool's object permissions in the admin), and revoking one later
    stops those steps at the gate."""
    version = process.current_version
    if version is None:
        return []
    refs = {t.executor_ref for t in plan_for(version).tasks
            if t.executor_type in ("tool", "function")}
    return [tool.slug for tool in Tool.objects.filter(slug__in=refs).order_by("slug")
            if tool_grant(tool=tool, process=process, by=by)]


def _grantee(agent: Agent | None, process: Process | None) -> tuple[Any, str]:
    if agent is not None:
        return agent.user, f"agent:{agent.slug}"
    if process is not None:
        return process_identity(process), f"process:{process.slug}"
    raise ServiceError("a grant needs an agent or a process")


def _grants_of(user: Any, tool: Tool) -> list[str]:
    from guardian.shortcuts import get_user_perms

    return sorted(get_user_perms(user, tool))


def tool_grant(*, tool: Tool, by: AbstractBaseUser | None, agent: Agent | None = None,
               process: Process | None = None) -> bool:
    """Let ``agent`` (or ``process``'s plan-level steps) invoke ``tool``; False if it already
    could (nothing is written)."""
    return _set_grant(*_grantee(agent, process), tool, by, granted=True)


def tool_revoke(*, tool: Tool, by: AbstractBaseUser | None, agent: Agent | None = None,
                process: Process | None = None) -> bool:
    """Stop ``agent`` (or ``process``) invoking ``tool`` from its next call on, a call in
    flight included; False if it could not anyway."""
    return _set_grant(*_grantee(agent, process), tool, by, granted=False)


def _set_grant(user: Any, grantee: str, tool: Tool, by: AbstractBaseUser | None, *,
               granted: bool) -> bool:
    from guardian.shortcuts import assign_perm, remove_perm

    with transaction.atomic():
        old = _grants_of(user, tool)
        if ("invoke_tool" in old) == granted:
            return False
        change = assign_perm if granted else remove_perm
        change("orchestration.invoke_tool", user, tool)
        config_audit.record("grant", model="orchestration.tool", object=tool.slug,
                            grantee=grantee, old={"perms": old},
                            new={"perms": _grants_of(user, tool)}, by=by)
    return True


def agent_retire(*, agent: Agent, by: AbstractBaseUser | None) -> dict[str, int]:
    """Retire an agent: its user is deactivated, so every grant stops working at once.

    Its parked tasks open an ``agent_retired`` escalation now; its queued tasks are executed
    again, which parks them with the same escalation instead of calling the agent."""
    from django.contrib.auth import get_user_model

    with transaction.atomic():
        locked = Agent.objects.select_for_update().get(pk=agent.pk)
        user = get_user_model().objects.select_for_update().get(pk=locked.user_id)
        old = {"status": locked.status, "user_active": user.is_active}
        Agent.objects.filter(pk=locked.pk).update(status=Agent.Status.RETIRED)
        type(user).objects.filter(pk=user.pk).update(is_active=False)
        config_audit.record("agent.retire", model="orchestration.agent", object=locked.slug,
                            old=old, new={"status": Agent.Status.RETIRED, "user_active": False},
                            by=by)
        agent.status, agent.user.is_active = Agent.Status.RETIRED, False
        mine = Task.objects.filter(executor_type="agent", executor_ref=locked.slug).exclude(
            run__status__in=[s.value for s in RUN_TERMINAL])
        escalated = 0
        from orchestration.governance import open_escalation

        for run_id, key in mine.filter(status=TaskStatus.WAITING).values_list("run_id", "key"):
            if ApprovalRequest.objects.filter(run_id=run_id, task_key=key,
                                              reason=Reason.AGENT_RETIRED,
                                              status=ApprovalRequest.Status.PENDING).exists():
                continue
            detail = (f"agent_retired: {locked.slug} was retired while this task waited; "
                      "a person must decide what happens")
            open_escalation(run_id=str(run_id), task_key=key, actor=actor_of(by), escalation={
                "reason": Reason.AGENT_RETIRED, "detail": detail,
                "call_key": f"{run_id}:{key}:retired"})
            escalated += 1
        queued = list(mine.filter(status=TaskStatus.QUEUED).values_list("run_id", "key"))
        for run_id, key in queued:
            outbox.emit("execute", run_id, key=key)
    return {"escalated": escalated, "requeued": len(queued)}
