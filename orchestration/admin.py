from django.contrib import admin
from guardian.admin import GuardedModelAdmin

from orchestration.models import Agent, Process, ProcessVersion, Run, Task, Tool


@admin.register(Agent)
class AgentAdmin(GuardedModelAdmin):
    list_display = ["slug", "name", "provider", "model_name", "autonomy", "status"]


@admin.register(Tool)
class ToolAdmin(GuardedModelAdmin):
    list_display = ["slug", "implementation", "risk_class", "idempotent", "timeout_s"]


@admin.register(Process)
class ProcessAdmin(GuardedModelAdmin):
    list_display = ["slug", "name", "pattern", "current_version"]


@admin.register(ProcessVersion)
class ProcessVersionAdmin(admin.ModelAdmin):
    list_display = ["process", "number", "hydration_limit", "created_at"]

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


class TaskInline(admin.TabularInline):
    model = Task
    extra = 0
    can_delete = False
    fields = ["key", "executor_type", "executor_ref", "status", "attempts", "error"]
    readonly_fields = fields


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ["id", "process_version", "status", "created_by", "created_at"]
    list_filter = ["status"]
    readonly_fields = [f.name for f in Run._meta.fields]
    inlines = [TaskInline]
