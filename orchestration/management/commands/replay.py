"""``manage.py replay RUN_ID``: re-run a run's engine logic over its ledger, calling nothing."""

from __future__ import annotations

import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from orchestration.models import Run
from orchestration.replay import replay


class Command(BaseCommand):
    help = ("Replay a run from its ledger: recorded model turns and tool results are fed back, "
            "nothing external is called. Exit 0 when the same decisions and states come out, "
            "1 with the first divergence.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id")
        parser.add_argument("--current-policies", action="store_true",
                            help="evaluate today's approval policies instead of those in force "
                                 "when the run started (would the run decide the same now?)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            run = Run.objects.select_related("process_version").get(pk=options["run_id"])
        except (Run.DoesNotExist, ValidationError, ValueError):
            raise CommandError(f"no run {options['run_id']!r}", returncode=2) from None
        result = replay(run, policies_at=timezone.now() if options["current_policies"] else None)
        if result.ok:
            self.stdout.write(result.summary())
            return
        self.stderr.write(result.summary())
        sys.exit(1)
