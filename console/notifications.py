"""Notifications for reviewers: an email to each person who may decide an approval request, and
a signed JSON POST to each active webhook, when the request opens for a group and once when its
deadline nears.

A notice and its deliveries are rows written in the transaction that opens (or escalates) the
request, each delivery with an outbox message (orchestration/outbox.py): a notification goes out
if and only if the request commits, and a worker that dies mid-send leaves the message for the
relay to send again (at least once; receivers de-duplicate on the delivery's ``id``).

A delivery is tried by whichever worker takes its message: it is claimed under a lease (the
message is due again when the lease ends, so a lost worker's attempt is retried), sent, and
finished in one transaction with its message: consumed when sent (or failed for good), due again
after a doubling back-off when it failed. Every attempt shows in the admin's delivery log.

Webhook signature: ``X-Switchboard-Signature: sha256=<hex>`` is HMAC-SHA256, keyed with the
webhook's secret, of ``<X-Switchboard-Timestamp>.`` followed by the raw body; a receiver
recomputes it and refuses a timestamp older than it tolerates (replays)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import EmailMessage
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef
from django.urls import reverse
from django.utils import timezone

from approvals import services as approvals
from approvals.models import ApprovalRequest
from console.models import (
    ApprovalNotice,
    NotificationDelivery,
    NotificationEvent,
    NotificationPreference,
    NotificationWebhook,
    url_problem,
)
from orchestration import outbox
from orchestration.models import Outbox, Run
from orchestration.retry import persist

log = logging.getLogger("switchboard.notifications")
TOPIC = "notify"
Channel = NotificationDelivery.Channel
Status = NotificationDelivery.Status
SIGNATURE_HEADER = "X-Switchboard-Signature"
TIMESTAMP_HEADER = "X-Switchboard-Timestamp"
_MAX_BACKOFF = timedelta(hours=1)
_BATCH = 500


# --- opening notices (inside the request's transaction) ------------------------------------


def on_approval_opened(sender: Any, request: ApprovalRequest, **kwargs: Any) -> None:
    notice_create(request, NotificationEvent.OPENED)


def deciders(request: ApprovalRequest) -> list[Any]:
    """Who is emailed: the members of the request's group who may decide it (the same rule as
    the review queue's, approvals.services.can_decide), with an email address, not opted out."""
    candidates = (get_user_model().objects
                  .filter(groups=request.decider_group_id, is_active=True)
                  .exclude(email="")
                  .exclude(notification_preference__email=False)
                  .order_by("pk").distinct())
    return [user for user in candidates if not approvals.can_decide(user, request)]


def _payload(request: ApprovalRequest, event: str, at: datetime) -> dict[str, Any]:
    process = (Run.objects.filter(pk=request.run_id)
               .values_list("process_version__process__slug", flat=True).first())
    link = settings.SWITCHBOARD_BASE_URL + reverse("approval_detail", args=[request.pk])
    return {"event": event, "request": str(request.pk), "run": str(request.run_id),
            "process": process or "", "task": request.task_key, "reason": request.reason,
            "tool": request.tool, "group": request.decider_group.name, "tier": request.tier,
            "deadline": request.deadline.isoformat(), "url": link, "created_at": at.isoformat()}


def notice_create(request: ApprovalRequest, event: str) -> ApprovalNotice | None:
    """Write the notice and its deliveries (in the caller's transaction); None when this event
    was already noticed for the request's current tier."""
    now = timezone.now()
    try:
        with transaction.atomic():
            notice = ApprovalNotice.objects.create(
                request=request, event=event, tier=request.tier,
                payload=_payload(request, event, now))
    except IntegrityError:
        return None
    deliveries = []
    if settings.SWITCHBOARD_NOTIFY_EMAIL:
        deliveries += [NotificationDelivery(notice=notice, channel=Channel.EMAIL, user=user,
                                            address=user.email)
                       for user in deciders(request)]
    deliveries += [NotificationDelivery(notice=notice, channel=Channel.WEBHOOK, webhook=hook,
                                        address=hook.url)
                   for hook in NotificationWebhook.objects.filter(active=True).order_by("pk")
                   if event in (hook.events or [])]
    for delivery in NotificationDelivery.objects.bulk_create(deliveries):
        # The message's run_id names the delivery, not the run: a notification waiting for its
        # retry must never look like work in flight for the run (orchestration/sweep.py).
        outbox.emit(TOPIC, delivery.pk, request_id=delivery.pk)
    return notice


# --- the deadline sweep ---------------------------------------------------------------------


def deadline_notices(*, now: datetime | None = None) -> int:
    """Notice, once per request and tier, every pending request with less than
    ``SWITCHBOARD_NOTIFY_DEADLINE_PERCENT`` of its time left; returns how many."""
    now = now or timezone.now()
    percent = settings.SWITCHBOARD_NOTIFY_DEADLINE_PERCENT
    noticed = ApprovalNotice.objects.filter(request=OuterRef("pk"),
                                            event=NotificationEvent.DEADLINE_NEAR,
                                            tier=OuterRef("tier"))
    candidates = list(ApprovalRequest.objects
                      .filter(status=ApprovalRequest.Status.PENDING, deadline__gt=now)
                      .filter(~Exists(noticed)).order_by("deadline")[:_BATCH])
    if not candidates:
        return 0
    # The clock of a tier starts when that tier was told (an escalation restarts it).
    opened = {(r, t): at for r, t, at in ApprovalNotice.objects.filter(
        request__in=candidates, event=NotificationEvent.OPENED).values_list(
            "request_id", "tier", "created_at")}
    done = 0
    for request in candidates:
        start = opened.get((request.pk, request.tier), request.created_at)
        window, left = request.deadline - start, request.deadline - now
        if left * 100 > window * percent:
            continue
        with transaction.atomic():
            locked = (ApprovalRequest.objects.select_for_update(of=("self",))
                      .select_related("decider_group").filter(pk=request.pk).first())
            if (locked is None or locked.status != ApprovalRequest.Status.PENDING
                    or locked.tier != request.tier or locked.deadline <= now):
                continue
            if notice_create(locked, NotificationEvent.DEADLINE_NEAR) is not None:
                done += 1
    return done


def on_swept(sender: Any, **kwargs: Any) -> None:
    count = deadline_notices()
    if count:
        log.info("deadline notices for %d approval requests", count)


# --- delivering (in a worker) ---------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    delivery_id: str
    channel: str
    address: str
    payload: dict[str, Any]
    secret: str


def _lease() -> timedelta:
    return timedelta(seconds=max(settings.SWITCHBOARD_WEBHOOK_TIMEOUT_SECONDS,
                                 settings.SWITCHBOARD_EMAIL_TIMEOUT_SECONDS) + 30)


def _skip_reason(delivery: NotificationDelivery) -> str:
    if delivery.channel == Channel.WEBHOOK:
        hook = delivery.webhook
        if hook is None or not hook.active:
            return "the webhook was removed or switched off"
        return ""
    user, request = delivery.user, delivery.notice.request
    if not settings.SWITCHBOARD_NOTIFY_EMAIL:
        return "email notifications are switched off"
    if user is None or not user.email:
        return "the person is gone or has no email address"
    if NotificationPreference.objects.filter(user=user, email=False).exists():
        return "the person opted out of email"
    if request.status != ApprovalRequest.Status.PENDING:
        return f"the request is {request.get_status_display()} already"
    why_not = approvals.can_decide(user, request)
    if why_not:
        return f"the person may no longer decide it: {why_not}"
    return ""


def _claim(delivery_id: str, message_id: int | None) -> _Attempt | None:
    with transaction.atomic():
        delivery = (NotificationDelivery.objects.select_for_update(of=("self",))
                    .select_related("notice__request__decider_group", "webhook", "user")
                    .filter(pk=delivery_id).first())
        if delivery is None or delivery.status != Status.PENDING:
            outbox.consume(message_id)  # done already: a duplicate
            return None
        now = timezone.now()
        if delivery.leased_until and delivery.leased_until > now:
            return None  # a twin is sending it; its lease ending brings the message back
        if delivery.next_attempt_at and delivery.next_attempt_at > now:
            return None  # published before its back-off ended: the relay brings it back
        why_not = _skip_reason(delivery)
        if why_not:
            NotificationDelivery.objects.filter(pk=delivery.pk).update(
                status=Status.SKIPPED, last_error=why_not, finished_at=now)
            outbox.consume(message_id)
            return None
        lease_end = now + _lease()
        NotificationDelivery.objects.filter(pk=delivery.pk).update(
            attempts=delivery.attempts + 1, last_attempt_at=now, leased_until=lease_end)
        if message_id is not None:
            Outbox.objects.filter(pk=message_id).update(due_at=lease_end)
        return _Attempt(str(delivery.pk), delivery.channel, delivery.address,
                        delivery.notice.payload,
                        delivery.webhook.secret if delivery.webhook else "")


def webhook_body(payload: dict[str, Any], delivery_id: str) -> bytes:
    return json.dumps({**payload, "id": delivery_id}, sort_keys=True,
                      separators=(",", ":")).encode()


def signature(secret: str, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()


def _post(attempt: _Attempt) -> tuple[bool, int | None, str]:
    problem = url_problem(attempt.address)
    if problem:
        return False, None, f"refused to send to {attempt.address!r}: {problem}"
    body = webhook_body(attempt.payload, attempt.delivery_id)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "Switchboard-Webhook/1",
               "X-Switchboard-Event": attempt.payload["event"],
               "X-Switchboard-Delivery": attempt.delivery_id,
               TIMESTAMP_HEADER: timestamp,
               SIGNATURE_HEADER: signature(attempt.secret, timestamp, body)}
    try:
        with httpx.Client(timeout=settings.SWITCHBOARD_WEBHOOK_TIMEOUT_SECONDS,
                          follow_redirects=False) as client:
            response = client.post(attempt.address, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return False, None, f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return True, response.status_code, ""
    return False, response.status_code, f"HTTP {response.status_code}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def email_message(payload: dict[str, Any], address: str, delivery_id: str) -> EmailMessage:
    near = payload["event"] == NotificationEvent.DEADLINE_NEAR
    what = payload["tool"] or payload["task"]
    subject = _one_line(f"[Switchboard] {'Deadline near: ' if near else 'Approval needed: '}"
                        f"{what} ({payload['reason']})")[:200]
    lines = [
        ("The deadline of an approval request you may decide is near." if near else
         "An approval request you may decide is waiting for you."),
        "",
        f"Process:  {payload['process'] or '-'}",
        f"Run:      {payload['run']}",
        f"Task:     {payload['task']}",
        f"Tool:     {payload['tool'] or '-'}",
        f"Reason:   {payload['reason']}",
        f"Group:    {payload['group']}",
        f"Deadline: {payload['deadline']}",
        "",
        f"Review it: {payload['url']}",
        "",
        "You get these emails because you are in the group that decides this request. Turn "
        "them off on your Notifications page: "
        f"{settings.SWITCHBOARD_BASE_URL}{reverse('notification_settings')}",
    ]
    return EmailMessage(subject, "\n".join(_one_line(line) if line else line for line in lines),
                        settings.DEFAULT_FROM_EMAIL, [address],
                        headers={"X-Switchboard-Delivery": delivery_id,
                                 "Auto-Submitted": "auto-generated"})


def _mail(attempt: _Attempt) -> tuple[bool, int | None, str]:
    try:
        email_message(attempt.payload, attempt.address, attempt.delivery_id).send()
    except Exception as exc:  # SMTP refusals, timeouts, a bad address: recorded, retried
        return False, None, f"{type(exc).__name__}: {exc}"
    return True, None, ""


def _finish(attempt: _Attempt, message_id: int | None, ok: bool, code: int | None,
            error: str) -> None:
    with transaction.atomic():
        delivery = (NotificationDelivery.objects.select_for_update()
                    .filter(pk=attempt.delivery_id).first())
        if delivery is None or delivery.status != Status.PENDING:
            outbox.consume(message_id)  # a twin whose lease had run out finished it first
            return
        now = timezone.now()
        delivery.leased_until = None
        delivery.response_status = code
        delivery.last_error = error[:2000]
        fields = ["leased_until", "response_status", "last_error", "status", "finished_at",
                  "next_attempt_at"]
        if ok or delivery.attempts >= settings.SWITCHBOARD_NOTIFY_MAX_ATTEMPTS:
            delivery.status = Status.SENT if ok else Status.FAILED
            delivery.finished_at = now
            delivery.next_attempt_at = None
            delivery.save(update_fields=fields)
            outbox.consume(message_id)
            if not ok:
                log.error("notification %s to %s failed after %d attempts: %s", delivery.pk,
                          delivery.address, delivery.attempts, error)
            return
        delay = min(timedelta(seconds=settings.SWITCHBOARD_NOTIFY_RETRY_SECONDS
                              * 2 ** (delivery.attempts - 1)), _MAX_BACKOFF)
        delivery.next_attempt_at = now + delay
        delivery.save(update_fields=fields)
        if message_id is None or not Outbox.objects.filter(pk=message_id).update(
                due_at=delivery.next_attempt_at):
            # Sent by hand, or the message is gone: a new one carries the retry.
            new_id = outbox.emit(TOPIC, delivery.pk, request_id=delivery.pk)
            Outbox.objects.filter(pk=new_id).update(due_at=delivery.next_attempt_at)
        log.warning("notification %s to %s failed (attempt %d), trying again in %s: %s",
                    delivery.pk, delivery.address, delivery.attempts, delay, error)


def deliver(delivery_id: str, message_id: int | None = None) -> None:
    """What a worker does with a ``notify`` message."""
    attempt = persist(lambda: _claim(delivery_id, message_id),
                      what=f"claim notification {delivery_id}")
    if attempt is None:
        return
    try:
        ok, code, error = (_post(attempt) if attempt.channel == Channel.WEBHOOK
                           else _mail(attempt))
    except Exception as exc:  # a bug in building the message: recorded like a failure
        log.exception("notification %s could not be sent", delivery_id)
        ok, code, error = False, None, f"{type(exc).__name__}: {exc}"
    persist(lambda: _finish(attempt, message_id, ok, code, error),
            what=f"finish notification {delivery_id}")


def connect(task: Any) -> None:
    """Route ``notify`` messages to ``task`` (console/tasks.py) and listen for requests opening
    and for sweeps."""
    from approvals.signals import approval_opened
    from orchestration import dispatch
    from orchestration.signals import swept

    dispatch.route(TOPIC, task,
                   lambda run_id, key, request_id: (request_id,))
    approval_opened.connect(on_approval_opened, dispatch_uid="console.notifications.opened")
    swept.connect(on_swept, dispatch_uid="console.notifications.deadlines")
