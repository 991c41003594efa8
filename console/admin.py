"""Admin registrations that need the console's view of every app: configuration changes to
policies, roles (groups) and people's memberships are audited like the orchestration models'."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User

from approvals import conditions
from approvals import services as approval_services
from approvals.admin import PolicyAdmin, PolicyVersionAdmin
from approvals.models import Policy, PolicyVersion
from console.models import ApiToken
from orchestration.config_audit import AuditedAdmin
from orchestration.models import Tool


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedAdmin, admin.ModelAdmin):
    list_display = ["user", "name", "prefix", "created_at", "expires_at", "revoked_at"]
    readonly_fields = ["prefix", "digest", "created_at", "last_used_at"]
    audit_what = "api_token"

    def has_add_permission(self, request: Any) -> bool:
        return False  # tokens are shown once: create them with `manage.py create_api_token`


admin.site.unregister(Group)
admin.site.unregister(User)


@admin.register(Group)
class AuditedGroupAdmin(AuditedAdmin, GroupAdmin):
    audit_what = "role"


@admin.register(User)
class AuditedUserAdmin(AuditedAdmin, UserAdmin):
    audit_what = "person"


admin.site.unregister(Policy)
admin.site.unregister(PolicyVersion)


@admin.register(Policy)
class AuditedPolicyAdmin(AuditedAdmin, PolicyAdmin):
    audit_exclude = ("current_version",)  # changed by publishing, which writes its own event


class PolicyVersionForm(forms.ModelForm):
    """The model checks the conditions and the number of approvals (so does publishing); here,
    where tools and people are in view, also that the policy can match and be decided at all."""

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


def policy_reach_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """What would make a well-formed policy never match or never be decided: a tool or risk
    class that does not exist, a condition on an argument the tool does not take (or an
    ordering on one that is not a number), more approvals than its group has people."""
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
    group, required = data.get("decider_group"), data.get("required_approvals")
    if group is not None and isinstance(required, int):
        people = group.user_set.filter(is_active=True, agent_identity__isnull=True).count()
        if required > people:
            problems.append(("required_approvals",
                             f"{required} approvals are needed but the group {group.name!r} has "
                             f"{people} active people who could approve"))
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


@admin.register(PolicyVersion)
class PublishingPolicyVersionAdmin(PolicyVersionAdmin):
    """Adding a version publishes it through policy_publish, which records who changed what."""

    form = PolicyVersionForm

    def save_model(self, request: Any, obj: PolicyVersion, form: Any, change: bool) -> None:
        fields = {f: form.cleaned_data[f] for f in PolicyVersionForm.Meta.fields if f != "policy"}
        # The form ran the model's checks, which are all publishing refuses.
        version = approval_services.policy_publish(policy=obj.policy, acting_user=request.user,
                                                   **fields)
        obj.pk, obj.number, obj.created_at = version.pk, version.number, version.created_at
        obj._state.adding = False
