"""Append to, read and verify the ledger. The only code that writes events."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from audit.chain import GENESIS, canonical_json, chain_hash
from audit.models import ChainHead, Event


_HEAD_SQL = "SELECT seq, head_hash FROM audit_chainhead WHERE chain = %s{lock}"


def _lock_clause() -> str:
    return " FOR UPDATE" if connection.features.has_select_for_update else ""


def open_chain(chain: uuid.UUID) -> None:
    ChainHead.objects.get_or_create(chain=chain, defaults={"seq": 0, "head_hash": GENESIS})


def append(chain: uuid.UUID, kind: str, data: dict[str, Any], *, actor: str) -> Event:
    """Append one event. Must run inside the caller's transaction (the state change's own)."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("ledger.append must be called inside transaction.atomic()")
    chain_param = ChainHead._meta.pk.get_db_prep_value(chain, connection)
    with connection.cursor() as cursor:  # plain SQL: this runs for every step of every run
        cursor.execute(_HEAD_SQL.format(lock=_lock_clause()), [chain_param])
        row = cursor.fetchone()
    if row is None:
        head_seq, head_hash = 0, GENESIS
        ChainHead.objects.create(chain=chain, seq=0, head_hash=GENESIS)
    else:
        head_seq, head_hash = row
    at = timezone.now()
    seq = head_seq + 1
    body = canonical_json(
        {"chain": str(chain), "seq": seq, "kind": kind, "at": at.isoformat(), "actor": actor,
         "data": data}
    )
    digest = chain_hash(head_hash, body)
    event = Event.objects.create(
        chain=chain, seq=seq, kind=kind, at=at, actor=actor, data=json.loads(body)["data"],
        body=body, prev_hash=head_hash, hash=digest,
    )
    with connection.cursor() as cursor:
        cursor.execute("UPDATE audit_chainhead SET seq = %s, head_hash = %s WHERE chain = %s",
                       [seq, digest, chain_param])
    return event


@dataclass(frozen=True, slots=True)
class Verification:
    chain: uuid.UUID
    events: int
    ok: bool
    broken_seq: int | None = None
    problem: str = ""


def verify_chain(chain: uuid.UUID) -> Verification:
    prev = GENESIS
    expected_seq = 1
    count = 0
    for event in Event.objects.filter(chain=chain).order_by("seq").iterator(chunk_size=2000):
        count += 1
        if event.seq != expected_seq:
            return Verification(chain, count, False, event.seq,
                                f"sequence gap: expected {expected_seq}, found {event.seq}")
        if event.prev_hash != prev:
            return Verification(chain, count, False, event.seq,
                                "prev_hash does not match the previous event's hash")
        if chain_hash(prev, event.body) != event.hash:
            return Verification(chain, count, False, event.seq,
                                "hash does not match the event's recorded body")
        try:
            body = json.loads(event.body)
        except json.JSONDecodeError:
            return Verification(chain, count, False, event.seq, "body is not valid JSON")
        columns = {"chain": str(event.chain), "seq": event.seq, "kind": event.kind,
                   "actor": event.actor, "at": event.at.isoformat(), "data": event.data}
        for name, value in columns.items():
            if body.get(name) != value:
                return Verification(chain, count, False, event.seq,
                                    f"column {name!r} differs from the hashed body")
        prev = event.hash
        expected_seq += 1
    head = ChainHead.objects.filter(chain=chain).first()
    if head is not None and (head.seq != count or (count and head.head_hash != prev)):
        return Verification(chain, count, False, count + 1 if head.seq > count else count,
                            f"the chain head records {head.seq} events but {count} remain")
    return Verification(chain, count, True)
