"""The console's own rows: API tokens (kept as digests), the idempotency keys of API requests,
and reviewers' notifications (preferences, webhooks, notices and their delivery log)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

TOKEN_PREFIX = "sb_"


def digest_token(raw: str) -> str:
    # Tokens carry 256 bits of randomness, so a plain SHA-256 is enough to store them safely.
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                             related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12, help_text="first characters, to tell tokens apart")
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} {self.prefix}…"

    @classmethod
    def issue(cls, user, *, name: str = "", expires_at=None) -> tuple[ApiToken, str]:  # type: ignore[no-untyped-def]
        raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=raw[:10], digest=digest_token(raw),
                                   expires_at=expires_at)
        return token, raw

    @classmethod
    def authenticate(cls, raw: str):  # type: ignore[no-untyped-def]
        if not raw.startswith(TOKEN_PREFIX):
            return None
        token = (
            cls.objects.select_related("user").filter(digest=digest_token(raw),
                                                      revoked_at__isnull=True).first()
        )
        now = timezone.now()
        if token is None or (token.expires_at and token.expires_at <= now):
            return None
        if not token.user.is_active:
            return None
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            cls.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user


class IdempotencyKey(models.Model):
    """A client's Idempotency-Key and the response it got, so a retry gets the same answer.

    The row is written in the same transaction as the action it guards: it exists exactly when
    the action happened. Only successful (2xx) responses are kept; see console/idempotency.py.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                             related_name="idempotency_keys")
    key = models.CharField(max_length=200)
    request_digest = models.CharField(max_length=64,
                                      help_text="SHA-256 of method, path and canonical body")
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    # Text, not JSONField: PostgreSQL's jsonb reorders keys, and a replay must be the same bytes.
    response_body = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="console_idempotency_user_key"),
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.key}"


def url_problem(url: str) -> str:
    """Empty when ``url`` is a webhook address we send to; otherwise what is wrong with it."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (ValueError when it is not a number in range)
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return "the scheme must be http or https"
    if not parts.hostname:
        return "it names no host"
    if parts.username is not None or parts.password is not None:
        return "no user name or password in the URL; the signature authenticates the sender"
    if parts.fragment:
        return "no #fragment"
    return ""


class NotificationEvent(models.TextChoices):
    OPENED = "approval.opened", "approval request opened"
    DEADLINE_NEAR = "approval.deadline_near", "approval deadline near"


def _all_events() -> list[str]:
    return list(NotificationEvent.values)


def _new_secret() -> str:
    return secrets.token_urlsafe(32)


class NotificationPreference(models.Model):
    """A person's choice about notifications; no row means the defaults (email on)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                                related_name="notification_preference")
    email = models.BooleanField(default=True,
                                help_text="email me about approval requests I may decide")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.user}: email {'on' if self.email else 'off'}"


class NotificationWebhook(models.Model):
    """An endpoint told about approval requests: a JSON POST signed with HMAC-SHA256 over the
    timestamp and the body with ``secret`` (console/notifications.py)."""

    name = models.CharField(max_length=100, unique=True)
    url = models.URLField(max_length=500, help_text="http:// or https://; redirects are not "
                                                    "followed")
    secret = models.CharField(max_length=200, default=_new_secret,
                              help_text="shared with the receiver, which verifies the "
                                        "X-Switchboard-Signature header with it")
    active = models.BooleanField(default=True)
    events = models.JSONField(default=_all_events, blank=True,
                              help_text="which events it receives")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        problem = url_problem(self.url or "")
        if problem:
            errors["url"] = problem
        events = self.events if isinstance(self.events, list) else None
        if events is None or any(e not in NotificationEvent.values for e in events):
            errors["events"] = ("a list of: " + ", ".join(NotificationEvent.values))
        if len(self.secret or "") < 16:
            errors["secret"] = "at least 16 characters"
        if errors:
            raise ValidationError(errors)


class ApprovalNotice(models.Model):
    """One notification of one approval request: at most one per event and tier (the second
    tier, after an escalation, is told again). Its ``payload`` is what every delivery sends."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    request = models.ForeignKey("approvals.ApprovalRequest", on_delete=models.CASCADE,
                                related_name="+")
    event = models.CharField(max_length=30, choices=NotificationEvent.choices)
    tier = models.PositiveSmallIntegerField(default=1)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["request", "event", "tier"],
                                               name="console_notice_once")]

    def __str__(self) -> str:
        return f"{self.event} {self.request_id} (tier {self.tier})"


class NotificationDelivery(models.Model):
    """One notice to one recipient (a person's email or a webhook), and how its sending went:
    the delivery log. Its id is the idempotency id receivers see on every attempt."""

    class Channel(models.TextChoices):
        EMAIL = "email"
        WEBHOOK = "webhook"

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed", "failed after retries"
        SKIPPED = "skipped", "skipped (opted out or switched off)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    notice = models.ForeignKey(ApprovalNotice, on_delete=models.CASCADE,
                               related_name="deliveries")
    channel = models.CharField(max_length=10, choices=Channel.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                             on_delete=models.SET_NULL, related_name="+")
    webhook = models.ForeignKey(NotificationWebhook, null=True, blank=True,
                                on_delete=models.SET_NULL, related_name="deliveries")
    address = models.CharField(max_length=500, help_text="the email address or URL")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING,
                              db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    leased_until = models.DateTimeField(null=True, blank=True,
                                        help_text="an attempt is in progress until then")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "notification deliveries"

    def __str__(self) -> str:
        return f"{self.channel} to {self.address} ({self.status})"


class TimeZonePreference(models.Model):
    """The zone a person reads times in; without one, the project's TIME_ZONE."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE,
                                related_name="time_zone_preference")
    time_zone = models.CharField(max_length=64, help_text="an IANA name, e.g. Europe/Paris")

    def __str__(self) -> str:
        return f"{self.user}: {self.time_zone}"
