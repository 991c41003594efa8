"""The console's own rows: API tokens (kept as digests) and the idempotency keys of API
requests."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
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
