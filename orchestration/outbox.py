"""The transactional outbox: every message a state change needs is a row of that change's own
transaction, so a committed change can never lose the work it implies.

``emit`` writes the row and publishes it once the transaction commits. The handler deletes the
row in the transaction that does the work (``consume``), so a message is done exactly when its
effect is committed; a duplicate finds no row and does nothing. ``relay`` (run by the workers'
sweep) publishes again every row still present after ``SWITCHBOARD_REDELIVER_SECONDS``: a
message the broker lost, one that could not be sent during an outage, or one whose handler died.
"""

from __future__ import annotations

import functools
import logging
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from orchestration import dispatch
from orchestration.models import Outbox

log = logging.getLogger("switchboard.outbox")

_INSERT = ("INSERT INTO orchestration_outbox (topic, run_id, \"key\", request_id, created_at,"
           " due_at, sent) VALUES (%s, %s, %s, %s, %s, %s, 1) RETURNING id")
_DUE = ("SELECT id, topic, run_id, \"key\", request_id FROM orchestration_outbox"
        " WHERE due_at <= %s ORDER BY id LIMIT %s{lock}")


def _redeliver_after() -> timedelta:
    return timedelta(seconds=settings.SWITCHBOARD_REDELIVER_SECONDS)


def _uuid_param(value: Any) -> Any:
    if value is None:
        return None
    value = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    return Outbox._meta.get_field("run_id").get_db_prep_value(value, connection)


def emit(topic: str, run_id: Any, *, key: str = "", request_id: Any = None) -> int:
    """Write a message in the caller's transaction; it is published after commit."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("outbox.emit must be called inside transaction.atomic()")
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_INSERT, [
            topic, _uuid_param(run_id), key, _uuid_param(request_id),
            connection.ops.adapt_datetimefield_value(now),
            connection.ops.adapt_datetimefield_value(now + _redeliver_after())])
        message_id = cursor.fetchone()[0]
    transaction.on_commit(functools.partial(
        publish, message_id, topic, str(run_id), key,
        str(request_id) if request_id is not None else None))
    return message_id


def consume(message_id: int | None) -> bool:
    """Delete the message in the handler's transaction; False when it is already gone (a
    duplicate delivery whose twin has done the work). Messages without an id (sent by hand or by
    an older relay) are always handled: the work itself is idempotent."""
    if message_id is None:
        return True
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM orchestration_outbox WHERE id = %s", [message_id])
        return cursor.rowcount == 1


def publish(message_id: int, topic: str, run_id: str, key: str, request_id: str | None) -> bool:
    """Hand one message to the broker (or the standalone pool). A failure is logged, not
    raised: the row stays, and the relay sends it again when it is due."""
    try:
        dispatch.send(topic, message_id=message_id, run_id=run_id, key=key,
                      request_id=request_id)
        return True
    except Exception as exc:  # the broker is down or unreachable: the relay retries
        log.warning("could not publish %s message %s (run %s %s): %s; the relay will send it "
                    "again", topic, message_id, run_id, key, exc)
        try:  # due at once: the next sweep sends it, not one a whole redelivery period later
            Outbox.objects.filter(pk=message_id).update(due_at=timezone.now())
        except Exception:  # the database is away too: it is due at its original time
            pass
        return False


def relay(*, limit: int = 500, all_now: bool = False) -> int:
    """Publish again every message that is due; returns how many were sent."""
    now = timezone.now()
    cutoff = now + timedelta(days=3650) if all_now else now
    lock = " FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_DUE.format(lock=lock),
                           [connection.ops.adapt_datetimefield_value(cutoff), limit])
            rows = cursor.fetchall()
            if not rows:
                return 0
            ids = [r[0] for r in rows]
            placeholders = ", ".join(["%s"] * len(ids))
            cursor.execute(
                f"UPDATE orchestration_outbox SET due_at = %s, sent = sent + 1"
                f" WHERE id IN ({placeholders})",
                [connection.ops.adapt_datetimefield_value(now + _redeliver_after()), *ids])
    sent = 0
    for message_id, topic, run_id, key, request_id in rows:
        if not publish(message_id, topic, str(uuid.UUID(str(run_id))), key,
                       str(uuid.UUID(str(request_id))) if request_id is not None else None):
            # The broker is away: the rest would fail the same way, each after a connect
            # timeout, holding up the sweep. They are due again at the next round.
            rest = ids[sent + 1:]
            if rest:
                Outbox.objects.filter(pk__in=rest).update(due_at=now)
            break
        sent += 1
    if sent:
        log.info("relayed %d outbox messages", sent)
    return sent


def pending(run_id: Any) -> int:
    return Outbox.objects.filter(run_id=run_id).count()
