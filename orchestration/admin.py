"""The Django admin for orchestration: agents, tools, processes and prices are audited
configuration; process versions are published through the services; runs and tasks are
read-only; kill switches are engaged and released through their services."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from guardian.admin import GuardedModelAdmin

from audit.admin import ReadOnly
from orchestration import grants, kill_switches, services
from orchestration.config_audit import AuditedAdmin
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
    list_display = ["slug", "name", "provider", "model_name", "autonomy", "status"]
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
        fields = ["process", "plan", "input_schema", "hydration_limit", "budgets", "gates"]

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
    """Adding a version publishes it (with its budgets and gates) through process_publish."""

    form = ProcessVersionForm
    list_display = ["process", "number", "hydration_limit", "created_at"]

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_delete_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def save_model(self, request: Any, obj: ProcessVersion, form: Any, change: bool) -> None:
        version = services.process_publish(
            process=obj.process, plan=obj.plan, input_schema=obj.input_schema,
            hydration_limit=obj.hydration_limit, budgets=obj.budgets, gates=obj.gates,
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
