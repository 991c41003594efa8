"""``manage.py fork RUN_ID --step N``: a new run from step N of an old one."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from orchestration import dispatch, services
from orchestration.models import Run


class Command(BaseCommand):
    help = ("Start a new run of the process's current version from task STEP (1-based, plan "
            "order) of RUN_ID: earlier tasks reuse the origin's recorded results, the rest run.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id")
        parser.add_argument("--step", type=int, required=True)
        parser.add_argument("--user", default="", help="username recorded as the fork's starter")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            run = Run.objects.select_related("process_version__process").get(
                pk=options["run_id"])
        except (Run.DoesNotExist, ValidationError, ValueError):
            raise CommandError(f"no run {options['run_id']!r}") from None
        user = None
        if options["user"]:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"no user {options['user']!r}")
        try:
            fork = services.run_fork(run=run, step=options["step"], user=user)
        except services.ServiceError as exc:
            raise CommandError(str(exc)) from None
        if dispatch.standalone():
            dispatch.shutdown(wait=True)  # this process is the worker: finish before exiting
        self.stdout.write(f"fork {fork.pk} of run {run.pk} from step {options['step']} started")
        self.stdout.write(str(fork.pk))
