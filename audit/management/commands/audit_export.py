"""Export ledger events as JSON Lines, one event per line in global (gseq) order, for auditors.

Only sealed events have a global position, so it seals every committed event first
(``audit.ledger.seal_all``); events committed after that wait for the next export.

``python audit/verify_export.py FILE`` re-checks such a file without the application."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import IO, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from audit import ledger
from audit.models import Event

FIELDS = ("chain", "seq", "gseq", "kind", "at", "actor", "data", "body", "prev_hash", "hash",
          "gprev_hash", "ghash")


def _moment(option: str, value: str | None) -> datetime | None:
    """An ISO 8601 date or date-time; naive values are in the site's time zone."""
    if value is None:
        return None
    try:
        moment = parse_datetime(value)
        if moment is None and (day := parse_date(value)) is not None:
            moment = datetime(day.year, day.month, day.day)
    except ValueError:
        moment = None
    if moment is None:
        raise CommandError(f"--{option} must be an ISO 8601 date or date-time, not {value!r}",
                           returncode=2)
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


def line(event: Event) -> str:
    row: dict[str, Any] = {name: getattr(event, name) for name in FIELDS}
    row["chain"] = str(event.chain)
    row["at"] = event.at.isoformat()
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class Command(BaseCommand):
    help = ("Write ledger events as JSON Lines (chain, seq, gseq, kind, at, actor, data, body, "
            "prev_hash, hash, gprev_hash, ghash) in global order. --since is inclusive, --until "
            "exclusive.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--run", metavar="ID", help="only this run's chain")
        parser.add_argument("--since", metavar="ISO", help="events at or after this time")
        parser.add_argument("--until", metavar="ISO", help="events before this time")
        parser.add_argument("--output", metavar="PATH", help="write here instead of stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        ledger.seal_all()
        events = Event.objects.filter(gseq__isnull=False).order_by("gseq")
        if options["run"]:
            try:
                events = events.filter(chain=uuid.UUID(options["run"]))
            except ValueError:
                raise CommandError(f"--run must be a run id (a UUID), not {options['run']!r}",
                                   returncode=2) from None
        since, until = _moment("since", options["since"]), _moment("until", options["until"])
        if since is not None:
            events = events.filter(at__gte=since)
        if until is not None:
            events = events.filter(at__lt=until)
        if options["output"]:
            with open(options["output"], "w", encoding="utf-8") as out:
                count = self._write(events, out)
            self.stderr.write(f"wrote {count} event(s) to {options['output']}")
        else:
            self._write(events, self.stdout)

    @staticmethod
    def _write(events: Any, out: IO[str] | OutputWrapper) -> int:
        count = 0
        for event in events.iterator(chunk_size=2000):
            out.write(line(event) + "\n")
            count += 1
        return count
