"""A step's deferred writes: sent together when the block ends and, when the block ends the
worker's own transaction on PostgreSQL, with its COMMIT in the same round trip; a recorded call
written at the chain head its store's previous call left, with the lock and the checks in that
same round trip."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit import ledger
from audit.models import ChainHead, Event
from audit.verify import verify_chain
from hashchain import GENESIS
from orchestration.engine.errors import LeaseLost
from orchestration.engine.governance import Usage
from orchestration.models import Run, Task
from orchestration.sql import deferred_writes
from orchestration.store import DjangoRunStore
from tests.conftest import POSTGRES

INSERT = "INSERT INTO audit_chainhead (chain, seq, head_hash) VALUES (%s, 0, %s)"


def _param(chain: uuid.UUID) -> Any:
    return ChainHead._meta.pk.get_db_prep_value(chain, connection)


def _seen_elsewhere(chain: uuid.UUID) -> bool:
    """Whether another session sees the row: what a commit means."""
    if not POSTGRES:
        return ChainHead.objects.filter(chain=chain).exists()
    import psycopg

    settings = connection.settings_dict
    with psycopg.connect(dbname=settings["NAME"], user=settings["USER"] or None,
                         host=settings["HOST"] or None, port=settings["PORT"] or None,
                         password=settings["PASSWORD"] or None) as other:
        return other.execute("SELECT 1 FROM audit_chainhead WHERE chain = %s",
                             [chain]).fetchone() is not None


@contextmanager
def _sent_to_server(tmp_path: Path) -> Iterator[list[str]]:
    """The queries this connection's client library sent while the block ran (libpq's trace
    of the protocol: what reached the server, not what Django logged)."""
    sent: list[str] = []
    connection.ensure_connection()
    pgconn = connection.connection.pgconn
    trace = tmp_path / "libpq.trace"
    with trace.open("wb") as out:
        pgconn.trace(out.fileno())
        try:
            yield sent
        finally:
            pgconn.untrace()
    for line in trace.read_text(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) > 4 and fields[1] == "F" and fields[3] == "Query":
            sent.append(fields[4].strip().strip('"'))


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL: SQLite has no round trips to save")
def test_the_outermost_step_sends_its_commit_with_its_writes(
        transactional_db: Any, tmp_path: Path) -> None:
    chain, hooks = uuid.uuid4(), []
    with _sent_to_server(tmp_path) as sent:
        with transaction.atomic(), deferred_writes(commit=True) as write:
            transaction.on_commit(lambda: hooks.append("after commit"))
            write(INSERT, [_param(chain), GENESIS])
            write(INSERT, [_param(uuid.uuid4()), GENESIS])
            assert not _seen_elsewhere(chain)  # deferred: not sent yet
    # Two round trips: the driver's BEGIN, then both writes and the COMMIT; Django's own
    # commit at the block's end found no transaction open and sent nothing.
    assert len(sent) == 2, sent
    assert sent[0] == "BEGIN"
    assert sent[1].startswith("INSERT INTO audit_chainhead") and sent[1].endswith("; COMMIT")
    assert sent[1].count("INSERT") == 2
    assert _seen_elsewhere(chain)
    assert hooks == ["after commit"]
    assert not connection.in_atomic_block
    assert ChainHead.objects.filter(chain=chain).exists()  # the connection goes on as usual


def test_a_step_on_sqlite_commits_as_django_does(transactional_db: Any) -> None:
    chain, hooks = uuid.uuid4(), []
    with transaction.atomic(), deferred_writes(commit=True) as write:
        transaction.on_commit(lambda: hooks.append("after commit"))
        write(INSERT, [_param(chain), GENESIS])
    assert _seen_elsewhere(chain)
    assert hooks == ["after commit"]


def test_a_step_inside_a_callers_transaction_leaves_the_commit_to_it(
        transactional_db: Any) -> None:
    chain = uuid.uuid4()
    with CaptureQueriesContext(connection) as queries, pytest.raises(RuntimeError):
        with transaction.atomic():
            with transaction.atomic(), deferred_writes(commit=True) as write:
                write(INSERT, [_param(chain), GENESIS])
            assert ChainHead.objects.filter(chain=chain).exists()
            raise RuntimeError("the caller changes its mind")
    assert not any("COMMIT" in q["sql"] for q in queries.captured_queries)
    assert not _seen_elsewhere(chain)


def test_a_failing_step_commits_nothing_and_runs_no_hooks(transactional_db: Any) -> None:
    chain, hooks = uuid.uuid4(), []
    with pytest.raises(DatabaseError):
        with transaction.atomic(), deferred_writes(commit=True) as write:
            transaction.on_commit(lambda: hooks.append("after commit"))
            write(INSERT, [_param(chain), GENESIS])
            write(INSERT, [_param(chain), GENESIS])  # the same chain twice: a duplicate key
    assert not _seen_elsewhere(chain)
    assert hooks == []
    assert not connection.in_atomic_block
    with transaction.atomic(), deferred_writes(commit=True) as write:  # the connection recovers
        write(INSERT, [_param(chain), GENESIS])
    assert _seen_elsewhere(chain)


# --- a recorded call written at the head the previous one left ----------------------------


@pytest.fixture
def claimed(transactional_db: Any, operator: Any, vendor_input: dict[str, Any],
            monkeypatch: pytest.MonkeyPatch) -> tuple[str, DjangoRunStore, Any]:
    """A run whose first task a worker's store has claimed (nothing is dispatched)."""
    from orchestration import dispatch, services
    from orchestration.engine import runner
    from orchestration.models import Process

    monkeypatch.setattr(dispatch, "send", lambda *args, **kwargs: None)
    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=vendor_input, user=operator)
    store = DjangoRunStore()
    with transaction.atomic():
        claim = runner.advance(store, str(run.pk), take=1).claimed[0]
    return str(run.pk), store, claim


def _call(store: DjangoRunStore, run_id: str, claim: Any, key: str,
          lease: str | None = None) -> None:
    store.record_step(run_id, "tool.called", {"task": claim.key, "tool": "lookup",
                                               "idempotency_key": key},
                      usage=Usage(tool_calls=1), lease=claim.lease if lease is None else lease)


def _elsewhere(change: Callable[[], Any]) -> None:
    """``change`` committed by another thread, on its own connection: as another process
    would, unseen by this thread's memory of the heads it left."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with transaction.atomic():
                change()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failed.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def _called(run_id: str) -> list[str]:
    return [data["idempotency_key"] for data in Event.objects.filter(
        chain=run_id, kind="tool.called").order_by("seq").values_list("data", flat=True)]


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL: SQLite has no round trips to save")
def test_a_call_at_the_head_its_store_left_takes_two_round_trips(
        claimed: tuple[str, DjangoRunStore, Any], tmp_path: Path) -> None:
    run_id, store, claim = claimed
    _call(store, run_id, claim, "k1")  # reads the head under the lock
    _call(store, run_id, claim, "k2")  # (and prepares the checks' statement)
    with _sent_to_server(tmp_path) as sent:
        _call(store, run_id, claim, "k3")
    assert len(sent) == 2, sent
    assert sent[0] == "BEGIN"
    query = sent[1]
    # The lock, the checks (head, lease), the writes and the commit, in that order.
    assert query.index("sb_step_lock") < query.index("sb_step_expect") < query.index(
        "sb_append_rows") < query.index("COMMIT")
    assert _called(run_id) == ["k1", "k2", "k3"]
    assert verify_chain(uuid.UUID(run_id)).ok


def test_a_call_after_someone_else_appended_reads_the_head_again(
        claimed: tuple[str, DjangoRunStore, Any], tmp_path: Path) -> None:
    run_id, store, claim = claimed
    _call(store, run_id, claim, "k1")
    _elsewhere(lambda: ledger.append(uuid.UUID(run_id), "run.note",
                                     {"note": "a reviewer was here"}, actor="user:reviewer"))
    _call(store, run_id, claim, "k2")
    if POSTGRES:
        with _sent_to_server(tmp_path) as sent:
            _call(store, run_id, claim, "k3")
        # Once its head moved under it, the store locks and reads first: no failed try.
        assert len(sent) == 3 and not any("sb_step_expect" in q for q in sent), sent
    else:
        _call(store, run_id, claim, "k3")
    assert _called(run_id) == ["k1", "k2", "k3"]
    kinds = list(Event.objects.filter(chain=run_id).order_by("seq")
                 .values_list("kind", flat=True))
    assert kinds[-4:] == ["tool.called", "run.note", "tool.called", "tool.called"]
    assert verify_chain(uuid.UUID(run_id)).ok


def test_a_call_whose_lease_was_taken_over_writes_nothing(
        claimed: tuple[str, DjangoRunStore, Any]) -> None:
    run_id, store, claim = claimed
    _call(store, run_id, claim, "k1")
    spent = Run.objects.get(pk=run_id).tool_calls
    Task.objects.filter(run_id=run_id, key=claim.key).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    # Taken over in this thread: the head this thread remembers is the current one, so only
    # the lease tells the call it may not write.
    taker = DjangoRunStore().claim_task(run_id, claim.key)
    assert taker is not None and taker.lease != claim.lease
    with pytest.raises(LeaseLost):
        _call(store, run_id, claim, "k2")
    assert _called(run_id) == ["k1"]
    assert Run.objects.get(pk=run_id).tool_calls == spent
    _call(store, run_id, claim, "k3", lease=taker.lease)  # the new holder may
    assert _called(run_id) == ["k1", "k3"]
    assert verify_chain(uuid.UUID(run_id)).ok


# --- a COMMIT that went through although the connection failed before it said so -----------


def _lose_the_answer_once(monkeypatch: pytest.MonkeyPatch, marker: str) -> list[str]:
    """The first query holding ``marker`` and a COMMIT runs, and then the connection is lost
    before its answer comes back (as a restart or a network fault can do)."""
    from orchestration import sql

    lost: list[str] = []

    def losing(real: Callable[..., Any]) -> Callable[..., Any]:
        def run(statement: str, params: list[Any], *args: Any) -> Any:
            answer = real(statement, params, *args)
            if not lost and marker in statement and statement.endswith("; COMMIT"):
                lost.append(statement)
                connection.close()
                raise OperationalError("server closed the connection unexpectedly")
            return answer

        return run

    # A step's writes alone, and with the next call's checks read after them.
    monkeypatch.setattr(sql, "execute", losing(sql.execute))
    monkeypatch.setattr(sql, "execute_reading", losing(sql.execute_reading))
    return lost


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL: a step's COMMIT travels with its writes")
def test_a_call_whose_commit_answer_was_lost_is_recorded_once(
        claimed: tuple[str, DjangoRunStore, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    run_id, store, claim = claimed
    _call(store, run_id, claim, "k1")
    lost = _lose_the_answer_once(monkeypatch, "sb_append_rows")
    _call(store, run_id, claim, "k2")  # committed, answer lost, retried: the ledger has it
    assert lost
    _call(store, run_id, claim, "k3")
    assert _called(run_id) == ["k1", "k2", "k3"]
    assert Run.objects.get(pk=run_id).tool_calls == 3
    assert verify_chain(uuid.UUID(run_id)).ok


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL: a step's COMMIT travels with its writes")
def test_a_call_whose_commit_answer_was_lost_gives_back_what_it_reserved_ahead(
        claimed: tuple[str, DjangoRunStore, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration.governance import DjangoGovernor

    run_id, store, claim = claimed
    run = Run.objects.select_related("process_version__process").get(pk=run_id)
    governor = DjangoGovernor(run=run, task_key=claim.key, actor="agent:probe")
    _call(store, run_id, claim, "k1")
    lost = _lose_the_answer_once(monkeypatch, "sb_append_rows")
    worst = Usage(steps=1, tokens_in=70, tokens_out=30)
    ahead = governor.ahead_of_model(worst)
    store.record_step(run_id, "tool.called", {"task": claim.key, "tool": "lookup",
                                               "idempotency_key": "k2"},
                      usage=Usage(tool_calls=1), lease=claim.lease, ahead=ahead)
    assert lost and ahead.lost and not ahead.ready
    task = Task.objects.get(run_id=run_id, key=claim.key)
    assert task.reserved_tokens == 100  # the commit whose answer was lost reserved it
    # Whether it had is unknown to the worker: it gives back what the task holds, and the
    # model call reserves anew.
    assert governor.begin_model_call(worst) == ""
    task = Task.objects.get(run_id=run_id, key=claim.key)
    assert (task.reserved_tokens, Run.objects.get(pk=run_id).reserved_tokens) == (100, 100)
    assert _called(run_id) == ["k1", "k2"]


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL: a step's COMMIT travels with its writes")
def test_a_claim_whose_commit_answer_was_lost_is_still_run_by_its_worker(
        transactional_db: Any, operator: Any, vendor_input: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration import dispatch, outbox, services, work
    from orchestration.engine import runner
    from orchestration.models import Process

    monkeypatch.setattr(dispatch, "send", lambda *args, **kwargs: None)
    run_id = str(services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                                     input=vendor_input, user=operator).pk)
    with transaction.atomic():
        released = runner.advance(DjangoRunStore(), run_id, take=0).released
        assert released, "the run's first task is ready to claim"
        message = outbox.emit("execute", run_id, key=released[0])
    ran: list[Any] = []
    monkeypatch.setattr(work, "run_chain", lambda store, run, claim: ran.append(claim))
    lost = _lose_the_answer_once(monkeypatch, "UPDATE orchestration_task SET status")
    work.execute(run_id, released[0], message)
    assert lost
    task = Task.objects.get(run_id=run_id, key=released[0])
    assert task.status == "running" and task.attempts == 1
    # The retry found the message gone and the task claimed under its own token: it runs it.
    assert [c.lease for c in ran] == [task.lease_owner]
