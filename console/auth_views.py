"""Sign-in throttled against password guessing, one throttle for every way in.

Failed attempts are counted per username and per client address in a moving window (the
``limits`` library: Redis in distributed mode, so every web process shares the counts; memory
in standalone). Past either limit a sign-in answers 429 without checking the password, so a
guesser learns nothing; a correct password for another username is not affected.

Every sign-in page is wrapped by ``throttled`` (console/urls.py: the console's ``/login/`` and
the admin's ``/admin/login/``), and failures are counted where Django reports them, the
``user_login_failed`` signal of ``authenticate()`` (connected in console/apps.py), whichever form
asked. The JSON API has no password sign-in: it takes bearer tokens, which only the
``create_api_token`` management command makes.

The username is counted as sign-in reads it: the username field strips it and NFKC-normalises
it (``AbstractBaseUser.normalize_username``), so ``reviewer２`` signs in as ``reviewer2`` and must
share its count; case is folded too, so no spelling of a name gets a count of its own. The
address is the client's, behind trusted proxies too (console/client_address.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from console.client_address import client_address

FAILURES_PER_USERNAME = "5 per 15 minutes"
FAILURES_PER_ADDRESS = "20 per 15 minutes"
NAMESPACE = "login-failures"
MESSAGE = ("Too many failed sign-in attempts. Wait 15 minutes and try again, or ask an admin to "
           "reset your password.")


@cache
def limiter() -> Any:
    from limits import storage, strategies

    return strategies.MovingWindowRateLimiter(
        storage.storage_from_string(settings.REDIS_URL or "memory://"))


def _items() -> tuple[Any, Any]:
    from limits import parse

    return parse(FAILURES_PER_USERNAME), parse(FAILURES_PER_ADDRESS)


def username_key(username: str) -> str:
    """The name sign-in would look up (stripped, NFKC), case folded; at most 150 characters,
    the longest a username can be."""
    return AbstractBaseUser.normalize_username(username.strip()).casefold()[:150]


def _keys(username: str, address: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (NAMESPACE, "username", username_key(username)), (NAMESPACE, "address", address)


def is_throttled(username: str, address: str) -> bool:
    per_user, per_address = _items()
    user_key, address_key = _keys(username, address)
    return (not limiter().test(per_user, *user_key)
            or not limiter().test(per_address, *address_key))


def count_failure(sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None,
                  **kwargs: Any) -> None:
    """``user_login_failed``: one more failure for the username and the client's address. A
    failure outside a request (a management command, the test client's ``login()``) has no
    address and is not a guess over the network: not counted."""
    if request is None:
        return
    per_user, per_address = _items()
    user_key, address_key = _keys(str(credentials.get("username", "")), client_address(request))
    limiter().hit(per_user, *user_key)
    limiter().hit(per_address, *address_key)


def clear(username: str, address: str = "") -> None:
    """Forget the failures counted for a username (and an address): an admin unlocking."""
    per_user, per_address = _items()
    user_key, address_key = _keys(username, address)
    limiter().clear(per_user, *user_key)
    if address:
        limiter().clear(per_address, *address_key)


def throttled(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A sign-in view whose POST past either limit answers 429 before any password is checked."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method == "POST":
            username = str(request.POST.get("username", ""))
            if is_throttled(username, client_address(request)):
                return _refusal(request, username)
        return view(request, *args, **kwargs)

    return never_cache(wrapper)


def _refusal(request: HttpRequest, username: str) -> HttpResponse:
    form = AuthenticationForm(request, initial={"username": username[:150]})
    context = {"form": form, "throttled": MESSAGE, "next": request.POST.get("next", "")}
    return render(request, "registration/login.html", context, status=429)
