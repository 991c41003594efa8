"""Admin registrations of the console's own models and of Django's people and roles, audited
like every configuration change (roles and memberships decide who may approve), and of
reviewers' notifications: webhooks (audited, the secret never copied into the ledger), people's
preferences and the delivery log (read only)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User

from audit.config import AuditedAdmin
from console.models import (
    ApiToken,
    ApprovalNotice,
    NotificationDelivery,
    NotificationEvent,
    NotificationPreference,
    NotificationWebhook,
)


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


class NotificationWebhookForm(forms.ModelForm):
    events = forms.MultipleChoiceField(choices=NotificationEvent.choices,
                                       widget=forms.CheckboxSelectMultiple, required=False)

    class Meta:
        model = NotificationWebhook
        fields = ["name", "url", "active", "events", "secret"]
        widgets = {"secret": forms.PasswordInput(render_value=False)}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (a callable default would otherwise echo the value in a hidden "initial" input)
        self.fields["secret"].show_hidden_initial = False
        if self.instance.pk:  # the secret is never sent back to a browser: blank keeps it
            self.fields["secret"].required = False
            self.fields["secret"].help_text = "Leave blank to keep the current secret."

    def clean_secret(self) -> str:
        secret = self.cleaned_data.get("secret") or ""
        if not secret and self.instance.pk:
            return NotificationWebhook.objects.get(pk=self.instance.pk).secret
        return secret


@admin.register(NotificationWebhook)
class NotificationWebhookAdmin(AuditedAdmin, admin.ModelAdmin):
    form = NotificationWebhookForm
    list_display = ["name", "url", "active", "events", "created_at"]
    list_filter = ["active"]
    audit_what = "notification_webhook"
    audit_exclude = ("secret",)


@admin.register(NotificationPreference)
class NotificationPreferenceAdmin(admin.ModelAdmin):
    """People set their own on the console's Notifications page; admins see them here."""

    list_display = ["user", "email", "updated_at"]
    list_filter = ["email"]
    readonly_fields = ["user", "email", "updated_at"]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class _ReadOnlyLog(admin.ModelAdmin):
    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class DeliveryInline(admin.TabularInline):
    model = NotificationDelivery
    extra = 0
    can_delete = False
    fields = ["channel", "address", "status", "attempts", "response_status", "last_error",
              "finished_at"]
    readonly_fields = fields

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(ApprovalNotice)
class ApprovalNoticeAdmin(_ReadOnlyLog):
    list_display = ["created_at", "event", "request", "tier"]
    list_filter = ["event"]
    readonly_fields = ["id", "request", "event", "tier", "payload", "created_at"]
    inlines = [DeliveryInline]


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(_ReadOnlyLog):
    """The delivery log: every notification, its attempts and how the last one went."""

    list_display = ["created_at", "event", "channel", "address", "status", "attempts",
                    "response_status", "finished_at"]
    list_filter = ["status", "channel", "notice__event"]
    search_fields = ["address", "notice__request__id"]
    list_select_related = ["notice"]
    readonly_fields = ["id", "notice", "channel", "user", "webhook", "address", "status",
                       "attempts", "last_error", "response_status", "created_at",
                       "last_attempt_at", "next_attempt_at", "leased_until", "finished_at"]

    @admin.display(description="event")
    def event(self, obj: NotificationDelivery) -> str:
        return obj.notice.get_event_display()
