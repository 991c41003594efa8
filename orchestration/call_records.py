"""Checkpointing a model or tool call: its ledger event, its conversation and its budgets'
settlement in one transaction, as few round trips as the run allows (a mixin of DjangoRunStore,
orchestration/store.py)."""

from __future__ import annotations

import functools
import uuid
from typing import Any

from django.db import DatabaseError, connection, transaction

from audit import ledger
from audit.models import Event
from orchestration import budgets, metrics, run_lock, transcripts
from orchestration.engine.errors import LeaseLost
from orchestration.engine.states import TaskStatus
from orchestration.retry import persist
from orchestration.sql import deferred_read, deferred_writes


class CallRecords:
    actor: str

    def __init__(self) -> None:
        # Runs whose chain head moved under this store's write at the head this thread left.
        self._contended: set[str] = set()

    def record_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Any,
                    reserved: Any = None, lease: str = "",
                    transcript: list[dict[str, Any]] | None = None,
                    ahead: budgets.Ahead | None = None) -> None:
        """Checkpoint one model or tool call and settle its reservation, atomically (a model
        call's ``transcript`` in the same transaction). The call's result is in hand: a
        database that is briefly away is waited for (``persist``) rather than the call made
        again. ``ahead``: the next call's checks, run in the same transaction (not inside a
        caller's transaction, whose commit comes after that call would want them)."""
        if transaction.get_connection().in_atomic_block:
            self._record_step(run_id, kind, data, usage=usage, reserved=reserved, lease=lease,
                              transcript=transcript)
            return
        tries = 0

        def attempt() -> None:
            nonlocal tries
            tries += 1
            if tries > 1 and self._recorded(run_id, kind, data):
                if ahead is not None:
                    ahead.lost = True
                return  # the earlier try committed; only its answer was lost
            self._record_step(run_id, kind, data, usage=usage, reserved=reserved, lease=lease,
                              transcript=transcript, ahead=ahead)

        persist(attempt, what=f"record {kind} of {run_id}/{data.get('task', '')}")

    @staticmethod
    def _recorded(run_id: str, kind: str, data: dict[str, Any]) -> bool:
        """Whether the ledger holds this very step already (same task, kind and call key or
        model step)."""
        same = {"data__task": data.get("task", "")}
        if "idempotency_key" in data:
            same["data__idempotency_key"] = data["idempotency_key"]
        elif "step" in data:
            same["data__step"] = data["step"]
        else:
            return False
        return Event.objects.filter(chain=run_id, kind=kind, **same).exists()

    # Not @retrying: a connection lost after the step's COMMIT went out leaves it unclear
    # whether the call was recorded, and only record_step's persist asks the ledger before
    # writing it again (it retries lock conflicts too).
    def _record_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Any,
                     reserved: Any = None, lease: str = "",
                     transcript: list[dict[str, Any]] | None = None,
                     ahead: budgets.Ahead | None = None) -> None:
        # On PostgreSQL, outside a caller's transaction, a call is written at the head this
        # thread's last committed append left (ledger.committed_head), its lock and checks in
        # the same round trip; if someone else appended since, nothing of that try lands and
        # the call is written again after reading the head under the lock. A run whose head
        # moved under this store once (side-by-side tasks, people deciding) is locked and read
        # first from then on: a failed try costs more than the read.
        known = None
        if (connection.vendor == "postgresql" and str(run_id) not in self._contended
                and not transaction.get_connection().in_atomic_block):
            known = ledger.committed_head(uuid.UUID(str(run_id)))
        if known is not None:
            try:
                self._write_step(run_id, kind, data, usage=usage, reserved=reserved,
                                 lease=lease, transcript=transcript, head=known, ahead=ahead)
                return
            except DatabaseError as exc:
                if not run_lock.moved_on(exc):
                    raise
                self._contended.add(str(run_id))
        self._write_step(run_id, kind, data, usage=usage, reserved=reserved, lease=lease,
                         transcript=transcript, ahead=ahead)

    def _write_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Any,
                    reserved: Any, lease: str, transcript: list[dict[str, Any]] | None,
                    head: tuple[int, str] | None = None,
                    ahead: budgets.Ahead | None = None) -> None:
        """One step's writes in one transaction. Round trips on PostgreSQL: the lock (with the
        lease's row), then the writes with the commit; with the ``head`` the last step left,
        the lock and the checks travel with the writes instead. The next call's checks
        (``ahead``) are read after the writes, in the same round trip."""
        task = data.get("task", "")
        with transaction.atomic(savepoint=False):
            if head is None:
                row = run_lock.lock_step(run_id, task if lease else "")
                if lease and (row is None or row[0] != TaskStatus.RUNNING or row[1] != lease):
                    raise LeaseLost(f"task {task} of run {run_id} was taken over by another "
                                    "worker")
            transaction.on_commit(functools.partial(metrics.on_step, run_id, kind, data, usage))
            # The step's writes and, when this is the worker's own transaction, its commit.
            with deferred_writes(commit=True) as send:
                if head is not None:
                    run_lock.expect_step(run_id, task, lease, head, send)
                with ledger.batched(write=send):
                    ledger.append(uuid.UUID(str(run_id)), kind, data,
                                  actor=data.get("actor", self.actor))
                    if transcript is not None:
                        transcripts.keep(run_id, kind, task=task,
                                         step=int(data.get("step", data.get("round", 0))),
                                         digest=data.get("messages_digest", ""),
                                         messages=transcript)
                    if reserved is not None or not usage.is_zero():
                        budgets.settle(run_id, task, reserved, usage, write=send)
                if ahead is not None:  # after the settlement, which frees what it held
                    deferred_read(ahead)
                    transaction.on_commit(ahead.committed)

