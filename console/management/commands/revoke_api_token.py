"""``revoke_api_token``: revoke an API token by its prefix."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from console.models import ApiToken


class Command(BaseCommand):
    help = "Revoke the API token whose prefix (its first characters, e.g. sb_AbC1234) is given."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="the token's prefix, as create_api_token printed it")

    def handle(self, *args: Any, prefix: str, **options: Any) -> None:
        prefix = prefix.rstrip("…")
        if len(prefix) < 6:
            raise CommandError("give at least the first 6 characters of the token")
        matches = list(ApiToken.objects.select_related("user").filter(
            prefix__startswith=prefix[:10], revoked_at__isnull=True))
        if not matches:
            raise CommandError(f"no active token starts with {prefix!r}")
        if len(matches) > 1:
            owners = ", ".join(f"{t.prefix}… ({t.user})" for t in matches)
            raise CommandError(f"{len(matches)} active tokens match {prefix!r}: {owners}; "
                               "give more characters")
        token = matches[0]
        ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
        self.stdout.write(f"Revoked token {token.prefix}… of {token.user}.")
