"""The approvals admin: policies (audited like every configuration change), their versions
(published through policy_publish, never edited), and requests and decisions (read-only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin

from approvals import services
from approvals.models import ApprovalRequest, Decision, Policy, PolicyVersion
from audit.admin import ReadOnly
from audit.config import AuditedAdmin

# What makes a policy unable to match, found by apps that know what it names (orchestration
# knows tools and their schemas): each takes the form's cleaned data and returns
# (field, message) pairs. Registered once at start-up through register_reach_check.
ReachCheck = Callable[[dict[str, Any]], list[tuple[str, str]]]
_reach_checks: list[ReachCheck] = []


def register_reach_check(check: ReachCheck) -> None:
    if check not in _reach_checks:
        _reach_checks.append(check)


def policy_reach_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """What would make a well-formed policy never match or never be decided: what the
    registered checks find (unknown tools, arguments a tool does not take), and more approvals
    than its group has people."""
    problems = [p for check in _reach_checks for p in check(data)]
    group, required = data.get("decider_group"), data.get("required_approvals")
    if group is not None and isinstance(required, int):
        people = group.user_set.filter(is_active=True, agent_identity__isnull=True).count()
        if required > people:
            problems.append(("required_approvals",
                             f"{required} approvals are needed but the group {group.name!r} has "
                             f"{people} active people who could approve"))
    return problems


@admin.register(Policy)
class PolicyAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["slug", "name", "current_version"]
    # Changed only by publishing a version, which checks it and writes its own event.
    readonly_fields = ["current_version"]
    audit_exclude = ("current_version",)


class PolicyVersionForm(forms.ModelForm):
    """The model checks the conditions and the number of approvals (so does publishing); here
    also that the policy can match and be decided at all."""

    class Meta:
        model = PolicyVersion
        fields = ["policy", "tool", "risk_class", "conditions", "decider_group",
                  "required_approvals", "deadline_minutes", "on_expiry", "escalation_group"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for field, message in policy_reach_problems(data):
            if field not in self.errors:
                self.add_error(field, message)
        return data


@admin.register(PolicyVersion)
class PolicyVersionAdmin(admin.ModelAdmin):
    """Adding a version publishes it through policy_publish, which records who changed what."""

    form = PolicyVersionForm
    list_display = ["policy", "number", "tool", "risk_class", "decider_group",
                    "required_approvals", "deadline_minutes", "on_expiry"]

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # immutable: publish a new version

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # requests and the ledger name it

    def save_model(self, request: Any, obj: PolicyVersion, form: Any, change: bool) -> None:
        fields = {f: form.cleaned_data[f] for f in PolicyVersionForm.Meta.fields if f != "policy"}
        # The form ran the model's checks, which are all publishing refuses.
        version = services.policy_publish(policy=obj.policy, acting_user=request.user, **fields)
        obj.pk, obj.number, obj.created_at = version.pk, version.number, version.created_at
        obj._state.adding = False


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
