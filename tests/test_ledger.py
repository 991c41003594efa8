"""The append-only ledger: hash chains verify, and tampering with them is caught or refused."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from audit import ledger
from audit.chain import GENESIS, canonical_json, chain_hash
from audit.ledger import verify_chain
from audit.models import ChainHead, Event
from tests.conftest import POSTGRES

needs_mutable_ledger = pytest.mark.skipif(
    POSTGRES, reason="PostgreSQL's audit_event trigger rejects the UPDATE/DELETE this tampering "
                     "needs; test_it_refuses_updates_and_deletes_on_postgresql covers that pass")


def _chain(events: int = 4) -> uuid.UUID:
    chain = uuid.uuid4()
    with transaction.atomic():
        ledger.open_chain(chain)
        for i in range(1, events + 1):
            ledger.append(chain, f"test.step{i}", {"n": i, "note": f"step {i}"},
                          actor="user:tester")
    return chain


def _event_id(chain: uuid.UUID, seq: int) -> int:
    return Event.objects.get(chain=chain, seq=seq).pk


def _sql(statement: str, params: list[Any]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def _db(field: str, value: Any) -> Any:
    """A value as this database stores it in an audit_event column (for raw SQL)."""
    return Event._meta.get_field(field).get_db_prep_value(value, connection)


# --- appending and verifying ----------------------------------------------------------------


def test_it_appends_a_verifiable_chain(db: Any) -> None:
    chain = _chain(5)
    events = list(Event.objects.filter(chain=chain).order_by("seq"))
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS
    for previous, event in zip(events, events[1:], strict=False):
        assert event.prev_hash == previous.hash
    for event in events:
        assert event.hash == chain_hash(event.prev_hash, event.body)
        assert json.loads(event.body)["data"] == event.data
    head = ChainHead.objects.get(chain=chain)
    assert (head.seq, head.head_hash) == (5, events[-1].hash)

    result = verify_chain(chain)
    assert result.ok, result.problem
    assert result.events == 5
    assert result.broken_seq is None


def test_it_verifies_an_empty_chain(db: Any) -> None:
    chain = uuid.uuid4()
    with transaction.atomic():
        ledger.open_chain(chain)
    result = verify_chain(chain)
    assert result.ok
    assert result.events == 0


def test_it_keeps_chains_apart(db: Any) -> None:
    first, second = _chain(2), _chain(3)
    assert verify_chain(first).events == 2
    assert verify_chain(second).events == 3
    assert Event.objects.get(chain=second, seq=1).prev_hash == GENESIS


@pytest.mark.django_db(transaction=True)
def test_it_refuses_to_append_outside_a_transaction() -> None:
    chain = uuid.uuid4()
    ledger.open_chain(chain)
    with pytest.raises(RuntimeError, match="transaction.atomic"):
        ledger.append(chain, "test.step", {}, actor="user:tester")
    assert not Event.objects.filter(chain=chain).exists()
    assert ChainHead.objects.get(chain=chain).seq == 0


# --- the model refuses changes --------------------------------------------------------------


def test_it_refuses_to_save_an_existing_event(db: Any) -> None:
    chain = _chain(2)
    event = Event.objects.get(chain=chain, seq=1)
    event.kind = "test.rewritten"
    with pytest.raises(ValueError, match="append-only"):
        event.save()
    assert Event.objects.get(chain=chain, seq=1).kind == "test.step1"
    assert verify_chain(chain).ok


def test_it_refuses_to_delete_an_event(db: Any) -> None:
    chain = _chain(2)
    event = Event.objects.get(chain=chain, seq=2)
    with pytest.raises(ValueError, match="append-only"):
        event.delete()
    assert Event.objects.filter(chain=chain).count() == 2
    assert verify_chain(chain).ok


# --- tampering with raw SQL -----------------------------------------------------------------


@needs_mutable_ledger
def test_it_detects_edited_data(db: Any) -> None:
    chain = _chain(4)
    _sql("UPDATE audit_event SET data = %s WHERE id = %s",
         [_db("data", {"n": 2, "note": "paid twice"}), _event_id(chain, 2)])
    result = verify_chain(chain)
    assert not result.ok
    assert result.broken_seq == 2
    assert "data" in result.problem


@needs_mutable_ledger
def test_it_detects_an_edited_body(db: Any) -> None:
    chain = _chain(4)
    event = Event.objects.get(chain=chain, seq=3)
    body = json.loads(event.body)
    body["data"]["note"] = "rewritten"
    _sql("UPDATE audit_event SET body = %s WHERE id = %s", [canonical_json(body), event.pk])
    result = verify_chain(chain)
    assert not result.ok
    assert result.broken_seq == 3
    assert "hash" in result.problem


@needs_mutable_ledger
def test_it_detects_a_consistently_rewritten_event(db: Any) -> None:
    # Body, data and the event's own hash all rewritten: the next event's prev_hash still breaks.
    chain = _chain(4)
    event = Event.objects.get(chain=chain, seq=2)
    body = json.loads(event.body)
    body["data"]["note"] = "rewritten"
    new_body = canonical_json(body)
    _sql("UPDATE audit_event SET body = %s, data = %s, hash = %s WHERE id = %s",
         [new_body, _db("data", body["data"]), chain_hash(event.prev_hash, new_body), event.pk])
    result = verify_chain(chain)
    assert not result.ok
    assert result.broken_seq == 3
    assert "prev_hash" in result.problem


@needs_mutable_ledger
def test_it_detects_a_deleted_middle_event(db: Any) -> None:
    chain = _chain(4)
    _sql("DELETE FROM audit_event WHERE id = %s", [_event_id(chain, 2)])
    result = verify_chain(chain)
    assert not result.ok
    assert result.broken_seq == 3  # the first event after the gap
    assert "gap" in result.problem


@needs_mutable_ledger
def test_it_detects_a_deleted_last_event(db: Any) -> None:
    chain = _chain(4)
    _sql("DELETE FROM audit_event WHERE id = %s", [_event_id(chain, 4)])
    result = verify_chain(chain)
    assert not result.ok
    assert result.broken_seq == 4  # the chain head still records it
    assert "head" in result.problem


@needs_mutable_ledger
def test_it_detects_swapped_seqs(db: Any) -> None:
    chain = _chain(4)
    second, third = _event_id(chain, 2), _event_id(chain, 3)
    # Three steps so the (chain, seq) unique constraint holds after each statement.
    _sql("UPDATE audit_event SET seq = %s WHERE id = %s", [1000, second])
    _sql("UPDATE audit_event SET seq = %s WHERE id = %s", [2, third])
    _sql("UPDATE audit_event SET seq = %s WHERE id = %s", [3, second])
    result = verify_chain(chain)
    assert not result.ok
    assert result.broken_seq == 2
    assert "prev_hash" in result.problem


def _forge(chain: uuid.UUID, seq: int, prev_hash: str) -> None:
    at = timezone.now()
    data = {"amount": 1_000_000}
    body = canonical_json({"chain": str(chain), "seq": seq, "kind": "refund.issued",
                           "at": at.isoformat(), "actor": "user:mallory", "data": data})
    digest = chain_hash(prev_hash, body)
    gseq, gprev_hash = ledger.global_head()
    _sql("INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, prev_hash, hash, "
         "gseq, gprev_hash, ghash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
         [_db("chain", chain), seq, "refund.issued", _db("at", at), "user:mallory",
          _db("data", data), body, prev_hash, digest, gseq + 1, gprev_hash,
          chain_hash(gprev_hash, digest)])


def test_it_detects_a_forged_event_with_a_wrong_prev_hash(db: Any) -> None:
    chain = _chain(3)
    _forge(chain, 4, "f" * 64)
    assert Event.objects.filter(chain=chain).count() == 4
    result = verify_chain(chain)
    assert not result.ok
    assert result.broken_seq == 4
    assert "prev_hash" in result.problem


def test_it_detects_a_forged_event_the_chain_head_does_not_know(db: Any) -> None:
    # Even a correctly linked forgery is caught while the chain head still records 3 events.
    chain = _chain(3)
    _forge(chain, 4, Event.objects.get(chain=chain, seq=3).hash)
    result = verify_chain(chain)
    assert not result.ok
    assert "head" in result.problem


# --- PostgreSQL refuses changes itself ------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("statement", [
    "UPDATE audit_event SET kind = 'test.rewritten' WHERE id = %s",
    "UPDATE audit_event SET data = '{\"n\": 99}'::jsonb WHERE id = %s",
    "DELETE FROM audit_event WHERE id = %s",
])
def test_it_refuses_updates_and_deletes_on_postgresql(db: Any, statement: str) -> None:
    chain = _chain(3)
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic():
            _sql(statement, [_event_id(chain, 2)])
    # The connection is still usable and the chain untouched.
    assert Event.objects.get(chain=chain, seq=2).kind == "test.step2"
    assert Event.objects.filter(chain=chain).count() == 3
    assert verify_chain(chain).ok


@pytest.mark.postgres
def test_it_refuses_queryset_updates_and_deletes_on_postgresql(db: Any) -> None:
    # QuerySet.update()/delete() bypass Event.save()/delete(); the trigger still stops them.
    chain = _chain(2)
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic():
            Event.objects.filter(chain=chain).update(actor="user:mallory")
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic():
            Event.objects.filter(chain=chain).delete()
    assert verify_chain(chain).ok
