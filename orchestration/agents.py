"""Agent tasks on the Django side: load the agent, its model, its granted tools, and run the
engine's agent loop with every step checkpointed in the ledger."""

from __future__ import annotations

from decimal import Decimal

from orchestration import retrieval
from orchestration.config_checks import agent_problems
from orchestration.engine.agent import AgentSpec, no_cost, run_agent
from orchestration.engine.delegation import Delegator
from orchestration.engine.errors import ConfigurationError
from orchestration.engine.gate import Journal, StoreLog
from orchestration.engine.knowledge import knowledge_for
from orchestration.engine.llm import Model, ProviderError, ScriptedModel
from orchestration.engine.providers import AnthropicModel, OpenAICompatibleModel
from orchestration.engine.redaction import redact
from orchestration.engine.runner import Outcome, TaskContext, stopped_outcome
from orchestration.engine.states import TaskStatus
from orchestration.engine.verify import Verifier, check_run
from orchestration.governance import DjangoGovernor
from orchestration.models import Agent, ModelPrice, Task, Tool
from orchestration.plans import plan_of
from orchestration.store import DjangoRunStore
from orchestration.tooling import CredentialMissing, contracts, credential, secrets


def model_for(agent: Agent) -> Model:
    problems = [f"{field}: {problem}" for field, found in agent_problems(agent).items()
                for problem in found]
    if problems:  # what the admin refuses, for a row that reached the database another way
        raise ProviderError(f"agent {agent.slug!r} is misconfigured: " + "; ".join(problems))
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
    key = f"{ctx.run_id}:{ctx.spec.key}:configuration:{ctx.attempt}"
    try:
        model = model_for(agent)
    except CredentialMissing as exc:
        return stopped_outcome(f"configuration_error: {exc}", key=key)
    except (ProviderError, TypeError, ValueError) as exc:
        # A parameter's value may be quoted in the message: it goes to people, redacted.
        return stopped_outcome(redact(f"configuration_error: agent {agent.slug!r}: {exc}",
                                      secrets()), key=key)
    rows = {t.slug: t for t in Tool.objects.all()}
    tools, unusable = contracts(rows.values())
    task = Task.objects.select_related("run__process_version__process", "run__created_by").get(
        run_id=ctx.run_id, key=ctx.spec.key)
    try:
        max_tokens = int(agent.model_params.get("max_tokens", 1024))
    except (TypeError, ValueError, AttributeError):
        return stopped_outcome(f"configuration_error: agent {agent.slug!r}: max_tokens must be "
                               "a whole number", key=key)
    spec = AgentSpec(slug=agent.slug, instructions=agent.instructions,
                     step_budget=agent.step_budget + task.step_budget_extra,
                     token_budget=agent.token_budget or None, max_output_tokens=max_tokens)
    governor = DjangoGovernor(run=task.run, task_key=task.key, actor=f"agent:{agent.slug}",
                              agent=agent.slug, tools=rows, grantee=agent.user_id,
                              lease=ctx.lease)
    log = StoreLog(DjangoRunStore(), ctx.run_id, ctx.spec.key, ctx.lease)
    verifier = _verifier(ctx, task, log, governor)
    if isinstance(verifier, Outcome):
        return verifier
    delegator = None
    if ctx.spec.delegates:
        delegator = Delegator(store=DjangoRunStore(), run_id=ctx.run_id, spec=ctx.spec,
                              plan=plan_of(task.run), log=log,
                              journal=Journal(), governor=governor,
                              actor=f"agent:{agent.slug}", secrets=secrets(),
                              lease=ctx.lease)
    try:
        knowledge = knowledge_for(ctx, log, lambda: retrieval.task_chunks(ctx, agent.user_id),
                                  actor=f"agent:{agent.slug}")
    except ConfigurationError as exc:
        return stopped_outcome(f"configuration_error: {exc}", key=key)
    return run_agent(ctx, spec, model, tools, log, granted=governor.granted,
                     pricing=_pricing(agent), secrets=secrets(), governor=governor,
                     unusable=unusable, verifier=verifier, delegator=delegator,
                     knowledge=knowledge)


def run_audit_task(ctx: TaskContext) -> Outcome:
    """The run's own check (a plan's ``run_check``), by its auditor."""
    task = Task.objects.select_related("run__process_version__process").get(
        run_id=ctx.run_id, key=ctx.spec.key)
    slug = ctx.spec.executor_ref
    governor = DjangoGovernor(run=task.run, task_key=task.key, actor=f"agent:{slug}",
                              agent=slug, tools={}, lease=ctx.lease)
    log = StoreLog(DjangoRunStore(), ctx.run_id, ctx.spec.key, ctx.lease)
    verifier = _verifier(ctx, task, log, governor, auditor_slug=slug)
    if isinstance(verifier, Outcome):
        return verifier
    verifier.recorded = log.journal().checks
    return check_run(ctx, verifier)


def _verifier(ctx: TaskContext, task: Task, log: StoreLog, governor: DjangoGovernor,
              auditor_slug: str = "") -> Verifier | Outcome:
    """The checks of the task's answer: its sentinel checks, and QC by the plan's auditor when
    the task has acceptance criteria."""
    settings = plan_of(task.run).verification
    auditor: Agent | None = None
    model: Model | None = None
    slug = auditor_slug or settings.auditor
    if slug and ctx.spec.acceptance:
        auditor = Agent.objects.filter(slug=slug).first()
        key = f"{ctx.run_id}:{ctx.spec.key}:auditor:{ctx.attempt}"
        if auditor is None:
            return stopped_outcome(f"configuration_error: the plan's auditor {slug!r} does "
                                   "not exist", key=key)
        try:
            model = model_for(auditor)
        except (CredentialMissing, ProviderError, TypeError, ValueError) as exc:
            return stopped_outcome(redact(f"configuration_error: auditor {auditor.slug!r}: "
                                          f"{exc}", secrets()), key=key)
    return Verifier(spec=ctx.spec, settings=settings, run_id=ctx.run_id,
                    run_input=ctx.run_input, outputs=ctx.dep_outputs, record=log.record,
                    recorded={}, decided=governor.qc_decision, governor=governor,
                    auditor=model, auditor_slug=auditor.slug if auditor else "",
                    pricing=_pricing(auditor) if auditor else no_cost)
