"""Admin registrations that need the console's view of every app: configuration changes to
policies, roles (groups) and people's memberships are audited like the orchestration models'."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError

from approvals import services as approval_services
from approvals.admin import PolicyAdmin, PolicyVersionAdmin
from approvals.models import Policy, PolicyVersion
from console.models import ApiToken
from orchestration.config_audit import AuditedAdmin


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
    class Meta:
        model = PolicyVersion
        fields = ["policy", "tool", "risk_class", "conditions", "decider_group",
                  "required_approvals", "deadline_minutes", "on_expiry", "escalation_group"]

    def clean_conditions(self) -> Any:
        conditions = self.cleaned_data.get("conditions") or []
        if not isinstance(conditions, list) or not all(
                isinstance(c, dict) and c.get("arg") and c.get("op") in approval_services._OPS
                for c in conditions):
            raise ValidationError(f"conditions must be a list of {{\"arg\": ..., \"op\": one of "
                                  f"{sorted(approval_services._OPS)}, \"value\": ...}}")
        return conditions


@admin.register(PolicyVersion)
class PublishingPolicyVersionAdmin(PolicyVersionAdmin):
    """Adding a version publishes it through policy_publish, which records who changed what."""

    form = PolicyVersionForm

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def save_model(self, request: Any, obj: PolicyVersion, form: Any, change: bool) -> None:
        fields = {f: form.cleaned_data[f] for f in PolicyVersionForm.Meta.fields if f != "policy"}
        try:
            version = approval_services.policy_publish(policy=obj.policy,
                                                       acting_user=request.user, **fields)
        except approval_services.ApprovalError as exc:
            raise ValidationError(str(exc)) from None
        obj.pk, obj.number, obj.created_at = version.pk, version.number, version.created_at
        obj._state.adding = False
