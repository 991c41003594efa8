"""Agent tasks on the Django side: load the agent, its model, its granted tools, and run the
engine's agent loop with every step checkpointed in the ledger."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection

from orchestration.builtin_tools import registry
from orchestration.engine.agent import AgentSpec, Journal, run_agent
from orchestration.engine.contracts import ToolContract
from orchestration.engine.errors import ContractError
from orchestration.engine.governance import Usage
from orchestration.engine.http_tool import http_contract
from orchestration.engine.llm import Model, ProviderError, ScriptedModel
from orchestration.engine.providers import AnthropicModel, OpenAICompatibleModel
from orchestration.engine.runner import Outcome, TaskContext
from orchestration.engine.states import TaskStatus
from orchestration.governance import DjangoGovernor
from orchestration.models import Agent, ModelPrice, Task, Tool
from orchestration.store import DjangoRunStore


class CredentialMissing(ProviderError):
    pass


def credential(name: str) -> str:
    if not name:
        return ""
    try:
        return settings.SWITCHBOARD_CREDENTIALS[name.lower()]
    except KeyError:
        raise CredentialMissing(
            f"credential {name!r} is not configured (set SWITCHBOARD_CREDENTIAL_{name.upper()})"
        ) from None


def model_for(agent: Agent) -> Model:
    params = dict(agent.model_params or {})
    if agent.provider == "scripted":
        script = params.get("script")
        if not isinstance(script, list) or not script:
            raise ProviderError(f"agent {agent.slug!r} is scripted but has no script")
        return ScriptedModel(script, name=agent.model_name or "scripted")
    common = {
        "model": agent.model_name,
        "api_key": credential(agent.credential_ref),
        "base_url": params.pop("base_url", None),
        "timeout_s": float(params.pop("timeout_s", 60)),
        "max_retries": int(params.pop("max_retries", 2)),
        "params": params,
    }
    if agent.provider == "openai":
        return OpenAICompatibleModel(**common)
    if agent.provider == "anthropic":
        return AnthropicModel(**common)
    raise ProviderError(f"agent {agent.slug!r} names unknown provider {agent.provider!r}")


def contract_for(tool: Tool) -> ToolContract:
    if tool.kind == Tool.Kind.HTTP:
        ref = tool.credential_ref
        return http_contract(
            name=tool.slug, method=tool.http_method or "POST", url_template=tool.url_template,
            input_schema=tool.input_schema, output_schema=tool.output_schema,
            timeout_s=tool.timeout_s, idempotent=tool.idempotent,
            credential=(lambda: credential(ref)) if ref else None,
            description=tool.description, cost_per_call=tool.cost_per_call,
        )
    base = registry.get(tool.implementation)
    return ToolContract(
        name=tool.slug, fn=base.fn, input_schema=tool.input_schema,
        output_schema=tool.output_schema, timeout_s=tool.timeout_s,
        idempotent=tool.idempotent, description=tool.description or base.description,
        cost_per_call=tool.cost_per_call,
    )


class _Log:
    def __init__(self, store: DjangoRunStore, run_id: str, key: str, lease: str = "") -> None:
        self.store, self.run_id, self.key, self.lease = store, run_id, key, lease

    def journal(self) -> Journal:
        return self.store.journal(self.run_id, self.key)

    def record(self, kind: str, data: dict[str, Any], *, usage: Usage,
               reserved: Usage | None = None) -> None:
        self.store.record_step(self.run_id, kind, data, usage=usage, reserved=reserved,
                               lease=self.lease)


_GRANT_SQL = """
SELECT 1 FROM auth_user u
 WHERE u.id = %(user)s AND u.is_active
   AND (u.is_superuser
        OR EXISTS (SELECT 1 FROM guardian_userobjectpermission p
                    WHERE p.user_id = u.id AND p.permission_id = %(perm)s
                      AND p.content_type_id = %(ct)s AND p.object_pk = %(obj)s)
        OR EXISTS (SELECT 1 FROM guardian_groupobjectpermission g
                     JOIN auth_user_groups ug ON ug.group_id = g.group_id
                    WHERE ug.user_id = u.id AND g.permission_id = %(perm)s
                      AND g.content_type_id = %(ct)s AND g.object_pk = %(obj)s))
"""


def grant_checker(user_id: int) -> Callable[[Tool], bool]:
    """Whether the active user holds ``invoke_tool`` on a tool, directly or through a group,
    as django-guardian grants it. One small query per check (this runs before every call)."""
    ct = ContentType.objects.get_for_model(Tool)
    perm = Permission.objects.get(content_type=ct, codename="invoke_tool").pk

    def holds(tool: Tool) -> bool:
        with connection.cursor() as cursor:
            cursor.execute(_GRANT_SQL, {"user": user_id, "perm": perm, "ct": ct.pk,
                                        "obj": str(tool.pk)})
            return cursor.fetchone() is not None

    return holds


def _pricing(agent: Agent):  # type: ignore[no-untyped-def]
    price = ModelPrice.objects.filter(provider=agent.provider,
                                      model_name=agent.model_name).first()
    if price is None:
        return lambda tokens_in, tokens_out: Decimal("0")
    return price.cost


def run_agent_task(ctx: TaskContext) -> Outcome:
    agent = Agent.objects.select_related("user").filter(slug=ctx.spec.executor_ref).first()
    if agent is None:
        return Outcome(status=TaskStatus.FAILED,
                       error=f"no agent named {ctx.spec.executor_ref!r}")
    if agent.status != Agent.Status.ACTIVE or not agent.user.is_active:
        reason = f"agent_retired: {agent.slug} is retired; a person must decide what happens"
        return Outcome(status=TaskStatus.WAITING, error=reason,
                       escalation={"reason": "agent_retired", "detail": reason,
                                   "call_key": f"{ctx.run_id}:{ctx.spec.key}:retired"})
    try:
        model = model_for(agent)
        tools = {t.slug: contract_for(t) for t in Tool.objects.all()}
    except (ProviderError, ContractError) as exc:
        return Outcome(status=TaskStatus.FAILED, error=str(exc))
    user = agent.user
    by_slug = {t.slug: t for t in Tool.objects.all()}

    holds = grant_checker(user.pk)

    def granted(name: str) -> bool:
        # Checked on every call: a revoked grant or a retired agent stops working at once.
        tool = by_slug.get(name)
        return tool is not None and holds(tool)

    secrets = [v for v in settings.SWITCHBOARD_CREDENTIALS.values() if v]
    task = Task.objects.select_related("run__process_version__process", "run__created_by").get(
        run_id=ctx.run_id, key=ctx.spec.key)
    spec = AgentSpec(slug=agent.slug, instructions=agent.instructions,
                     step_budget=agent.step_budget + task.step_budget_extra,
                     token_budget=agent.token_budget or None,
                     max_output_tokens=int(agent.model_params.get("max_tokens", 1024)))
    governor = DjangoGovernor(run=task.run, task_key=task.key, actor=f"agent:{agent.slug}")
    log = _Log(DjangoRunStore(), ctx.run_id, ctx.spec.key, ctx.lease)
    return run_agent(ctx, spec, model, tools, log, granted=granted, pricing=_pricing(agent),
                     secrets=secrets, governor=governor)
