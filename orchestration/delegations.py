"""The Django side of delegation (orchestration/engine/delegation.py): a delegated task joins
its run's plan (a new plan version) and tasks under the run's lock, with its budget carved from
its caller's, and gives back what it did not spend when it ends."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any

from django.db import connection, transaction

from audit import ledger
from orchestration import run_lock
from orchestration.engine.delegation import DELEGATED, Child, child_key, children, depth
from orchestration.engine.plan import Plan, TaskSpec
from orchestration.engine.states import TaskStatus
from orchestration.models import Run, Task
from orchestration.plans import plan_of_run
from orchestration.retry import retrying
from orchestration.run_lock import Locked
from orchestration.sql import execute, fetch_one, flush_writes, uuid_param


class DelegationRows:
    """DjangoRunStore's delegation methods."""

    actor: str

    def delegations(self, run_id: str, parent: str) -> tuple[Plan, dict[str, Child]]:
        """The run's current plan and what ``parent`` delegated, by call key (committed
        state: a delegated task's row changes only under the run's lock)."""
        version_id, plan_version = fetch_one(
            "SELECT process_version_id, plan_version FROM orchestration_run WHERE id = %s",
            [uuid_param(run_id)])
        plan = plan_of_run(run_id, version_id, plan_version)
        specs = children(plan, parent)
        if not specs:
            return plan, {}
        rows = {r[0]: r for r in Task.objects.filter(
            run_id=run_id, key__in=[s.key for s in specs]).values_list(
            "key", "status", "output", "error")}
        return plan, {s.call_key: Child(s.key, rows[s.key][1], rows[s.key][2], rows[s.key][3])
                      for s in specs if s.key in rows}

    @retrying
    def delegate(self, run_id: str, parent: str, child: TaskSpec,
                 budget: Mapping[str, Any], *, lease: str = "") -> TaskSpec:
        """Add a delegated task to the run, under its lock: a new version of the run's plan
        holding it, its task row, and its budget carved from the caller's (what is left of
        it goes back when it ends). A call that delegated already gets its task back."""
        chain = uuid.UUID(str(run_id))
        with transaction.atomic(savepoint=False), run_lock.locked(run_id) as snapshot:
            if lease:  # (DjangoRunStore's: a checkpoint refused once the caller was taken over)
                self._hold(run_id, parent, lease)  # type: ignore[attr-defined]
            for spec in children(snapshot.plan, parent):
                if spec.call_key == child.call_key:
                    return spec
            flush_writes()
            key = child_key(parent, set(snapshot.plan.by_key()) | set(snapshot.tasks))
            carved = self._carve(run_id, parent, budget)
            child = replace(child, key=key, budget=carved)
            plan = snapshot.plan.with_task(child)
            version = fetch_one("SELECT plan_version FROM orchestration_run WHERE id = %s",
                                [uuid_param(run_id)])[0]
            Run.objects.filter(pk=run_id).update(plan=plan.to_dict(), plan_version=version + 1)
            position = (Task.objects.filter(run_id=run_id).order_by("-position")
                        .values_list("position", flat=True).first() or 0) + 1
            Task.objects.create(
                run_id=run_id, key=key, position=position, title=child.title[:200],
                executor_type=child.executor_type, executor_ref=child.executor_ref,
                depends_on=[], budget_tokens=carved.get("tokens"),
                budget_cost=Decimal(carved["cost"]) if "cost" in carved else None,
                status=TaskStatus.PENDING)
            ledger.append(chain, DELEGATED, {
                "task": parent, "child": key, "agent": child.executor_ref,
                "call": child.call_key, "depth": depth(plan, key), "budget": carved},
                actor=self.actor)
            return child

    @staticmethod
    def _carve(run_id: str, parent: str, budget: Mapping[str, Any]) -> dict[str, Any]:
        """A delegated task's budget: what the call asked for (else half of what the caller
        has left), taken from the caller's cap when it has one."""
        row = fetch_one(
            "SELECT budget_tokens, used_tokens, reserved_tokens, budget_cost, used_cost,"
            ' reserved_cost FROM orchestration_task WHERE run_id = %s AND "key" = %s',
            [uuid_param(run_id), parent])
        cap, used, reserved = row[0], int(row[1]), int(row[2])
        out: dict[str, Any] = {}
        want = budget.get("tokens")
        if cap is not None:
            left = max(0, int(cap) - used - reserved)
            give = min(int(want), left) if want is not None else left // 2
            execute('UPDATE orchestration_task SET budget_tokens = budget_tokens - %s'
                    ' WHERE run_id = %s AND "key" = %s', [give, uuid_param(run_id), parent])
            out["tokens"] = max(give, 1)
        elif want is not None:
            out["tokens"] = int(want)
        cap_cost = row[3]
        want_cost = budget.get("cost")
        if cap_cost is not None:
            left_cost = max(Decimal("0"), Decimal(str(cap_cost)) - Decimal(str(row[4]))
                            - Decimal(str(row[5])))
            give_cost = (min(Decimal(str(want_cost)), left_cost) if want_cost is not None
                         else (left_cost / 2).quantize(Decimal("0.000001")))
            execute('UPDATE orchestration_task SET budget_cost = budget_cost - %s'
                    ' WHERE run_id = %s AND "key" = %s',
                    [connection.ops.adapt_decimalfield_value(give_cost, 14, 6),
                     uuid_param(run_id), parent])
            out["cost"] = str(max(give_cost, Decimal("0.000001")))
        elif want_cost is not None:
            out["cost"] = str(want_cost)
        return out

    @staticmethod
    def _return_unspent(run_id: str, key: str, state: Locked | None) -> None:
        """A delegated task that ended gives what it did not spend back to its caller."""
        if state is not None:
            plan = state.snapshot.plan
        else:
            version_id, plan_version = fetch_one(
                "SELECT process_version_id, plan_version FROM orchestration_run WHERE id = %s",
                [uuid_param(run_id)])
            plan = plan_of_run(run_id, version_id, plan_version)
        spec = plan.by_key().get(key)
        if spec is None or not spec.delegated_by:
            return
        flush_writes()
        row = fetch_one('SELECT budget_tokens, used_tokens, budget_cost, used_cost'
                        ' FROM orchestration_task WHERE run_id = %s AND "key" = %s',
                        [uuid_param(run_id), key])
        if row[0] is not None:
            execute('UPDATE orchestration_task SET budget_tokens = budget_tokens + %s'
                    ' WHERE run_id = %s AND "key" = %s AND budget_tokens IS NOT NULL',
                    [max(0, int(row[0]) - int(row[1])), uuid_param(run_id), spec.delegated_by])
        if row[2] is not None:
            unspent = max(Decimal("0"), Decimal(str(row[2])) - Decimal(str(row[3])))
            execute('UPDATE orchestration_task SET budget_cost = budget_cost + %s'
                    ' WHERE run_id = %s AND "key" = %s AND budget_cost IS NOT NULL',
                    [connection.ops.adapt_decimalfield_value(unspent, 14, 6),
                     uuid_param(run_id), spec.delegated_by])
