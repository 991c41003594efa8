"""The orchestration admin: agents, tools, prices, processes and kill switches, each change
audited on the configuration chain; and what a policy must name of tools to be able to match."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from guardian.admin import GuardedModelAdmin

from approvals import conditions
from approvals.admin import register_reach_check
from audit.admin import ReadOnly
from audit.config import AuditedAdmin
from orchestration import grants, kill_switches, services
from orchestration.models import (
    Agent,
    KillSwitch,
    ModelPrice,
    Process,
    ProcessVersion,
    Run,
    Task,
    Tool,
)


@admin.register(Agent)
class AgentAdmin(AuditedAdmin, GuardedModelAdmin):
    list_display = ["slug", "name", "provider", "model_name", "status"]
    actions = ["retire"]

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # retire instead: runs and the ledger keep naming the agent

    @admin.action(description="Retire the selected agents (their grants stop at once)")
    def retire(self, request: Any, queryset: Any) -> None:
        retired = 0
        for agent in queryset.select_related("user"):
            if agent.status == Agent.Status.RETIRED:
                continue
            grants.agent_retire(agent=agent, by=request.user)
            retired += 1
        self.message_user(request, f"{retired} agent(s) retired; their waiting work is "
                                   "escalated to the review queue.", messages.SUCCESS)


@admin.register(Tool)
class ToolAdmin(AuditedAdmin, GuardedModelAdmin):
    list_display = ["slug", "implementation", "risk_class", "idempotent", "timeout_s",
                    "quota_per_run", "quota_per_window", "rate_limit"]


@admin.register(Process)
class ProcessAdmin(AuditedAdmin, GuardedModelAdmin):
    list_display = ["slug", "name", "pattern", "current_version"]
    # Changed only by publishing a version, which writes its own event.
    readonly_fields = ["current_version"]
    audit_exclude = ("current_version",)


@admin.register(ModelPrice)
class ModelPriceAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["provider", "model_name", "input_per_mtok", "output_per_mtok"]
    audit_what = "price"


class ProcessVersionForm(forms.ModelForm):
    class Meta:
        model = ProcessVersion
        fields = ["process", "plan", "input_schema", "hydration_limit", "budgets"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not self.errors:
            try:
                services.process_validate(plan=data.get("plan") or {},
                                          input_schema=data.get("input_schema") or {},
                                          hydration_limit=data.get("hydration_limit") or 0,
                                          budgets=data.get("budgets") or {})
            except services.ServiceError as exc:
                raise ValidationError(str(exc)) from None
        return data


@admin.register(ProcessVersion)
class ProcessVersionAdmin(admin.ModelAdmin):
    """Adding a version publishes it (with its budgets) through process_publish."""

    form = ProcessVersionForm
    list_display = ["process", "number", "hydration_limit", "created_at"]

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_delete_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def save_model(self, request: Any, obj: ProcessVersion, form: Any, change: bool) -> None:
        version = services.process_publish(
            process=obj.process, plan=obj.plan, input_schema=obj.input_schema,
            hydration_limit=obj.hydration_limit, budgets=obj.budgets,
            by=request.user)
        obj.pk, obj.number, obj.created_at = version.pk, version.number, version.created_at
        obj._state.adding = False


class TaskInline(ReadOnly, admin.TabularInline):
    model = Task
    extra = 0
    can_delete = False
    fields = ["key", "executor_type", "executor_ref", "status", "attempts", "error"]
    readonly_fields = fields


@admin.register(Run)
class RunAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ["id", "process_version", "status", "created_by", "created_at"]
    list_filter = ["status"]
    readonly_fields = [f.name for f in Run._meta.fields]
    inlines = [TaskInline]


@admin.register(KillSwitch)
class KillSwitchAdmin(admin.ModelAdmin):
    """Engage a switch by adding one; release it with the action. Both go through the
    services, so each is a configuration event and a release resumes the paused work. A
    switch is never edited or deleted: its record stays."""

    list_display = ["__str__", "reason", "engaged_by", "engaged_at", "released_by",
                    "released_at"]
    list_filter = ["scope", ("released_at", admin.EmptyFieldListFilter)]
    fields = ["scope", "target", "reason"]
    actions = ["release"]

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_release_permission(self, request: Any) -> bool:
        # Releasing is a change: seeing the switches is not enough.
        return super().has_change_permission(request)

    def save_model(self, request: Any, obj: KillSwitch, form: Any, change: bool) -> None:
        engaged = kill_switches.kill_switch_engage(scope=obj.scope, target=obj.target,
                                              reason=obj.reason, by=request.user)
        obj.pk, obj.engaged_at, obj.engaged_by = engaged.pk, engaged.engaged_at, request.user
        obj._state.adding = False

    @admin.action(description="Release the selected kill switches (paused work resumes)",
                  permissions=["release"])
    def release(self, request: Any, queryset: Any) -> None:
        resumed = sum(kill_switches.kill_switch_release(switch=switch, by=request.user)
                      for switch in queryset.filter(released_at__isnull=True))
        self.message_user(request, f"Released; {resumed} paused task(s) went back to the "
                                   "queue.", messages.SUCCESS)


def policy_tool_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """What would make a policy never match: a tool or risk class that does not exist, a
    condition on an argument the tool does not take (or an ordering on one that is not a
    number)."""
    problems: list[tuple[str, str]] = []
    risk = data.get("risk_class") or ""
    if risk and risk not in Tool.Risk.values:
        problems.append(("risk_class", f"{risk!r} is not a risk class: one of "
                                       f"{', '.join(Tool.Risk.values)}, or blank for any"))
    slug = data.get("tool") or ""
    tool = Tool.objects.filter(slug=slug).first() if slug else None
    if slug and tool is None:
        problems.append(("tool", f"no tool is named {slug!r}: create it first, or leave this "
                                 "blank for any tool"))
    if tool is not None and not conditions.problems(data.get("conditions")):
        for condition in data.get("conditions") or []:
            why = _argument_problem(tool, conditions.parse(condition))
            if why:
                problems.append(("conditions", why))
    return problems


def _argument_problem(tool: Tool, condition: conditions.Condition) -> str:
    """Why ``condition`` can never hold for ``tool``'s arguments, as far as its input schema
    declares them ("" when it can, or when the schema leaves the argument open)."""
    schema: Any = tool.input_schema
    for depth, part in enumerate(condition.path):
        properties = schema.get("properties") if isinstance(schema, dict) else None
        if not isinstance(properties, dict) or not properties:
            return ""
        if part not in properties:
            where = ".".join(condition.path[:depth]) or tool.slug
            return (f"{'.'.join(condition.path)!r} is not an argument of {tool.slug}: "
                    f"{where} takes {', '.join(sorted(properties))}")
        schema = properties[part]
    kinds = schema.get("type") if isinstance(schema, dict) else None
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if (condition.op in conditions.ORDERING and isinstance(kinds, list)
            and not {"number", "integer"} & set(kinds)):
        return (f"{'.'.join(condition.path)!r} is a {'/'.join(kinds)} in {tool.slug}'s schema; "
                f'"{condition.op}" compares numbers')
    return ""


register_reach_check(policy_tool_problems)
