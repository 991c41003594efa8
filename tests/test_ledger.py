"""The append-only ledger: hash chains verify, tampering with them is caught or refused, and
the sequencer (ledger.seal) links committed events into the global chain, also under
concurrent appends and concurrent sealing."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import DatabaseError, IntegrityError, OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit import ledger, verify
from audit.models import ChainHead, Event
from audit.verify import verify_chain, verify_global
from hashchain import GENESIS, canonical_json, chain_hash, global_hash
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


@needs_mutable_ledger
def test_it_detects_an_edited_event_once_it_is_sealed(db: Any) -> None:
    # Sealing commits the global chain to the event's hash; it does not launder an edit made
    # before it, since the run chain still recomputes the body.
    chain = _chain(3)
    _sql("UPDATE audit_event SET actor = %s WHERE id = %s", ["user:mallory", _event_id(chain, 2)])
    ledger.seal_all()
    result = verify_chain(chain)
    assert (result.ok, result.broken_seq) == (False, 2)
    assert "actor" in result.problem
    sealed_gseq = Event.objects.get(chain=chain, seq=2).gseq
    assert sealed_gseq is not None and result.broken_gseq == sealed_gseq


@needs_mutable_ledger
def test_it_detects_a_rewritten_global_link(db: Any) -> None:
    chain = _chain(3)
    ledger.seal_all()
    target = Event.objects.get(chain=chain, seq=2)
    _sql("UPDATE audit_event SET ghash = %s WHERE id = %s", ["e" * 64, target.pk])
    result = verify_global()
    assert not result.ok
    assert result.broken_gseq == target.gseq  # its own ghash no longer recomputes
    assert not verify_chain(chain).ok  # the run chain reports the bad ghash too


def _forge(chain: uuid.UUID, seq: int, prev_hash: str) -> None:
    at = timezone.now()
    data = {"amount": 1_000_000}
    body = canonical_json({"chain": str(chain), "seq": seq, "kind": "refund.issued",
                           "at": at.isoformat(), "actor": "user:mallory", "data": data})
    digest = chain_hash(prev_hash, body)
    gseq, gprev_hash = verify.global_head()
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


def test_it_detects_an_unsealed_forgery_after_sealing_it(db: Any) -> None:
    # Inserted like an append (no global position), then sealed by the sequencer like any other
    # event: its run chain's head still gives it away.
    chain = _chain(3)
    at = timezone.now()
    body = canonical_json({"chain": str(chain), "seq": 4, "kind": "refund.issued",
                           "at": at.isoformat(), "actor": "user:mallory", "data": {}})
    _sql("INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, prev_hash, hash) "
         "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
         [_db("chain", chain), 4, "refund.issued", _db("at", at), "user:mallory", _db("data", {}),
          body, Event.objects.get(chain=chain, seq=3).hash,
          chain_hash(Event.objects.get(chain=chain, seq=3).hash, body)])
    ledger.seal_all()
    assert verify_global().ok
    result = verify_chain(chain)
    assert not result.ok
    assert "event forged" in result.problem


# --- sealing into the global chain ----------------------------------------------------------


def _global_order() -> list[tuple[uuid.UUID, int]]:
    return list(Event.objects.filter(gseq__isnull=False).order_by("gseq")
                .values_list("chain", "seq"))


def test_it_appends_without_touching_the_global_chain(db: Any) -> None:
    ledger.seal_all()
    head = verify.global_head()
    chain = _chain(3)
    assert list(Event.objects.filter(chain=chain).values_list("gseq", "gprev_hash", "ghash")) == [
        (None, None, None)] * 3
    assert verify.global_head() == head
    result = verify_global()
    assert (result.ok, result.events, result.unsealed) == (True, head[0], 3)
    assert "3 not sealed yet" in result.describe()
    assert verify_chain(chain).ok


def test_a_batch_writes_interleaved_chains_in_append_order(db: Any) -> None:
    """One block appending to two chains in turn: one write for all of their events when the
    block ends, ids in append order, every column as the hashed body has it,
    and each head at its own chain's last event."""
    first, second = uuid.uuid4(), uuid.uuid4()
    with transaction.atomic():
        ledger.start_chain(first)
        ledger.start_chain(second)
    awkward = {"text": 'quotes " and \\ backslash, ümlaut, 改, emoji \U0001f600, <b>&amp;',
               "n": 1.5, "nested": {"list": [1, None, True]}}
    order = [first, second, second, first, second]
    with CaptureQueriesContext(connection) as queries, transaction.atomic(), \
            ledger.batched():
        appended = [ledger.append(chain, f"test.k{i}", {**awkward, "i": i},
                                 actor="user:tester") for i, chain in enumerate(order)]
        assert not any("audit_event" in q["sql"] or "append_rows" in q["sql"]
                       for q in queries.captured_queries)  # nothing written before the end
    writes = [q["sql"] for q in queries.captured_queries
              if q["sql"].startswith(("INSERT INTO audit_event", "EXECUTE sb_append_rows"))]
    assert len(writes) == 1
    if POSTGRES:  # the events and both heads' moves are that one statement
        assert not any(q["sql"].startswith("UPDATE audit_chainhead")
                       for q in queries.captured_queries)
    events = list(Event.objects.filter(chain__in=[first, second]).order_by("id"))
    assert [(e.chain, e.seq, e.kind) for e in events] == [
        (a.chain, a.seq, a.kind) for a in appended]
    assert [e.seq for e in events] == [1, 1, 2, 2, 3]
    for event, made in zip(events, appended, strict=True):
        body = json.loads(event.body)
        assert event.body == made.body
        assert (str(event.chain), event.seq, event.kind, event.actor, event.data) == (
            body["chain"], body["seq"], body["kind"], body["actor"], body["data"])
        assert event.at.isoformat() == body["at"] == made.at.isoformat()
        assert (event.prev_hash, event.hash) == (made.prev_hash, made.hash)
    assert events[0].data["text"] == awkward["text"]
    heads = dict(ChainHead.objects.filter(chain__in=[first, second])
                 .values_list("chain", "head_hash"))
    assert heads == {first: appended[3].hash, second: appended[4].hash}
    assert verify_chain(first).ok and verify_chain(second).ok


def test_it_seals_in_batches_in_id_order(db: Any) -> None:
    ledger.seal_all()
    start, start_hash = verify.global_head()
    first, second = _chain(3), _chain(2)
    assert [ledger.seal(limit=2), ledger.seal(limit=2), ledger.seal(limit=2)] == [2, 2, 1]
    assert ledger.seal() == 0
    events = list(Event.objects.filter(chain__in=[first, second]).order_by("id"))
    assert [e.gseq for e in events] == list(range(start + 1, start + 6))
    prev = start_hash
    for event in events:
        assert (event.gprev_hash, event.ghash) == (prev, global_hash(prev, event.hash))
        prev = event.ghash
    assert verify.global_head() == (start + 5, prev)
    result = verify_global()
    assert (result.ok, result.events, result.unsealed) == (True, start + 5, 0)


def test_it_costs_one_query_when_there_is_nothing_to_seal(
        db: Any, django_assert_num_queries: Any) -> None:
    ledger.seal_all()
    with django_assert_num_queries(1):
        assert ledger.seal() == 0
    # That query reads a partial index holding only the unsealed events.
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "audit_event")
    assert constraints["audit_event_unsealed"]["index"]
    assert constraints["audit_event_unsealed"]["columns"] == ["id"]


def test_it_refuses_a_limit_below_one(db: Any) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ledger.seal(limit=0)


def test_it_keeps_the_three_global_columns_together(db: Any) -> None:
    chain = _chain(1)
    event = Event.objects.get(chain=chain, seq=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        _sql("INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, prev_hash, hash, "
             "gseq) VALUES (%s, 2, 'x', %s, 'system', %s, '{}', %s, %s, %s)",
             [_db("chain", chain), _db("at", event.at), _db("data", {}), event.hash, "c" * 64,
              10**9])


def _threads(count: int, target: Callable[[int], None]) -> list[BaseException]:
    """Run target(0) ... target(count - 1) on threads, each with its own database connection,
    and return what they raised."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a thread did not finish"
    return errors


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_and_seals_give_a_gapless_global_chain() -> None:
    ledger.seal_all()
    start = verify.global_head()[0]
    chains = [uuid.uuid4() for _ in range(4)]
    per_chain = 20
    appending = threading.Barrier(len(chains))
    done = threading.Event()

    def append(index: int) -> None:
        appending.wait(30)
        for n in range(1, per_chain + 1):
            with transaction.atomic():
                ledger.append(chains[index], "test.step", {"n": n}, actor="user:tester")

    def seal(index: int) -> None:
        while not done.is_set():  # two sequencers at once, racing each other and the appends
            ledger.seal(limit=7)

    errors: list[BaseException] = []
    sealers = threading.Thread(target=lambda: errors.extend(_threads(2, seal)))
    sealers.start()
    try:
        errors.extend(_threads(len(chains), append))
    finally:
        done.set()
        sealers.join(120)
    assert not errors, errors
    ledger.seal_all()

    total = len(chains) * per_chain
    gseqs = list(Event.objects.filter(chain__in=chains).order_by("gseq")
                 .values_list("gseq", flat=True))
    assert gseqs == list(range(start + 1, start + total + 1))
    result = verify_global()
    assert (result.ok, result.events, result.unsealed) == (True, start + total, 0), result
    for chain in chains:
        assert verify_chain(chain).ok
        # Within a chain, sealing order is append order.
        assert [seq for c, seq in _global_order() if c == chain] == list(range(1, per_chain + 1))


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_appends_to_different_chains_do_not_wait_for_each_other_on_postgresql() -> None:
    ledger.seal_all()
    start = verify.global_head()[0]
    held, other = uuid.uuid4(), uuid.uuid4()
    appended, release = threading.Event(), threading.Event()

    def hold(index: int) -> None:
        # Appends, then keeps its transaction (and its chain head's row lock) open.
        with transaction.atomic():
            ledger.append(held, "test.step", {"n": 1}, actor="user:tester")
            appended.set()
            assert release.wait(60)

    errors: list[BaseException] = []
    holder = threading.Thread(target=lambda: errors.extend(_threads(1, hold)))
    holder.start()
    try:
        assert appended.wait(30)
        # A lock wait of more than 2 s fails this append instead of hanging the test: with one
        # global head locked per append it waited here until the other transaction ended.
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            ledger.append(other, "test.step", {"n": 1}, actor="user:tester")
        # Both chain head locks were held at once; the same chain still serialises.
        with pytest.raises(OperationalError, match="lock timeout"), transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '200ms'")
            ledger.append(held, "test.step", {"n": 2}, actor="user:tester")
        # The sequencer seals what has committed and leaves the open transaction's event.
        assert ledger.seal() == 1
    finally:
        release.set()
        holder.join(60)
    assert not errors, errors
    # The held event has the lower id but committed later: it is sealed later.
    assert ledger.seal() == 1
    late, early = Event.objects.get(chain=held), Event.objects.get(chain=other)
    assert late.pk < early.pk
    assert (early.gseq, late.gseq) == (start + 1, start + 2)
    assert late.gprev_hash == early.ghash
    assert verify_global().ok


# --- PostgreSQL refuses changes itself ------------------------------------------------------

_FILL = "gseq = 999999999, gprev_hash = repeat('0', 64), ghash = repeat('a', 64)"


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


@pytest.mark.postgres
@pytest.mark.parametrize("sealed, statement", [
    # A sealed event's place in the global chain is as final as the rest of it.
    (True, "UPDATE audit_event SET gseq = gseq + 1000 WHERE id = %s"),
    (True, "UPDATE audit_event SET ghash = repeat('a', 64) WHERE id = %s"),
    (True, f"UPDATE audit_event SET {_FILL} WHERE id = %s"),
    # An unsealed event may only have its three global columns filled, nothing else changed.
    (False, "UPDATE audit_event SET actor = 'user:mallory' WHERE id = %s"),
    (False, f"UPDATE audit_event SET {_FILL}, actor = 'user:mallory' WHERE id = %s"),
    (False, f"UPDATE audit_event SET {_FILL}, data = '{{\"n\": 99}}'::jsonb WHERE id = %s"),
    (False, f"UPDATE audit_event SET {_FILL}, seq = 7 WHERE id = %s"),
    (False, "UPDATE audit_event SET gseq = 999999999 WHERE id = %s"),
    (False, "DELETE FROM audit_event WHERE id = %s"),
])
def test_it_refuses_all_but_sealing_on_postgresql(db: Any, sealed: bool, statement: str) -> None:
    chain = _chain(3)
    if sealed:
        ledger.seal_all()
    before = Event.objects.get(chain=chain, seq=2)
    with pytest.raises(DatabaseError, match="append-only"):
        with transaction.atomic():
            _sql(statement, [before.pk])
    after = Event.objects.get(chain=chain, seq=2)
    assert [getattr(after, f.attname) for f in Event._meta.fields] == [
        getattr(before, f.attname) for f in Event._meta.fields]
    assert verify_chain(chain).ok


@pytest.mark.postgres
def test_it_lets_an_unsealed_event_be_sealed_on_postgresql(db: Any) -> None:
    # The one UPDATE the trigger allows, made by hand rather than by seal().
    chain = _chain(1)
    pk = _event_id(chain, 1)
    _sql(f"UPDATE audit_event SET {_FILL} WHERE id = %s", [pk])
    assert Event.objects.get(pk=pk).gseq == 999999999
