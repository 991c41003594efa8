"""Admin registrations of the console's own models and of Django's people and roles, audited
like every configuration change (roles and memberships decide who may approve)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User

from audit.config import AuditedAdmin
from console.models import ApiToken


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
