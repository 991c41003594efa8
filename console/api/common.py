"""What every API operation shares: the error shapes, the JSON renderer, the idempotency key
header, and the checks and replays around an operation that acts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from ninja import Header, Schema, Status
from ninja.renderers import JSONRenderer
from pydantic import Field

from audit import hygiene
from console.idempotency import KEY_HEADER, KEY_PATTERN, KEY_TTL, perform_once

# The API renders with this one renderer, so a stored idempotent response is byte for byte what
# the API would have answered.
RENDERER = JSONRenderer()
CONTENT_TYPE = f"{RENDERER.media_type}; charset={RENDERER.charset}"


class ErrorOut(Schema):
    error: str


class ServerErrorOut(Schema):
    error: str
    request_id: str = Field(description="also in the X-Request-ID header and the server log")


IDEMPOTENCY_DOC = (
    f"Optional. Send a unique key (1-200 printable ASCII characters) to make retries safe: for "
    f"{KEY_TTL.total_seconds() / 3600:g} hours, a retry by you with the same key and the same "
    "request returns the first successful response (header Idempotent-Replayed: true) without "
    "acting again; the same key on a different request answers 422. Error responses are not "
    "kept, so a fixed request may reuse the key. A concurrent retry waits for the first one.")
# Shared by the operations that take it, so both document it the same way.
IdempotencyHeader = Header(None, alias=KEY_HEADER, description=IDEMPOTENCY_DOC,
                           pattern=KEY_PATTERN)


def refused(payload: Schema) -> Status[Any] | None:
    """400 for a body holding a value no row or ledger event can hold (NaN, Infinity, a NUL, a
    lone surrogate, deep nesting): the JSON parser and the schema let those through, and the
    database would fail on them mid-request. Checked field by field, before anything is done."""
    try:
        for name, value in payload.model_dump().items():
            hygiene.check(value, name)
    except hygiene.Refused as exc:
        return Status(400, {"error": f"invalid request: {exc}"})
    return None


def once(request: HttpRequest, key: str | None, schema: type[Schema],
          action: Callable[[], Status[Any]]) -> Status[Any] | HttpResponse:
    """``action`` under ``key``; its success is rendered here as ninja would render it for
    ``schema``, so that the exact bytes can be stored and replayed."""
    def render(result: Status[Any]) -> HttpResponse:
        return HttpResponse(RENDERER.render(request, schema.model_validate(result.value)
                                            .model_dump(), response_status=result.status_code),
                            status=result.status_code, content_type=CONTENT_TYPE)

    return perform_once(request, key, action, render=render, content_type=CONTENT_TYPE)
