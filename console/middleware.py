"""A request id on every response and every log line written while answering it, and JSON errors
for API paths Django answers by itself."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from functools import cache

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.urls import reverse
from django.utils.decorators import sync_and_async_middleware

import logcontext

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is echoed into headers and logs, so only accept a plain token: no spaces, no
# control characters, nothing that could forge a log line or a header.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_of(request: HttpRequest) -> str:
    """The request's id: set by the middleware, or made now for a request that skipped it."""
    request_id = getattr(request, "request_id", None)
    if request_id is None:
        request_id = _assign(request)
    return request_id


def _assign(request: HttpRequest) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request.request_id = request_id  # type: ignore[attr-defined]
    return request_id


@cache
def _api_prefix() -> str:
    return reverse("api:api-root")


def _finish(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    request_id = request_id_of(request)
    if (response.status_code >= 400 and request.path.startswith(_api_prefix())
            and not response.get("Content-Type", "").startswith("application/json")
            and not response.streaming):
        # Django's own answers under the API (unknown path, wrong method, an exception that
        # escaped the API's handlers) are HTML; integrators get the API's error shape instead.
        body: dict[str, str] = {"error": response.reason_phrase.lower()}
        if response.status_code >= 500:
            body["request_id"] = request_id
        replacement = JsonResponse(body, status=response.status_code)
        if response.has_header("Allow"):
            replacement["Allow"] = response["Allow"]
        response = replacement
    response[REQUEST_ID_HEADER] = request_id
    return response


@sync_and_async_middleware
def request_id_middleware(
    get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]],
) -> Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]:
    if iscoroutinefunction(get_response):
        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            with logcontext.bound(request_id=_assign(request)):
                return _finish(request, await get_response(request))  # type: ignore[misc]

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        with logcontext.bound(request_id=_assign(request)):
            return _finish(request, get_response(request))  # type: ignore[arg-type]

    return middleware
