"""The runs list: the runs a person may see, filtered (status, process, starter, date range, a
text match on input values), sorted by start time, paginated by an opaque cursor, with counts.
The console's /runs/ page and ``GET /api/v1/runs`` both read it, so they cannot disagree."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from audit import hygiene
from console.access import visible_runs
from orchestration.engine.states import RunStatus
from orchestration.models import Run

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
STATUSES = tuple(s.value for s in RunStatus)


class FilterError(ValueError):
    """A filter value that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class RunFilter:
    status: tuple[str, ...] = ()
    process: str = ""
    starter: str = ""
    since: date | None = None
    until: date | None = None
    q: str = ""
    order: str = "newest"  # or "oldest"
    cursor: str = ""
    limit: int = DEFAULT_LIMIT

    def check(self) -> RunFilter:
        for name in ("process", "starter", "q", "cursor", "order"):
            try:  # a NUL or a lone surrogate cannot go into a query
                hygiene.check(getattr(self, name), name)
            except hygiene.Refused as exc:
                raise FilterError(f"{name}: {exc}") from None
        unknown = [s for s in self.status if s not in STATUSES]
        if unknown:
            raise FilterError(f"status: unknown status {unknown[0]!r} (one of "
                              f"{', '.join(STATUSES)})")
        if self.order not in ("newest", "oldest"):
            raise FilterError("order: must be newest or oldest")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise FilterError(f"limit: must be from 1 to {MAX_LIMIT}")
        if self.since and self.until and self.since > self.until:
            raise FilterError("since: must not be after until")
        if len(self.q) > 200:
            raise FilterError("q: at most 200 characters")
        if self.cursor:
            _decode(self.cursor)
        return self


@dataclass(slots=True)
class RunPage:
    runs: list[Run]
    count: int
    counts: dict[str, int] = field(default_factory=dict)
    next_cursor: str | None = None


def _encode(run: Run) -> str:
    raw = json.dumps([run.created_at.isoformat(), str(run.pk)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, pk = json.loads(raw)
        return datetime.fromisoformat(at), uuid.UUID(pk)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise FilterError("cursor: not a cursor this list gave out") from None


def _day(d: date, *, end: bool = False) -> datetime:
    moment = datetime.combine(d + timedelta(days=1) if end else d, time.min)
    return timezone.make_aware(moment, timezone.get_current_timezone())


def _filtered(user: Any, f: RunFilter) -> QuerySet[Run]:
    qs = visible_runs(user)
    if f.process:
        qs = qs.filter(process_version__process__slug=f.process)
    if f.starter:
        qs = qs.filter(created_by__username=f.starter)
    if f.since:
        qs = qs.filter(created_at__gte=_day(f.since))
    if f.until:
        qs = qs.filter(created_at__lt=_day(f.until, end=True))
    if f.q:
        # A text match on the input's values (and keys): an order id, an email address.
        qs = qs.annotate(input_text=Cast("input", output_field=TextField())).filter(
            input_text__icontains=f.q)
    return qs


def run_list(user: Any, f: RunFilter) -> RunPage:
    """One page of the runs ``user`` may see under ``f`` (checked first)."""
    f.check()
    base = _filtered(user, f)
    # COUNT(*), not COUNT(id): the id is not in the index the count can be answered from.
    counts = {row["status"]: row["n"] for row in base.order_by().values("status").annotate(
        n=Count("*"))}
    qs = base.filter(status__in=f.status) if f.status else base
    count = sum(v for k, v in counts.items() if not f.status or k in f.status)
    newest = f.order == "newest"
    if f.cursor:
        at, pk = _decode(f.cursor)
        after = (Q(created_at__lt=at) | Q(created_at=at, pk__lt=pk)) if newest else (
            Q(created_at__gt=at) | Q(created_at=at, pk__gt=pk))
        qs = qs.filter(after)
    qs = qs.order_by(*(("-created_at", "-id") if newest else ("created_at", "id")))
    rows = list(qs[:f.limit + 1])
    more = len(rows) > f.limit
    rows = rows[:f.limit]
    return RunPage(runs=rows, count=count, counts=counts,
                   next_cursor=_encode(rows[-1]) if more and rows else None)
