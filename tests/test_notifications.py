"""Notifications for reviewers: emails to the people who may decide a request (not to those who
opted out), signed webhooks to a real local HTTP server, retries through the outbox, the
deadline notice sent once. In the distributed pass a real Celery worker delivers them."""

from __future__ import annotations

import email
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest
from console import notifications
from console.models import (
    ApprovalNotice,
    NotificationDelivery,
    NotificationPreference,
    NotificationWebhook,
)
from orchestration import dispatch, sweep
from orchestration.models import Outbox, Run
from tests.conftest import DISTRIBUTED, celery_worker_process, wait_for, wait_for_run
from tests.test_approvals import Client

SECRET = "webhook-secret-for-tests-0123456789"
MAX_ATTEMPTS = 3


class Receiver:
    """A webhook receiver on a real local port: records every request, answers with the next
    status of ``statuses`` (200 once they run out)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.received.append({"headers": dict(self.headers), "body": body,
                                              "path": self.path, "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/switchboard"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answered(self, status: int) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.received if r["status"] == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def mailbox(request: pytest.FixtureRequest, transactional_db: Any, settings: Any,
            tmp_path: Path, worker_metrics_dir: Path) -> Iterator[Callable[[], list[Any]]]:
    """Where the notifications go and who sends them: the in-process pool with Django's locmem
    backend (standalone), or a real Celery worker writing emails to files (distributed). Both
    retry after 1 s and give up after MAX_ATTEMPTS. Yields a function listing the emails."""
    settings.SWITCHBOARD_NOTIFY_RETRY_SECONDS = 1
    settings.SWITCHBOARD_NOTIFY_MAX_ATTEMPTS = MAX_ATTEMPTS
    if not DISTRIBUTED:
        yield lambda: list(mail.outbox)
        return
    outbox_dir = tmp_path / "mail"
    outbox_dir.mkdir()
    env = {"SWITCHBOARD_EMAIL_BACKEND": "file", "EMAIL_FILE_PATH": str(outbox_dir),
           "SWITCHBOARD_SWEEP_SECONDS": "1", "SWITCHBOARD_NOTIFY_RETRY_SECONDS": "1",
           "SWITCHBOARD_NOTIFY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
           "PROMETHEUS_MULTIPROC_DIR": str(worker_metrics_dir)}

    def read() -> list[Any]:
        found = []
        for path in sorted(outbox_dir.iterdir()):
            for chunk in path.read_bytes().split(b"-" * 79):
                if chunk.strip():
                    message = email.message_from_bytes(chunk.strip() + b"\n")
                    found.append(_Mail(message))
        return found

    with celery_worker_process(log_name="celery-worker-notify.log", env_extra=env):
        yield read


class _Mail:
    """A file-backend email with the locmem message's attributes the tests read."""

    def __init__(self, message: Any) -> None:
        self.to = [message["To"]]
        self.subject = str(email.header.make_header(email.header.decode_header(
            message["Subject"])))
        self.body = message.get_payload(decode=True).decode()
        self.extra_headers = {"X-Switchboard-Delivery": message["X-Switchboard-Delivery"]}


def _relaying(check: Callable[[], Any]) -> Callable[[], Any]:
    """Standalone has no sweep thread in the tests: relay due messages while waiting (the
    distributed worker's own sweep does it there)."""
    def predicate() -> Any:
        if not DISTRIBUTED:
            sweep.sweep_once()
        return check()
    return predicate


def _webhook(url: str, **fields: Any) -> NotificationWebhook:
    hook = NotificationWebhook(name=fields.pop("name", "ops"), url=url, secret=SECRET, **fields)
    hook.full_clean()
    hook.save()
    return hook


def _refund_waiting(client: Any, operator: User) -> tuple[Run, ApprovalRequest]:
    """A refund run paused on its approval request (the policy's group: reviewer)."""
    api = Client(client, operator)
    created = api.post("/api/v1/runs", {"process": "refund-exception", "input": {
        "order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com",
        "amount": 500}})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"])
    assert run.status == "waiting", run.error
    return run, ApprovalRequest.objects.get(run_id=run.pk, status="pending")


def _verify(record: dict[str, Any]) -> dict[str, Any]:
    """What a receiver does: recompute the signature over timestamp and raw body."""
    headers = {k.lower(): v for k, v in record["headers"].items()}
    timestamp = headers["x-switchboard-timestamp"]
    expected = "sha256=" + hmac.new(SECRET.encode(), f"{timestamp}.".encode() + record["body"],
                                    hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-switchboard-signature"], expected)
    assert abs(time.time() - int(timestamp)) < 300
    assert headers["content-type"] == "application/json"
    return json.loads(record["body"])


@pytest.mark.django_db(transaction=True)
def test_it_emails_the_deciders_and_signs_the_webhook_when_a_request_opens(
        people: dict[str, User], client: Any, mailbox: Callable[[], list[Any]],
        receiver: Receiver) -> None:
    NotificationPreference.objects.create(user=people["reviewer2"], email=False)
    _webhook(receiver.url)

    run, request = _refund_waiting(client, people["operator"])

    (record,) = wait_for(lambda: receiver.answered(200), what="the webhook")
    body = _verify(record)
    delivery = NotificationDelivery.objects.get(channel="webhook")
    assert body == {
        "id": str(delivery.pk), "event": "approval.opened", "request": str(request.pk),
        "run": str(run.pk), "process": "refund-exception", "task": request.task_key,
        "reason": "sensitive_action", "tool": "issue_refund", "group": "reviewer", "tier": 1,
        "deadline": request.deadline.isoformat(),
        "url": f"http://127.0.0.1:8000/review/{request.pk}/", "created_at": body["created_at"]}
    assert record["path"] == "/hooks/switchboard"

    (sent,) = wait_for(mailbox, what="the email")
    assert sent.to == ["reviewer@switchboard.example"]  # reviewer2 opted out; the operator
    assert "Approval needed: issue_refund" in sent.subject  # is not in the group
    assert f"/review/{request.pk}/" in sent.body
    assert "refund-exception" in sent.body
    wait_for(lambda: set(NotificationDelivery.objects.values_list("status", flat=True))
             == {"sent"}, what="both deliveries to be recorded as sent")
    assert sorted(NotificationDelivery.objects.values_list("channel", "address")) == [
        ("email", "reviewer@switchboard.example"), ("webhook", receiver.url)]
    assert not Outbox.objects.filter(topic="notify").exists()
    assert len(receiver.received) == 1 and len(mailbox()) == 1


@pytest.mark.django_db(transaction=True)
def test_a_failing_webhook_is_retried_through_the_outbox_and_then_delivered(
        people: dict[str, User], client: Any, mailbox: Callable[[], list[Any]],
        receiver: Receiver) -> None:
    NotificationPreference.objects.create(user=people["reviewer"], email=False)
    NotificationPreference.objects.create(user=people["reviewer2"], email=False)
    _webhook(receiver.url)
    receiver.statuses = [500, 503]

    _refund_waiting(client, people["operator"])

    delivery = wait_for(_relaying(lambda: NotificationDelivery.objects.filter(
        channel="webhook", status="sent").first()), timeout=60, what="the retried webhook")
    assert delivery.attempts == 3
    assert delivery.response_status == 200 and delivery.last_error == ""
    assert [r["status"] for r in receiver.received] == [500, 503, 200]
    bodies = [_verify(r) for r in receiver.received]
    assert {b["id"] for b in bodies} == {str(delivery.pk)}  # one idempotency id for all tries
    assert len({r["headers"]["X-Switchboard-Timestamp"] for r in receiver.received}) >= 2
    assert not Outbox.objects.filter(topic="notify").exists()
    assert mailbox() == []


@pytest.mark.django_db(transaction=True)
def test_a_webhook_that_keeps_failing_is_recorded_as_failed(
        people: dict[str, User], client: Any, mailbox: Callable[[], list[Any]],
        receiver: Receiver) -> None:
    _webhook(receiver.url)
    receiver.statuses = [500] * 10

    _refund_waiting(client, people["operator"])

    delivery = wait_for(_relaying(lambda: NotificationDelivery.objects.filter(
        channel="webhook", status="failed").first()), timeout=60, what="the webhook to fail")
    assert delivery.attempts == MAX_ATTEMPTS
    assert delivery.last_error == "HTTP 500" and delivery.finished_at is not None
    assert len(receiver.received) == MAX_ATTEMPTS
    assert not Outbox.objects.filter(request_id=delivery.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_the_deadline_notice_is_sent_once(
        people: dict[str, User], client: Any, mailbox: Callable[[], list[Any]],
        receiver: Receiver) -> None:
    NotificationPreference.objects.create(user=people["reviewer2"], email=False)
    _webhook(receiver.url, events=["approval.deadline_near"])
    run, request = _refund_waiting(client, people["operator"])
    wait_for(lambda: len(mailbox()) == 1, what="the opening email")
    assert notifications.deadline_notices() == 0  # all its time is still ahead

    # 23 of its 24 hours have passed: less than 20 % is left.
    start = timezone.now() - timedelta(hours=23)
    ApprovalRequest.objects.filter(pk=request.pk).update(
        created_at=start, deadline=start + timedelta(hours=24))
    ApprovalNotice.objects.filter(request=request).update(created_at=start)
    notifications.deadline_notices()
    notifications.deadline_notices()

    (record,) = wait_for(lambda: receiver.answered(200), what="the deadline webhook")
    assert _verify(record)["event"] == "approval.deadline_near"
    near = wait_for(lambda: [m for m in mailbox() if "Deadline near" in m.subject],
                    what="the deadline email")
    assert [m.to for m in near] == [["reviewer@switchboard.example"]]
    assert ApprovalNotice.objects.filter(request=request, event="approval.deadline_near"
                                         ).count() == 1
    wait_for(lambda: not Outbox.objects.filter(topic="notify").exists(),
             what="every notification to be done")
    assert notifications.deadline_notices() == 0
    sweep.sweep_once()
    assert len(receiver.received) == 1
    assert len([m for m in mailbox() if "Deadline near" in m.subject]) == 1


# --- in one process ----------------------------------------------------------------------


def _open(reason: str = "sensitive_action", **kw: Any) -> ApprovalRequest:
    with transaction.atomic():
        return approvals.request_open(run_id=uuid.uuid4(), task_key="refund", reason=reason,
                                      requested_by="agent:test", tool="issue_refund", **kw)


@pytest.mark.django_db
def test_nothing_is_notified_when_the_opening_transaction_rolls_back(
        people: dict[str, User], receiver: Receiver) -> None:
    _webhook(receiver.url)
    with pytest.raises(RuntimeError), transaction.atomic():
        _open()
        assert ApprovalNotice.objects.count() == 1
        assert Outbox.objects.filter(topic="notify").count() == 3  # 2 reviewers + the webhook
        raise RuntimeError("the state change failed")
    assert ApprovalNotice.objects.count() == 0
    assert NotificationDelivery.objects.count() == 0
    assert not Outbox.objects.filter(topic="notify").exists()


@pytest.mark.django_db
def test_it_leaves_out_whoever_may_not_decide(people: dict[str, User]) -> None:
    inactive = User.objects.create_user("gone", email="gone@switchboard.example",
                                        is_active=False)
    no_address = User.objects.create_user("noaddress")
    for user in (inactive, no_address):
        user.groups.add(*people["reviewer"].groups.all())
    request = _open(run_started_by=people["reviewer"])  # may not decide their own run's

    assert [u.username for u in notifications.deciders(request)] == ["reviewer2"]


@pytest.mark.django_db
def test_an_opt_out_after_the_notice_skips_the_email(
        people: dict[str, User], django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        request = _open()
    NotificationPreference.objects.create(user=people["reviewer2"], email=False)
    for delivery in NotificationDelivery.objects.filter(notice__request=request):
        message = Outbox.objects.get(request_id=delivery.pk)
        notifications.deliver(str(delivery.pk), message.pk)
    statuses = dict(NotificationDelivery.objects.values_list("user__username", "status"))
    assert statuses == {"reviewer": "sent", "reviewer2": "skipped"}
    assert [m.to for m in mail.outbox] == [["reviewer@switchboard.example"]]
    assert not Outbox.objects.filter(topic="notify").exists()


@pytest.mark.django_db
def test_a_delivery_whose_worker_died_is_sent_again_by_the_relay(
        people: dict[str, User], receiver: Receiver, settings: Any,
        monkeypatch: pytest.MonkeyPatch,
        django_capture_on_commit_callbacks: Any) -> None:
    settings.SWITCHBOARD_NOTIFY_EMAIL = False
    _webhook(receiver.url)
    with django_capture_on_commit_callbacks(execute=False):
        _open()
    delivery = NotificationDelivery.objects.get()
    message = Outbox.objects.get(request_id=delivery.pk)
    assert notifications._claim(str(delivery.pk), message.pk) is not None  # then it died
    notifications.deliver(str(delivery.pk), message.pk)  # a twin while the lease holds
    assert receiver.received == []

    past = timezone.now() - timedelta(seconds=1)
    NotificationDelivery.objects.filter(pk=delivery.pk).update(leased_until=past)
    Outbox.objects.filter(pk=message.pk).update(due_at=past)
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(dispatch, "send", lambda topic, **kw: published.append(
        {"topic": topic, **kw}))
    assert sweep.sweep_once()["relayed"] == 1
    assert published == [{"topic": "notify", "message_id": message.pk,
                          "run_id": str(delivery.pk), "key": "",
                          "request_id": str(delivery.pk)}]
    notifications.deliver(published[0]["request_id"], published[0]["message_id"])
    assert NotificationDelivery.objects.get(pk=delivery.pk).status == "sent"
    assert NotificationDelivery.objects.get(pk=delivery.pk).attempts == 2
    assert len(receiver.received) == 1


@pytest.mark.django_db
def test_an_escalation_tells_the_second_tier(people: dict[str, User]) -> None:
    from approvals.models import PolicyVersion

    version = PolicyVersion.objects.filter(escalation_group__isnull=False).first()
    if version is None:
        pytest.skip("the demo has no policy with a second tier")
    request = _open(policy_version=version)
    ApprovalRequest.objects.filter(pk=request.pk).update(deadline=timezone.now())
    assert approvals.requests_expire() == 1
    tiers = sorted(ApprovalNotice.objects.filter(request=request, event="approval.opened")
                   .values_list("tier", "payload__group"))
    assert tiers == [(1, version.decider_group.name), (2, version.escalation_group.name)]


@pytest.mark.parametrize("url, problem", [
    ("ftp://example.com/hook", "the scheme must be http or https"),
    ("file:///etc/passwd", "the scheme must be http or https"),
    ("javascript:alert(1)", "the scheme must be http or https"),
    ("https://user:pw@example.com/hook", "no user name or password"),
    ("https:///hook", "it names no host"),
    ("https://example.com:99999/hook", "not a URL"),
])
def test_it_refuses_webhook_urls_it_would_not_send_to(url: str, problem: str) -> None:
    assert notifications.url_problem(url).startswith(problem)
    assert notifications.url_problem("https://hooks.example.com/switchboard?x=1") == ""


@pytest.mark.django_db
def test_the_webhook_model_checks_url_events_and_secret() -> None:
    hook = NotificationWebhook(name="bad", url="gopher://example.com/", secret="short",
                               events=["approval.opened", "run.exploded"])
    with pytest.raises(ValidationError) as caught:
        hook.full_clean()
    assert set(caught.value.message_dict) == {"url", "secret", "events"}
    assert len(NotificationWebhook(name="x", url="https://e.example/").secret) >= 32


def test_the_signature_covers_the_timestamp_and_the_body() -> None:
    body = notifications.webhook_body({"event": "approval.opened"}, "d-1")
    signed = notifications.signature(SECRET, "1700000000", body)
    assert signed == "sha256=" + hmac.new(SECRET.encode(), b"1700000000." + body,
                                          hashlib.sha256).hexdigest()
    assert notifications.signature(SECRET, "1700000001", body) != signed


@pytest.mark.django_db
def test_a_person_turns_their_emails_off_and_on(client: Any, people: dict[str, User]) -> None:
    reviewer = people["reviewer"]
    assert client.get("/settings/notifications").status_code == 302  # sign in first
    client.force_login(reviewer)
    page = client.get("/settings/notifications")
    assert page.status_code == 200
    assert b'id="notify-email" checked' in page.content
    assert b"reviewer@switchboard.example" in page.content
    assert b'href="/settings/notifications"' in client.get("/").content  # the top bar links it

    off = client.post("/settings/notifications", {})
    assert off.status_code == 302
    assert NotificationPreference.objects.get(user=reviewer).email is False
    assert b'id="notify-email" checked' not in client.get("/settings/notifications").content
    assert [u.username for u in notifications.deciders(_open())] == ["reviewer2"]

    client.post("/settings/notifications", {"email": "on"})
    assert NotificationPreference.objects.get(user=reviewer).email is True


@pytest.mark.django_db
def test_admins_see_preferences_webhooks_and_the_delivery_log(
        client: Any, people: dict[str, User], receiver: Receiver) -> None:
    NotificationPreference.objects.create(user=people["reviewer2"], email=False)
    _webhook(receiver.url)
    _open()
    client.force_login(people["admin"])
    for path in ("/admin/console/notificationpreference/", "/admin/console/notificationwebhook/",
                 "/admin/console/notificationdelivery/", "/admin/console/approvalnotice/",
                 "/admin/console/notificationwebhook/add/"):
        assert client.get(path).status_code == 200, path
    log = client.get("/admin/console/notificationdelivery/").content.decode()
    assert "reviewer@switchboard.example" in log and receiver.url in log
    assert "reviewer2" in client.get("/admin/console/notificationpreference/").content.decode()


@pytest.mark.django_db
def test_an_admin_adds_a_webhook_and_the_ledger_never_sees_its_secret(
        client: Any, people: dict[str, User]) -> None:
    from audit.models import Event

    client.force_login(people["admin"])
    form = {"name": "ops", "url": "ftp://hooks.example.com/", "active": "on",
            "events": ["approval.opened"], "secret": SECRET}
    refused = client.post("/admin/console/notificationwebhook/add/", form)
    assert refused.status_code == 200
    assert "the scheme must be http or https" in refused.content.decode()
    assert not NotificationWebhook.objects.exists()

    added = client.post("/admin/console/notificationwebhook/add/",
                        {**form, "url": "https://hooks.example.com/switchboard"})
    assert added.status_code == 302
    hook = NotificationWebhook.objects.get()
    assert hook.events == ["approval.opened"] and hook.secret == SECRET
    (event,) = Event.objects.filter(kind="config.notification_webhook.create")
    assert event.data["new"]["url"] == "https://hooks.example.com/switchboard"
    assert SECRET not in json.dumps(event.data)


@pytest.mark.django_db
def test_the_admin_never_sends_a_webhooks_secret_back_and_blank_keeps_it(
        client: Any, people: dict[str, User]) -> None:
    client.force_login(people["admin"])
    form = {"name": "ops", "url": "https://hooks.example.com/switchboard", "active": "on",
            "events": ["approval.opened"], "secret": SECRET}
    assert client.post("/admin/console/notificationwebhook/add/", form).status_code == 302
    hook = NotificationWebhook.objects.get()
    page = client.get(f"/admin/console/notificationwebhook/{hook.pk}/change/").content.decode()
    assert SECRET not in page
    kept = client.post(f"/admin/console/notificationwebhook/{hook.pk}/change/",
                       {**form, "name": "ops2", "secret": ""})
    assert kept.status_code == 302
    hook.refresh_from_db()
    assert hook.name == "ops2" and hook.secret == SECRET
