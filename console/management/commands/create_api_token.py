"""``create_api_token``: issue an API token for a user (shown once; only its digest is kept)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from console.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token for a user and print it (shown once; only its hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label to tell tokens apart")
        parser.add_argument("--expires-in-days", "--days", dest="days", type=int, default=None,
                            help="expire after this many days (default: never)")

    def handle(self, *args: Any, username: str, name: str, days: int | None,
               **options: Any) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(username=username)
        except User.DoesNotExist:
            raise CommandError(f"no user named {username!r}") from None
        if days is not None and days < 1:
            raise CommandError("--expires-in-days must be at least 1")
        expires = timezone.now() + timedelta(days=days) if days else None
        token, raw = ApiToken.issue(user, name=name, expires_at=expires)
        until = f", expires {expires:%Y-%m-%d %H:%M} UTC" if expires else ""
        self.stderr.write(f"Token {token.prefix}… for {username} created{until}; store it now.")
        self.stdout.write(raw)
