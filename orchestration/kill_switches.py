"""Kill switches: engaging one stops every model and tool call in its scope at the gate;
releasing it puts the work it paused back in the queue."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction

from audit import config as config_audit
from audit.ledger import actor_of
from orchestration import outbox
from orchestration.engine import runner
from orchestration.engine.states import RUN_TERMINAL, RunStatus, TaskStatus
from orchestration.models import PAUSED, KillSwitch, Run, Task
from orchestration.services import KILL_SWITCH_RELEASED, ServiceError
from orchestration.store import DjangoRunStore


def kill_switch_engage(*, scope: str, target: str = "", reason: str,
                       by: AbstractBaseUser | None) -> KillSwitch:
    """Stop every model and tool call in ``scope`` at the gate from now on; calls in flight
    are interrupted within a poll (``contracts.STOP_POLL_S``). Their tasks wait, with reason
    ``paused``, until the switch is released."""
    switch = KillSwitch(scope=scope, target=target if scope != KillSwitch.Scope.ALL else "",
                        reason=reason, engaged_by=by)
    try:
        switch.full_clean()
    except ValidationError as exc:
        raise ServiceError("; ".join(exc.messages)) from None
    with transaction.atomic():
        switch.save()
        config_audit.record("kill_switch.engaged", model="orchestration.killswitch",
                            object=str(switch), old={},
                            new={"scope": switch.scope, "target": switch.target,
                                 "reason": switch.reason}, by=by)
    return switch


def kill_switch_release(*, switch: KillSwitch, by: AbstractBaseUser | None) -> int:
    """Release the switch and put the work it paused back in the queue. Returns how many tasks
    were resumed."""
    from django.utils import timezone

    with transaction.atomic():
        locked = KillSwitch.objects.select_for_update().get(pk=switch.pk)
        if locked.released_at is not None:
            return 0
        locked.released_at, locked.released_by = timezone.now(), by
        locked.save(update_fields=["released_at", "released_by"])
        config_audit.record("kill_switch.released", model="orchestration.killswitch",
                            object=str(locked), old={"engaged": True}, new={"engaged": False},
                            by=by)
    switch.released_at = locked.released_at
    return resume_unpaused(actor=actor_of(by))


def resume_unpaused(*, actor: str = "system") -> int:
    """Put back in the queue every task parked by a switch that is no longer engaged (a task
    another engaged switch holds stays). A release calls it; so does the sweep, for a release
    interrupted before it got here or a task parked just as its switch was released."""
    held = [s.pause_reason() for s in KillSwitch.objects.filter(released_at__isnull=True)]
    paused = Task.objects.filter(status=TaskStatus.WAITING, error__startswith=f"{PAUSED}:")
    run_ids = list(dict.fromkeys(
        run_id for run_id, error in paused.values_list("run_id", "error")[:2000]
        if error not in held))
    return sum(_resume_paused(run_id, held, actor=actor) for run_id in run_ids)


def _resume_paused(run_id: Any, held: list[str], *, actor: str) -> int:
    with transaction.atomic():
        run = Run.objects.select_for_update(of=("self",)).filter(pk=run_id).first()
        if run is None or RunStatus(run.status) in RUN_TERMINAL:
            return 0
        store = DjangoRunStore(actor=actor)
        keys = [key for key, error in Task.objects.filter(
            run_id=run_id, status=TaskStatus.WAITING, error__startswith=f"{PAUSED}:")
            .values_list("key", "error") if error not in held]
        for key in keys:
            store.requeue_task(str(run_id), key, reason=KILL_SWITCH_RELEASED)
        released = runner.advance(store, str(run_id)).released
        for key in dict.fromkeys([*keys, *released]):
            outbox.emit("execute", run_id, key=key)
    return len(keys)
