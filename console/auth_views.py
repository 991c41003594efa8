"""Sign-in throttled against password guessing.

Failed attempts are counted per username and per client address in a moving window (the
``limits`` library: Redis in distributed mode, so every web process shares the counts; memory
in standalone). Past the limit the sign-in answers 429 without checking the password, so a
guesser learns nothing; a correct password for another username is not affected."""

from __future__ import annotations

from functools import cache
from typing import Any

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse

FAILURES_PER_USERNAME = "5 per 15 minutes"
FAILURES_PER_ADDRESS = "20 per 15 minutes"
NAMESPACE = "login-failures"


@cache
def limiter() -> Any:
    from limits import storage, strategies

    return strategies.MovingWindowRateLimiter(
        storage.storage_from_string(settings.REDIS_URL or "memory://"))


def _items() -> tuple[Any, Any]:
    from limits import parse

    return parse(FAILURES_PER_USERNAME), parse(FAILURES_PER_ADDRESS)


def _keys(request: HttpRequest) -> tuple[tuple[str, ...], tuple[str, ...]]:
    username = str(request.POST.get("username", ""))[:150].strip().lower()
    address = str(request.META.get("REMOTE_ADDR", ""))
    return (NAMESPACE, "username", username), (NAMESPACE, "address", address)


def clear(request_or_username: str, address: str = "") -> None:
    """Forget the failures counted for a username (and an address): an admin unlocking."""
    per_user, per_address = _items()
    limiter().clear(per_user, NAMESPACE, "username", request_or_username.lower())
    if address:
        limiter().clear(per_address, NAMESPACE, "address", address)


class ThrottledLoginView(auth_views.LoginView):
    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        per_user, per_address = _items()
        user_key, address_key = _keys(request)
        if not limiter().test(per_user, *user_key) or not limiter().test(per_address,
                                                                         *address_key):
            message = ("Too many failed sign-in attempts. Wait 15 minutes and try again, or "
                       "ask an admin to reset your password.")
            context = self.get_context_data(form=self.get_form(), throttled=message)
            return self.render_to_response(context, status=429)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        per_user, per_address = _items()
        user_key, address_key = _keys(self.request)
        limiter().hit(per_user, *user_key)
        limiter().hit(per_address, *address_key)
        return super().form_invalid(form)
