"""The Django admin for approval policies (editable) and requests with their decisions
(read-only: the services write them)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from approvals.models import ApprovalRequest, Decision, Policy, PolicyVersion
from audit.admin import ReadOnly


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "current_version"]
    # Changed only by publishing a version, which checks it and writes its own event.
    readonly_fields = ["current_version"]


@admin.register(PolicyVersion)
class PolicyVersionAdmin(admin.ModelAdmin):
    list_display = ["policy", "number", "tool", "risk_class", "decider_group",
                    "required_approvals", "deadline_minutes", "on_expiry"]

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # immutable: publish a new version

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # requests and the ledger name it


class DecisionInline(ReadOnly, admin.TabularInline):
    model = Decision
    extra = 0
    can_delete = False
    readonly_fields = ["decider", "kind", "arguments_digest", "note", "created_at"]


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ["id", "reason", "tool", "status", "deadline", "required_approvals"]
    list_filter = ["status", "reason"]
    readonly_fields = [f.name for f in ApprovalRequest._meta.fields]
    inlines = [DecisionInline]
