"""Idempotency-Key for the API's actions: a retry of a request gets the first answer back.

How it behaves, and why:

- The key row is inserted, the action performed and the response stored in ONE transaction, so
  a crash leaves either both or neither. The services' own atomic blocks nest inside it, and
  their after-commit work (dispatching the run, pushing pages) fires at this outer commit.
- Keys are per user. A retry with the same key and the same request (method, path, canonical
  JSON body) answers the stored status and body, byte for byte, with
  ``Idempotent-Replayed: true``. The same key on a different request answers 422.
- Two requests with one key at once: the second one's INSERT waits on the first's unique key
  (PostgreSQL) or write lock (SQLite) until the first commits, then finds the row and replays
  it. Neither acts twice. If the first one rolls back, the second one goes ahead itself.
- Only 2xx responses are stored. A 4xx did nothing, so repeating it is harmless, and the
  client may fix the request (or its permissions) and send it again under the same key.
- Keys expire after ``KEY_TTL`` (24 h). A user's expired keys are deleted before each keyed
  request; ``idempotency_keys_purge()`` deletes everyone's, for a periodic sweep.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from ninja import Status

from console.models import IdempotencyKey

KEY_HEADER = "Idempotency-Key"
KEY_TTL = timedelta(hours=24)
# 1-200 printable ASCII characters: HTTP header values outside that are not portable.
KEY_PATTERN = r"^[\x20-\x7E]{1,200}$"
REPLAYED_HEADER = "Idempotent-Replayed"

__all__ = ["KEY_HEADER", "KEY_PATTERN", "KEY_TTL", "answered", "idempotency_keys_purge",
           "perform_once", "request_digest"]


def request_digest(request: HttpRequest) -> str:
    """SHA-256 over method, path and body. A JSON body is canonicalised so that a client which
    re-serialises on retry (other key order, other whitespace) still sends "the same" request."""
    try:
        body = json.dumps(json.loads(request.body), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    except ValueError:
        body = request.body
    # The body's digest has a fixed length, so the joined parts cannot be confused.
    parts = [(request.method or "").encode(), request.path.encode(),
             hashlib.sha256(body).hexdigest().encode()]
    return hashlib.sha256(b"\n".join(parts)).hexdigest()


def idempotency_keys_purge(*, user: Any = None, now: datetime | None = None) -> int:
    """Delete keys older than ``KEY_TTL`` (only ``user``'s if given); returns how many."""
    expired = IdempotencyKey.objects.filter(created_at__lt=(now or timezone.now()) - KEY_TTL)
    if user is not None:
        expired = expired.filter(user=user)
    deleted, _ = expired.delete()
    return deleted


def on_swept(sender: Any, **kwargs: Any) -> None:
    idempotency_keys_purge()


def perform_once(request: HttpRequest, key: str | None, action: Callable[[], Status[Any]], *,
                 render: Callable[[Status[Any]], HttpResponse],
                 content_type: str) -> Status[Any] | HttpResponse:
    """Run ``action`` unless ``key`` already ran this request; ``render`` turns its successful
    result into the exact response to store, ``content_type`` is that of stored bodies."""
    if key is None:
        return action()
    user = request.user
    digest = request_digest(request)
    # Outside the transaction below: it then never holds these rows' locks during the action.
    idempotency_keys_purge(user=user)
    with transaction.atomic():
        try:
            with transaction.atomic():
                record = IdempotencyKey.objects.create(user=user, key=key,
                                                       request_digest=digest)
        except IntegrityError:
            return _replay(user, key, digest, content_type)
        result = action()
        if not 200 <= result.status_code < 300:
            # Roll back the key row with the (already rolled back) action: nothing to replay.
            transaction.set_rollback(True)
            return result
        response = render(result)
        record.response_status = response.status_code
        record.response_body = response.content.decode()
        record.save(update_fields=["response_status", "response_body"])
    return response


def answered(request: HttpRequest, key: str | None, *,
             content_type: str) -> Status[Any] | HttpResponse | None:
    """The stored answer when ``key`` already completed a request of this user (or the 422 for
    a different request under it); None otherwise. For an action whose slow preparation runs
    before ``perform_once``: a retry is answered without preparing again."""
    if key is None or not IdempotencyKey.objects.filter(
            user=request.user, key=key, response_status__isnull=False).exists():
        return None
    return _replay(request.user, key, request_digest(request), content_type)


def _replay(user: Any, key: str, digest: str, content_type: str) -> Status[Any] | HttpResponse:
    record = IdempotencyKey.objects.filter(user=user, key=key).first()
    if record is None or record.response_status is None:
        # Committed rows always carry their response; this only covers a row purged or rolled
        # back between our conflict and this read.
        return Status(409, {"error": f"a request with this {KEY_HEADER} is in progress; "
                                     "retry shortly"})
    if record.request_digest != digest:
        return Status(422, {"error": f"this {KEY_HEADER} was already used for a different "
                                     "request (method, path or body); use a new key"})
    response = HttpResponse(record.response_body, status=record.response_status,
                            content_type=content_type)
    response[REPLAYED_HEADER] = "true"
    return response
