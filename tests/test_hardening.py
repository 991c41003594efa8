"""Deployment hardening: no start-up with the public development key and DEBUG off, HTTPS
settings switched on from the environment, and websockets taken only from an exact origin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from console import auth_views
from console import env as envreaders
from console.routing import origin_allowed, websocket_application
from tests.conftest import ROOT

# Read by console/settings.py; cleared so a subprocess sees only what a test gives it.
SETTINGS_VARS = {"SECRET_KEY", "DEBUG", "ALLOWED_HOSTS", "SESSION_COOKIE_SECURE",
                 "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
                 "SECURE_HSTS_PRELOAD", "SECURE_SSL_REDIRECT", "SECURE_PROXY_SSL_HEADER",
                 "CSRF_TRUSTED_ORIGINS", "SWITCHBOARD_WS_ALLOWED_ORIGINS",
                 "SWITCHBOARD_TRUSTED_PROXIES"}
SHOWN = ["DEBUG", "ALLOWED_HOSTS", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
         "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD",
         "SECURE_SSL_REDIRECT", "SECURE_PROXY_SSL_HEADER", "CSRF_TRUSTED_ORIGINS",
         "SWITCHBOARD_WS_ALLOWED_ORIGINS", "SWITCHBOARD_TRUSTED_PROXIES"]
KEY = "a-deployment-key-0123456789-abcdefghijklmnopqrstuvwxyz"


def start_django(**variables: str) -> subprocess.CompletedProcess[str]:
    """``django.setup()`` in a fresh process with console.settings and only these settings
    variables; prints the settings under test as JSON."""
    environment = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}
    environment.update(variables, DJANGO_SETTINGS_MODULE="console.settings")
    code = ("import django, json; django.setup(); from django.conf import settings; "
            f"print(json.dumps({{n: getattr(settings, n) for n in {SHOWN!r}}}, default=str))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def started(**variables: str) -> dict[str, Any]:
    done = start_django(**variables)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the secret key ------------------------------------------------------------------------------


def test_it_refuses_to_start_without_a_secret_key_when_debug_is_off() -> None:
    done = start_django(DEBUG="false")
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr
    assert "SECRET_KEY is not set (or is the public development key) and DEBUG is false" in (
        done.stderr)


def test_it_refuses_the_public_development_key_when_debug_is_off() -> None:
    from django.conf import settings

    done = start_django(SECRET_KEY=settings.DEVELOPMENT_SECRET_KEY)
    assert done.returncode != 0 and "public development key" in done.stderr


def test_it_starts_with_a_key_of_its_own_and_all_https_settings_off() -> None:
    values = started(SECRET_KEY=KEY)
    assert values == {
        "DEBUG": False, "ALLOWED_HOSTS": ["127.0.0.1", "localhost", "[::1]"],
        "SESSION_COOKIE_SECURE": False, "CSRF_COOKIE_SECURE": False, "SECURE_HSTS_SECONDS": 0,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False, "SECURE_HSTS_PRELOAD": False,
        "SECURE_SSL_REDIRECT": False, "SECURE_PROXY_SSL_HEADER": None,
        "CSRF_TRUSTED_ORIGINS": [], "SWITCHBOARD_WS_ALLOWED_ORIGINS": [],
        "SWITCHBOARD_TRUSTED_PROXIES": []}


def test_it_starts_with_the_development_key_when_debug_is_on() -> None:
    assert started(DEBUG="true")["DEBUG"] is True


def test_it_switches_the_https_settings_on_from_the_environment() -> None:
    values = started(
        SECRET_KEY=KEY, SESSION_COOKIE_SECURE="true", CSRF_COOKIE_SECURE="1",
        SECURE_HSTS_SECONDS="31536000", SECURE_HSTS_INCLUDE_SUBDOMAINS="yes",
        SECURE_HSTS_PRELOAD="true", SECURE_SSL_REDIRECT="true",
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto: https",
        CSRF_TRUSTED_ORIGINS="https://Console.Example.com:443, https://ops.example.com:8443",
        SWITCHBOARD_TRUSTED_PROXIES="10.0.0.5, 10.1.0.0/16, fd00::/8")
    assert values["SESSION_COOKIE_SECURE"] is values["CSRF_COOKIE_SECURE"] is True
    assert values["SECURE_HSTS_SECONDS"] == 31536000
    assert values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is values["SECURE_HSTS_PRELOAD"] is True
    assert values["SECURE_SSL_REDIRECT"] is True
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    origins = ["https://console.example.com", "https://ops.example.com:8443"]
    assert values["CSRF_TRUSTED_ORIGINS"] == values["SWITCHBOARD_WS_ALLOWED_ORIGINS"] == origins
    assert values["SWITCHBOARD_TRUSTED_PROXIES"] == ["10.0.0.5/32", "10.1.0.0/16", "fd00::/8"]


def test_it_takes_websocket_origins_of_their_own() -> None:
    values = started(SECRET_KEY=KEY, CSRF_TRUSTED_ORIGINS="https://console.example.com",
                     SWITCHBOARD_WS_ALLOWED_ORIGINS="https://live.example.com:8443")
    assert values["SWITCHBOARD_WS_ALLOWED_ORIGINS"] == ["https://live.example.com:8443"]


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SWITCHBOARD_TRUSTED_PROXIES", "10.0.0.300", "is not an IP address or network"),
    ("SWITCHBOARD_TRUSTED_PROXIES", "10.0.0.1/8", "has host bits set"),
    ("CSRF_TRUSTED_ORIGINS", "console.example.com", "the scheme must be http or https"),
    ("SWITCHBOARD_WS_ALLOWED_ORIGINS", "https://console.example.com/app", "no path"),
    ("SWITCHBOARD_WS_ALLOWED_ORIGINS", "wss://console.example.com", "http or https"),
    ("SWITCHBOARD_WS_ALLOWED_ORIGINS", "https://console.example.com:99999", "out of range"),
    ("SWITCHBOARD_WS_ALLOWED_ORIGINS", "https://me@console.example.com", "user info"),
    ("SECURE_PROXY_SSL_HEADER", "https", "'X-Forwarded-Proto: https'"),
    ("SECURE_PROXY_SSL_HEADER", "X Forwarded: https", "is not a header"),
    ("SECURE_HSTS_SECONDS", "-1", "must be at least 0"),
])
def test_it_names_a_bad_value(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                              message: str) -> None:
    monkeypatch.setenv(name, value)
    readers = {"SWITCHBOARD_TRUSTED_PROXIES": envreaders.envnetworks,
               "SECURE_PROXY_SSL_HEADER": envreaders.envheader,
               "SECURE_HSTS_SECONDS": lambda n: envreaders.envint(n, 0, minimum=0)}
    read = readers.get(name, lambda n: envreaders.envorigins(n, []))
    with pytest.raises(ImproperlyConfigured, match=name) as raised:
        read(name)
    assert message in str(raised.value)


# --- the HTTPS settings at work ------------------------------------------------------------------


def test_it_redirects_plain_http_and_sends_hsts_over_https(settings: Any) -> None:
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SECURE_HSTS_PRELOAD = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    plain = Client().get("/login/")
    assert plain.status_code == 301 and plain["Location"] == "https://testserver/login/"
    assert "Strict-Transport-Security" not in plain
    secure = Client().get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert secure.status_code == 200
    assert secure["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"


def test_it_marks_the_cookies_secure(settings: Any, demo: None) -> None:
    auth_views.limiter().storage.reset()  # failures other tests counted in this process
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    client = Client()
    page = client.get("/login/")
    assert page.cookies[settings.CSRF_COOKIE_NAME]["secure"] is True
    signed_in = client.post("/login/", {"username": "operator", "password": "switchboard"})
    assert signed_in.status_code == 302
    assert signed_in.cookies[settings.SESSION_COOKIE_NAME]["secure"] is True


def test_it_sends_plain_cookies_by_default(demo: None) -> None:
    page = Client().get("/login/")
    assert page.cookies["csrftoken"]["secure"] == ""


# --- websocket origins ---------------------------------------------------------------------------


def scope(origin: str | None, host: str = "127.0.0.1:8000", scheme: str = "ws",
          **headers: str) -> dict[str, Any]:
    pairs = [(b"host", host.encode())] + [
        (name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    if origin is not None:
        pairs.append((b"origin", origin.encode()))
    return {"type": "websocket", "scheme": scheme, "headers": pairs}


def test_it_takes_only_the_pages_own_origin() -> None:
    assert origin_allowed(scope("http://127.0.0.1:8000"))
    assert origin_allowed(scope("HTTP://127.0.0.1:8000/"))  # normalised as browsers write it
    assert origin_allowed(scope("http://localhost", host="localhost:80"))
    assert origin_allowed(scope("http://[::1]:8000", host="[::1]:8000"))
    for foreign in ("http://127.0.0.1:9999", "https://127.0.0.1:8000", "http://127.0.0.1",
                    "http://localhost:8000", "https://evil.example", "null", "",
                    "http://127.0.0.1:8000/path", "http://127.0.0.1:99999"):
        assert not origin_allowed(scope(foreign)), foreign
    assert not origin_allowed(scope(None))


def test_it_refuses_a_host_outside_allowed_hosts_even_from_its_own_origin() -> None:
    """DNS rebinding: evil.example resolved to this server sends its own name as the Host."""
    assert not origin_allowed(scope("http://evil.example:8000", host="evil.example:8000"))
    assert not origin_allowed({"type": "websocket", "headers": [(b"origin", b"http://x")]})


def test_it_refuses_two_origin_or_host_headers() -> None:
    twice = scope("http://127.0.0.1:8000")
    twice["headers"].append((b"origin", b"https://evil.example"))
    assert not origin_allowed(twice)
    twice = scope("http://127.0.0.1:8000")
    twice["headers"].append((b"host", b"evil.example"))
    assert not origin_allowed(twice)


def test_it_takes_https_origins_for_secure_sockets(settings: Any) -> None:
    assert origin_allowed(scope("https://127.0.0.1:8000", scheme="wss"))
    assert not origin_allowed(scope("http://127.0.0.1:8000", scheme="wss"))
    assert not origin_allowed(scope("https://127.0.0.1:8000", x_forwarded_proto="https"))
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert origin_allowed(scope("https://127.0.0.1:8000", x_forwarded_proto="https"))
    assert not origin_allowed(scope("http://127.0.0.1:8000", x_forwarded_proto="https"))
    assert not origin_allowed(scope("https://127.0.0.1:8000", x_forwarded_proto="http"))


def test_it_takes_the_listed_origins_exactly(settings: Any) -> None:
    settings.SWITCHBOARD_WS_ALLOWED_ORIGINS = ["https://console.example", "http://ops.example:81"]
    assert origin_allowed(scope("https://console.example", host="10.0.0.2:8000"))
    assert origin_allowed(scope("https://console.example:443", host="10.0.0.2:8000"))
    assert origin_allowed(scope("http://ops.example:81", host="10.0.0.2:8000"))
    for foreign in ("http://console.example", "https://console.example:8443",
                    "https://sub.console.example", "http://ops.example", "https://ops.example:81"):
        assert not origin_allowed(scope(foreign, host="10.0.0.2:8000")), foreign


def _session_cookie(user: User) -> str:
    from django.conf import settings

    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def _connect(origin: str, cookie: str, scheme: str = "ws") -> bool:
    application = websocket_application()

    async def with_scheme(scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return await application({**scope, "scheme": scheme}, receive, send)

    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", origin.encode()),
               (b"cookie", cookie.encode())]
    communicator = WebsocketCommunicator(with_scheme, "/ws/runs/", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    if connected:
        await communicator.disconnect()
    return connected


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_it_opens_a_signed_in_socket_only_from_its_own_origin(demo: None) -> None:
    operator = await sync_to_async(User.objects.get)(username="operator")
    cookie = await sync_to_async(_session_cookie)(operator)
    assert await _connect("http://127.0.0.1:8000", cookie)
    assert not await _connect("http://127.0.0.1:9999", cookie)
    assert not await _connect("https://127.0.0.1:8000", cookie)
    assert not await _connect("http://localhost:8000", cookie)
    assert await _connect("https://127.0.0.1:8000", cookie, scheme="wss")
    assert not await _connect("http://127.0.0.1:8000", cookie, scheme="wss")
