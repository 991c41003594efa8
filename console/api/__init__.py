"""The JSON API for integrators at /api/v1/: bearer tokens, one error shape for every failure,
an OpenAPI schema; the operations live in console.api.runs and console.api.approvals."""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import redis.exceptions
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer

from console.api import approvals, knowledge, runs
from console.api.common import RENDERER
from console.idempotency import KEY_HEADER
from console.middleware import request_id_of
from console.models import ApiToken

logger = logging.getLogger("switchboard.api")

# Failures of something the API depends on, not of the request: worth a retry.
UNAVAILABLE = (OperationalError, InterfaceError, kombu.exceptions.OperationalError,
               redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RETRY_AFTER_SECONDS = 5


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Any:
        user = ApiToken.authenticate(token)
        if user is not None:
            request.user = user
        return user


class SwitchboardAPI(NinjaAPI):
    def get_openapi_operation_id(self, operation: Any) -> str:
        # Stable for integrators' generated clients whichever module holds the operation.
        return f"console_api_{operation.view_func.__name__}"


api = SwitchboardAPI(
    title="Switchboard API",
    version="1",
    description="Start governed agent runs, read their state, usage and ledger; read, "
                "search and update the knowledge base agents cite.",
    auth=BearerToken(),
    urls_namespace="api",
    openapi_url="/openapi.json",
    docs_url=None,
    renderer=RENDERER,
)


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    parts = []
    for err in exc.errors:
        loc = ".".join(str(p) for p in err.get("loc", ())
                       if p not in ("body", "payload", "header", "query"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return api.create_response(request, {"error": "invalid request: " + "; ".join(parts)},
                               status=400)


@api.exception_handler(AuthenticationError)
def _auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = api.create_response(
        request, {"error": "authentication required: send Authorization: Bearer <token>"},
        status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # e.g. a body that is not JSON at all: same error shape as everything else.
    return api.create_response(request, {"error": f"invalid request: {exc}"},
                               status=exc.status_code)


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return api.create_response(request, {"error": str(exc) or "not found"}, status=404)


def _unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    request_id = request_id_of(request)
    logger.error("service unavailable in %s %s (request_id=%s)", request.method, request.path,
                 request_id, exc_info=exc)
    response = api.create_response(request, {
        "error": f"service temporarily unavailable; retry later, with the same {KEY_HEADER} "
                 "if you sent one, so the request is not done twice",
        "request_id": request_id}, status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


for _exc_class in UNAVAILABLE:
    api.add_exception_handler(_exc_class, _unavailable)


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return api.create_response(request, {"error": f"the request body is larger than {limit} "
                                                  "bytes; nothing was done"}, status=413)


@api.exception_handler(Exception)
def _server_error(request: HttpRequest, exc: Exception) -> HttpResponse:
    request_id = request_id_of(request)
    logger.exception("unhandled error in %s %s (request_id=%s)", request.method, request.path,
                     request_id)
    # The exception's text may hold internals; the request id leads to it in the log.
    return api.create_response(
        request, {"error": "internal server error; quote the request id when reporting it",
                  "request_id": request_id}, status=500)


api.add_router("", runs.router)
api.add_router("", approvals.router)
api.add_router("", knowledge.router)
