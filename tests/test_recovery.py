"""Recovery without a lost message or a lost worker costing anything: the outbox, task leases,
takeover, poison tasks and the sweep, driven in process (tests/test_faults.py does it with real
processes and real faults)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from approvals.models import ApprovalRequest
from audit.models import Event
from orchestration import dispatch, grants, services, sweep, work
from orchestration.engine.contracts import ToolContract
from orchestration.engine.errors import LeaseLost
from orchestration.engine.runner import Outcome, finish
from orchestration.models import Outbox, Process, Run, Task, Tool
from orchestration.store import DjangoRunStore


class Broker:
    """Stands in for Celery: records what is published, or refuses while ``down``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.down = False
        self.attempts = 0

    def __call__(self, topic: str, **message: Any) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("broker unreachable")
        self.sent.append((topic, message))

    def take(self, topic: str) -> list[dict[str, Any]]:
        picked = [m for t, m in self.sent if t == topic]
        self.sent = [(t, m) for t, m in self.sent if t != topic]
        return picked


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Broker:
    fake = Broker()
    monkeypatch.setattr(dispatch, "send", fake)
    return fake


def _start(operator: Any, vendor_input: dict[str, Any], capture: Any) -> Run:
    with capture(execute=True):
        return services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                                   input=vendor_input, user=operator)


def _kinds(run_id: Any, kind: str) -> list[dict[str, Any]]:
    return list(Event.objects.filter(chain=run_id, kind=kind).order_by("seq")
                .values_list("data", flat=True))


@pytest.mark.django_db
def test_it_keeps_a_message_the_broker_refused_and_the_sweep_sends_it(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    broker.down = True
    run = _start(operator, vendor_input, django_capture_on_commit_callbacks)
    message = Outbox.objects.get(run_id=run.pk)
    assert message.topic == "advance"
    assert message.due_at <= timezone.now()  # a failed publish is due at the next sweep

    broker.down = False
    with django_capture_on_commit_callbacks(execute=True):
        figures = sweep.sweep_once()
    assert figures["relayed"] == 1
    assert broker.take("advance") == [
        {"message_id": message.pk, "run_id": str(run.pk), "key": "", "request_id": None}]


@pytest.mark.django_db
def test_the_relay_stops_at_the_first_refusal_and_keeps_the_rest_due(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    broker.down = True
    for _ in range(3):
        _start(operator, vendor_input, django_capture_on_commit_callbacks)
    broker.attempts = 0
    assert sweep.sweep_once()["relayed"] == 0
    assert broker.attempts == 1  # not one connect timeout per message
    assert Outbox.objects.filter(due_at__lte=timezone.now()).count() == 3

    broker.down = False
    with django_capture_on_commit_callbacks(execute=True):
        assert sweep.sweep_once()["relayed"] == 3


@pytest.mark.django_db
def test_a_message_is_done_when_its_work_commits_and_a_duplicate_does_nothing(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    run = _start(operator, vendor_input, django_capture_on_commit_callbacks)
    (advance,) = broker.take("advance")
    with django_capture_on_commit_callbacks(execute=True):
        work.advance(advance["run_id"], advance["message_id"])
    started = len(_kinds(run.pk, "task.started"))
    assert started >= 2  # validate, then one of its successors, ran here without a broker hop
    assert not Outbox.objects.filter(pk=advance["message_id"]).exists()

    with django_capture_on_commit_callbacks(execute=True):
        work.advance(advance["run_id"], advance["message_id"])  # delivered again
    assert len(_kinds(run.pk, "task.started")) == started


@pytest.mark.django_db
def test_a_task_whose_worker_was_lost_is_taken_over_and_its_reservation_released(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    run = _start(operator, vendor_input, django_capture_on_commit_callbacks)
    store = DjangoRunStore()
    # A worker claims the first task, reserves budget for a call, and dies.
    from orchestration.engine import runner

    with django_capture_on_commit_callbacks(execute=True):
        claimed = runner.advance(store, str(run.pk), take=1).claimed[0]
    Task.objects.filter(run=run, key=claimed.key).update(reserved_tokens=700, reserved_steps=1)
    Run.objects.filter(pk=run.pk).update(reserved_tokens=700, reserved_steps=1)

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep.sweep_once()["taken_over"] == 0  # its lease is still good
    Task.objects.filter(run=run, key=claimed.key).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert sweep.sweep_once()["taken_over"] == 1
        assert sweep.sweep_once()["taken_over"] == 0  # one message per lapsed lease
    (message,) = broker.take("execute")
    assert message["key"] == claimed.key

    with django_capture_on_commit_callbacks(execute=True):
        work.execute(message["run_id"], message["key"], message["message_id"])
    task = Task.objects.get(run=run, key=claimed.key)
    assert (task.status, task.attempts, task.crashes) == ("succeeded", 2, 1)
    (recovered,) = _kinds(run.pk, "task.recovered")
    assert recovered["lost_lease"] == claimed.lease
    released = recovered["released"]
    assert (released["tokens"], Decimal(released["cost"]), released["steps"]) == (700, 0, 1)
    run.refresh_from_db()
    assert (run.reserved_tokens, run.reserved_steps) == (0, 0)

    # The lost worker wakes up and reports: its lease is no longer the task's.
    with pytest.raises(LeaseLost):
        finish(store, str(run.pk), claimed.key, Outcome(output={}), lease=claimed.lease)


@pytest.mark.django_db
def test_a_task_that_keeps_losing_its_worker_waits_for_a_person(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        django_capture_on_commit_callbacks: Any, settings: Any) -> None:
    settings.SWITCHBOARD_POISON_CRASHES = 3
    run = _start(operator, vendor_input, django_capture_on_commit_callbacks)
    from orchestration.engine import runner

    store = DjangoRunStore()
    with django_capture_on_commit_callbacks(execute=True):
        claimed = runner.advance(store, str(run.pk), take=1).claimed[0]
    # Two workers were lost on it already; this is the third.
    Task.objects.filter(run=run, key=claimed.key).update(
        crashes=2, lease_expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        work.execute(str(run.pk), claimed.key)
    task = Task.objects.get(run=run, key=claimed.key)
    assert (task.status, task.crashes) == ("waiting", 3)
    assert _kinds(run.pk, "tool.called") == []  # not run a fourth time
    request = ApprovalRequest.objects.get(run_id=run.pk, task_key=claimed.key)
    assert request.reason == "poison_task"
    with django_capture_on_commit_callbacks(execute=True):
        work.advance(str(run.pk))
    assert Run.objects.get(pk=run.pk).status == "waiting"

    # A reviewer says try again: the count starts over and the task runs.
    from django.contrib.auth.models import User

    from approvals import services as approvals

    with django_capture_on_commit_callbacks(execute=True):
        approvals.request_decide(request_id=request.pk, user=User.objects.get(
            username="reviewer"), decision="approve")
    (resume,) = broker.take("resume")
    with django_capture_on_commit_callbacks(execute=True):
        from orchestration.tasks import resume_after_decision

        resume_after_decision.run(resume["request_id"], resume["message_id"])
    (message,) = [m for m in broker.take("execute") if m["key"] == claimed.key]
    with django_capture_on_commit_callbacks(execute=True):
        work.execute(message["run_id"], message["key"], message["message_id"])
    task.refresh_from_db()
    assert (task.status, task.crashes) == ("succeeded", 0)


@pytest.mark.django_db
def test_the_sweep_resumes_a_decided_request_whose_resume_message_was_lost(
        broker: Broker, people: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    from approvals import services as approvals
    from tests.test_approvals import _open_request

    request = _open_request(people["operator"])
    Task.objects.filter(run_id=request.run_id, key="refund").update(status="waiting")
    with django_capture_on_commit_callbacks(execute=True):
        approvals.request_decide(request_id=request.pk, user=people["reviewer"],
                                 decision="approve")
    assert len(broker.take("resume")) == 1
    Outbox.objects.filter(topic="resume").delete()  # the message and its row are gone

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep.sweep_once()["resumed"] == 1
    (again,) = broker.take("resume")
    assert again["request_id"] == str(request.pk)


@pytest.mark.django_db
def test_the_sweep_leaves_a_caller_waiting_on_what_it_delegated(
        broker: Broker, people: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    """A task whose earlier call was decided and which now waits on a task it delegated is
    not stuck: resuming it for the old decision would apply that decision again."""
    from approvals import services as approvals
    from tests.test_approvals import _open_request

    request = _open_request(people["operator"])
    Task.objects.filter(run_id=request.run_id, key="refund").update(status="waiting")
    with django_capture_on_commit_callbacks(execute=True):
        approvals.request_decide(request_id=request.pk, user=people["reviewer"],
                                 decision="approve")
    broker.take("resume")
    Outbox.objects.filter(topic="resume").delete()
    Task.objects.filter(run_id=request.run_id, key="refund").update(
        status="waiting", error="delegated: waiting on refund_d1 (helper)")

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep.sweep_once()["resumed"] == 0
    assert broker.take("resume") == []


@pytest.mark.django_db
def test_a_plan_level_tool_that_is_not_idempotent_is_never_called_twice(
        broker: Broker, operator: Any, monkeypatch: pytest.MonkeyPatch,
        django_capture_on_commit_callbacks: Any) -> None:
    from orchestration.builtin_tools import registry

    calls: list[dict[str, Any]] = []

    def pay(vendor: str, idempotency_key: str) -> dict[str, Any]:
        calls.append({"vendor": vendor, "idempotency_key": idempotency_key})
        return {"paid": True}

    contract = ToolContract(name="test_pay", fn=pay, idempotent=False,
                            input_schema={"type": "object", "required": ["vendor"],
                                          "properties": {"vendor": {"type": "string"}}})
    monkeypatch.setitem(registry._tools, "test_pay", contract)
    Tool.objects.create(slug="test_pay", name="Pay", implementation="test_pay",
                        input_schema=dict(contract.input_schema), idempotent=False,
                        risk_class="financial")
    process = Process.objects.create(slug="test-pay", name="Pay", pattern="deterministic")
    services.process_publish(process=process, input_schema={"type": "object"}, plan={
        "tasks": [{"key": "pay", "executor": {"type": "tool", "ref": "test_pay"},
                   "args": {"vendor": "$input.vendor"}}]})
    assert grants.grant_plan_tools(process, by=None) == ["test_pay"]
    from guardian.shortcuts import assign_perm

    assign_perm("orchestration.start_run", operator, process)
    with django_capture_on_commit_callbacks(execute=True):
        run = services.run_create(process=process, input={"vendor": "V-1"}, user=operator)
    (advance,) = broker.take("advance")
    with django_capture_on_commit_callbacks(execute=True):
        work.advance(advance["run_id"], advance["message_id"])
    key = f"{run.pk}:pay:0"
    assert calls == [{"vendor": "V-1", "idempotency_key": key}]
    (intent,) = _kinds(run.pk, "tool.intent")
    assert intent["idempotency_key"] == key
    assert Run.objects.get(pk=run.pk).status == "succeeded"

    # A second run dies mid-call: its intent is recorded, its result is not.
    with django_capture_on_commit_callbacks(execute=True):
        second = services.run_create(process=process, input={"vendor": "V-2"}, user=operator)
    (advance,) = broker.take("advance")
    monkeypatch.setattr(contract, "fn", lambda **kw: (_ for _ in ()).throw(SystemExit()))
    with pytest.raises(SystemExit), django_capture_on_commit_callbacks(execute=True):
        work.advance(advance["run_id"], advance["message_id"])
    monkeypatch.setattr(contract, "fn", pay)
    Task.objects.filter(run=second, key="pay").update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        work.execute(str(second.pk), "pay")
    task = Task.objects.get(run=second, key="pay")
    assert task.status == "waiting"
    request = ApprovalRequest.objects.get(run_id=second.pk)
    assert request.reason == "unknown_outcome"
    assert [c["vendor"] for c in calls] == ["V-1"]  # V-2 was not paid a second time

    # A reviewer checked: the payment did not go out. Approving runs it, once.
    from django.contrib.auth.models import User

    from approvals import services as approvals

    with django_capture_on_commit_callbacks(execute=True):
        approvals.request_decide(request_id=request.pk, user=User.objects.get(
            username="reviewer"), decision="approve")
    (resume,) = broker.take("resume")
    from orchestration.tasks import resume_after_decision

    with django_capture_on_commit_callbacks(execute=True):
        resume_after_decision.run(resume["request_id"], resume["message_id"])
    (message,) = broker.take("execute")
    with django_capture_on_commit_callbacks(execute=True):
        work.execute(message["run_id"], message["key"], message["message_id"])
    assert Run.objects.get(pk=second.pk).status == "succeeded"
    assert [c["vendor"] for c in calls] == ["V-1", "V-2"]


@pytest.mark.django_db
def test_a_lost_workers_task_in_a_cancelled_run_is_cancelled_not_run_again(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    from orchestration.engine import runner

    run = _start(operator, vendor_input, django_capture_on_commit_callbacks)
    store = DjangoRunStore()
    with django_capture_on_commit_callbacks(execute=True):
        claimed = runner.advance(store, str(run.pk), take=1).claimed[0]
        services.run_cancel(run=run, user=operator)
    assert Run.objects.get(pk=run.pk).status == "cancelled"
    Task.objects.filter(run=run, key=claimed.key).update(
        reserved_tokens=50, lease_expires_at=timezone.now() - timedelta(seconds=1))
    Run.objects.filter(pk=run.pk).update(reserved_tokens=50)
    with django_capture_on_commit_callbacks(execute=True):
        work.execute(str(run.pk), claimed.key)
    task = Task.objects.get(run=run, key=claimed.key)
    assert (task.status, task.attempts, task.reserved_tokens) == ("cancelled", 1, 0)
    assert Run.objects.get(pk=run.pk).reserved_tokens == 0
    assert _kinds(run.pk, "tool.called") == []


@pytest.mark.django_db
def test_a_worker_whose_lease_was_taken_over_cannot_checkpoint(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        django_capture_on_commit_callbacks: Any) -> None:
    from orchestration.engine import runner
    from orchestration.engine.governance import Usage

    run = _start(operator, vendor_input, django_capture_on_commit_callbacks)
    store = DjangoRunStore()
    with django_capture_on_commit_callbacks(execute=True):
        lost = runner.advance(store, str(run.pk), take=1).claimed[0]
    Task.objects.filter(run=run, key=lost.key).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        taker = store.claim_task(str(run.pk), lost.key)
    assert taker is not None and taker.lease != lost.lease
    data = {"task": lost.key, "tool": "x", "idempotency_key": "k"}
    # (Each refusal in a savepoint of its own: this test runs inside one transaction.)
    with pytest.raises(LeaseLost), transaction.atomic():
        store.record(str(run.pk), "tool.intent", data, lease=lost.lease)
    with pytest.raises(LeaseLost), transaction.atomic():
        store.record_step(str(run.pk), "tool.called", data, usage=Usage(tool_calls=1),
                          lease=lost.lease)
    store.record(str(run.pk), "tool.intent", data, lease=taker.lease)  # the new holder may
    assert len(_kinds(run.pk, "tool.intent")) == 1


@pytest.mark.django_db
def test_the_sweep_purges_expired_idempotency_keys(operator: Any) -> None:
    from console.models import IdempotencyKey

    old = IdempotencyKey.objects.create(user=operator, key="k-old", request_digest="d",
                                        response_status=201, response_body="{}")
    IdempotencyKey.objects.filter(pk=old.pk).update(
        created_at=timezone.now() - timedelta(days=2))
    IdempotencyKey.objects.create(user=operator, key="k-new", request_digest="d",
                                  response_status=201, response_body="{}")
    sweep.sweep_once()
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["k-new"]


@pytest.mark.django_db(transaction=True)
def test_a_step_whose_commit_went_through_unseen_goes_on_with_what_it_claimed(
        broker: Broker, operator: Any, vendor_input: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database restart can drop the connection after COMMIT reached the server: the
    worker sees an error, retries, and finds its step done. It must carry on with the task
    that step claimed, not leave it for the sweep as if a worker had died."""
    from django.db import OperationalError

    run = services.run_create(process=Process.objects.get(slug="vendor-onboarding"),
                              input=vendor_input, user=operator)
    (advance,) = broker.take("advance")
    real_dispatch = work._dispatch
    failed: list[str] = []

    def dispatch_then_fail(run_id: str, result: Any) -> None:
        real_dispatch(run_id, result)
        if not failed:
            def lose_connection() -> None:
                failed.append(run_id)
                raise OperationalError("server closed the connection unexpectedly")

            transaction.on_commit(lose_connection)  # runs after COMMIT, as the error would

    monkeypatch.setattr(work, "_dispatch", dispatch_then_fail)
    work.advance(advance["run_id"], advance["message_id"])
    for message in broker.take("execute"):  # the fan-out a second worker would run
        work.execute(message["run_id"], message["key"], message["message_id"])

    assert failed, "the injected failure did not happen"
    assert Run.objects.get(pk=run.pk).status == "succeeded"
    assert _kinds(run.pk, "task.recovered") == []
    assert set(Task.objects.filter(run=run).values_list("crashes", flat=True)) == {0}
