"""Model conversations kept beside the ledger (orchestration.models.Transcript).

The ledger is append-only and hash-chained, so text that must be deleted after a while cannot
live in it: it records a conversation's digest, and the conversation itself (redacted as the
answer is) goes here, written in the same transaction as the call's ledger event
(orchestration/store.py, orchestration/planning.py). The trace page reads it; the sweep
deletes its text once older than ``SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS`` and keeps the row,
so the page can say the prompt expired. Replay never reads it: it works from the ledger."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from audit.statements import Prepared
from hashchain import canonical_json
from orchestration.engine.redaction import redact
from orchestration.models import Transcript
from orchestration.sql import dt_param, uuid_param, write

log = logging.getLogger("switchboard.transcripts")

_INSERT = Prepared(
    "transcript", "INSERT INTO orchestration_transcript (run_id, kind, task, step,"
    " messages_digest, messages, recorded_at) VALUES (%(run)s, %(kind)s, %(task)s, %(step)s,"
    " %(digest)s, %(messages)s, %(at)s)",
    {"run": "uuid", "kind": "text", "task": "text", "step": "integer", "digest": "text",
     "messages": "jsonb", "at": "timestamptz"})
_BATCH = 500


def digest_of(messages: Sequence[Mapping[str, Any]]) -> str:
    """A conversation's digest, in the form the agent loop records as ``messages_digest``."""
    payload = [{"role": m.get("role", ""), "content": m.get("content", ""),
                "tool_call_id": m.get("tool_call_id", ""),
                "tool_calls": list(m.get("tool_calls") or ())} for m in messages]
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def keep(run_id: Any, kind: str, *, task: str, step: int, messages: list[dict[str, Any]],
         digest: str = "") -> None:
    """Keep a call's conversation, redacted (again: every caller's, whatever it passed).
    Called inside the transaction that appends the call's ledger event, with the step's other
    writes (orchestration/sql.py)."""
    messages = redact(messages, [v for v in settings.SWITCHBOARD_CREDENTIALS.values() if v])
    field = Transcript._meta.get_field("messages")
    write(*_INSERT.statement({
        "run": uuid_param(run_id), "kind": kind, "task": task, "step": step,
        "digest": digest or digest_of(messages),
        "messages": field.get_db_prep_save(messages, connection), "at": dt_param(timezone.now())}))


def retention() -> timedelta:
    return timedelta(days=settings.SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS)


def expire(*, now: datetime | None = None, batch: int = _BATCH) -> int:
    """Delete the text of conversations recorded more than the retention ago (the rows stay,
    marked expired, so the trace can say why a prompt is gone). Returns how many; a sweep
    does at most ``batch`` (the next sweep does the rest)."""
    now = now or timezone.now()
    due = list(Transcript.objects.filter(expired_at__isnull=True,
                                         recorded_at__lt=now - retention())
               .order_by("recorded_at").values_list("pk", flat=True)[:batch])
    if not due:
        return 0
    done = Transcript.objects.filter(pk__in=due, expired_at__isnull=True).update(
        messages=None, expired_at=now)
    log.info("deleted the text of %s model conversations older than %s days", done,
             settings.SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS)
    return done


def for_run(run_id: Any, keys: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str, int],
                                                                         list[Transcript]]:
    """The transcripts of a run's calls, by (kind, task, step): one query."""
    wanted = set(keys)
    found: dict[tuple[str, str, int], list[Transcript]] = {}
    if not wanted:
        return found
    tasks = {task for _kind, task, _step in wanted}
    rows = Transcript.objects.filter(
        run_id=uuid.UUID(str(run_id)), task__in=tasks,
        kind__in={kind for kind, _task, _step in wanted},
        step__in={step for _kind, _task, step in wanted}).order_by("id")
    for row in rows:
        key = (row.kind, row.task, row.step)
        if key in wanted:
            found.setdefault(key, []).append(row)
    return found
