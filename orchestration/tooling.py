"""The Django side of the gate: contracts from Tool rows, and the gate for an acting identity (an
agent, or a process's service identity for its plan-level ``tool`` and ``function`` steps),
whose grants orchestration/precheck.py asks django-guardian's tables for."""

from __future__ import annotations

from collections.abc import Iterable

import jsonschema
from django.conf import settings

from audit import config as config_audit
from hashchain import canonical_json
from orchestration.builtin_tools import registry
from orchestration.config_checks import tool_problems
from orchestration.engine.contracts import ToolContract
from orchestration.engine.errors import ConfigurationError, ContractError
from orchestration.engine.gate import StoreLog, ToolGate
from orchestration.engine.http_tool import http_contract
from orchestration.engine.llm import ProviderError
from orchestration.engine.runner import Outcome, TaskContext, run_contract_task
from orchestration.governance import DjangoGovernor
from orchestration.models import Process, Task, Tool
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


def secrets() -> list[str]:
    return [v for v in settings.SWITCHBOARD_CREDENTIALS.values() if v]


def contract_for(tool: Tool) -> ToolContract:
    """The contract a Tool row describes. ConfigurationError when no call to it could work:
    the same checks the admin makes (orchestration/config_checks.py), for a row that reached
    the database another way. Built once per version of the row and implementation."""
    python = tool.kind != Tool.Kind.HTTP and tool.implementation in registry
    fn = registry.get(tool.implementation).fn if python else None
    key = (tool.slug, id(fn), canonical_json(config_audit.snapshot(tool)))
    contract = _built.get(key)
    if contract is None:
        contract = _build(tool)
        if len(_built) > 1024:
            _built.clear()
        _built[key] = contract
    return contract


_built: dict[tuple[str, int, str], ToolContract] = {}


def _build(tool: Tool) -> ToolContract:
    problems = [f"{field}: {problem}" for field, found in tool_problems(tool).items()
                for problem in found]
    if problems:
        raise ConfigurationError(f"tool {tool.slug!r} is misconfigured: " + "; ".join(problems))
    try:
        if tool.kind == Tool.Kind.HTTP:
            ref = tool.credential_ref
            return http_contract(
                name=tool.slug, method=tool.http_method or "POST",
                url_template=tool.url_template, input_schema=tool.input_schema,
                output_schema=tool.output_schema, timeout_s=tool.timeout_s,
                idempotent=tool.idempotent,
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
    except jsonschema.SchemaError as exc:
        raise ConfigurationError(
            f"tool {tool.slug!r} has a schema that is not valid JSON Schema: {exc.message}"
        ) from None
    except (ContractError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"tool {tool.slug!r} is misconfigured: {exc}") from None


def contracts(rows: Iterable[Tool]) -> tuple[dict[str, ToolContract], dict[str, str]]:
    """The tools' contracts, and the tools that cannot be called with why: one broken tool
    fails only the calls to it."""
    usable: dict[str, ToolContract] = {}
    unusable: dict[str, str] = {}
    for tool in rows:
        try:
            usable[tool.slug] = contract_for(tool)
        except ConfigurationError as exc:
            unusable[tool.slug] = str(exc)
    return usable, unusable


def run_tool_task(ctx: TaskContext) -> Outcome:
    """A plan-level ``tool`` or ``function`` step: one call through the gate, acting as the
    process's service identity."""
    task = Task.objects.select_related("run__process_version__process", "run__created_by").get(
        run_id=ctx.run_id, key=ctx.spec.key)
    process: Process = task.run.process_version.process
    actor = f"process:{process.slug}"
    rows = {t.slug: t for t in Tool.objects.all()}

    def lookup(name: str) -> ToolContract | None:
        row = rows.get(name)
        return contract_for(row) if row is not None else None  # only the one it calls

    log = StoreLog(DjangoRunStore(), ctx.run_id, ctx.spec.key, ctx.lease)
    governor = DjangoGovernor(run=task.run, task_key=task.key, actor=actor, tools=rows,
                              grantee=process.service_user_id)
    gate = ToolGate(contracts=lookup, log=log, journal=log.journal(), governor=governor,
                    granted=governor.granted, task=task.key, actor=actor, secrets=secrets(),
                    steps=1)
    return run_contract_task(ctx, gate)
