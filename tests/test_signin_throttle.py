"""One sign-in throttle for every way in: the console's /login/ and the admin's /admin/login/
share the counts, a username is counted as sign-in reads it (NFKC, any case), and the client
address honours X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

import pytest
from django.test import Client, RequestFactory

from console import auth_views
from console.client_address import client_address

LOCK = 5  # failures per username (auth_views.FAILURES_PER_USERNAME)
ADDRESS_LOCK = 20  # failures per address (auth_views.FAILURES_PER_ADDRESS)
PROXY = "10.0.0.9"



@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    auth_views.limiter().storage.reset()


@pytest.fixture
def behind_proxy(settings: Any) -> None:
    settings.SWITCHBOARD_TRUSTED_PROXIES = (ip_network(PROXY), ip_network("10.1.0.0/16"))


def console_login(client: Client, username: str, password: str, addr: str = "10.0.0.1",
                  **headers: str) -> Any:
    return client.post("/login/", {"username": username, "password": password},
                       REMOTE_ADDR=addr, **headers)


def admin_login(client: Client, username: str, password: str, addr: str = "10.0.0.1") -> Any:
    return client.post("/admin/login/", {"username": username, "password": password,
                                          "next": "/admin/"}, REMOTE_ADDR=addr)


def signed_in_as(client: Client) -> str | None:
    from django.contrib.auth.models import User

    user_id = client.session.get("_auth_user_id")
    return User.objects.get(pk=user_id).username if user_id else None


def fail(login: Any, username: str, times: int = LOCK) -> None:
    """Wrong passwords, each from an address of its own: only the username count grows."""
    for i in range(times):
        response = login(Client(), username, f"guess-{i}", addr=f"10.0.1.{i}")
        assert response.status_code == 200, response.status_code


# --- every sign-in page shares one count --------------------------------------------------------


def test_it_locks_the_admin_sign_in_after_the_console_locked_the_account(demo: None) -> None:
    fail(console_login, "admin")
    client = Client()
    blocked = admin_login(client, "admin", "switchboard", addr="10.0.2.1")
    assert blocked.status_code == 429
    assert b"Too many failed sign-in attempts" in blocked.content
    assert signed_in_as(client) is None
    assert client.get("/admin/").status_code == 302  # still not in


def test_it_locks_the_console_after_guessing_at_the_admin_sign_in(demo: None) -> None:
    fail(admin_login, "operator")
    client = Client()
    assert console_login(client, "operator", "switchboard", addr="10.0.2.1").status_code == 429
    assert signed_in_as(client) is None


def test_it_lets_the_admin_sign_in_through_below_the_limit(demo: None) -> None:
    fail(admin_login, "admin", times=LOCK - 1)
    client = Client()
    response = admin_login(client, "admin", "switchboard", addr="10.0.2.1")
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert signed_in_as(client) == "admin"


def test_it_still_lets_another_user_in_with_the_right_password(demo: None) -> None:
    fail(console_login, "operator")
    for login in (console_login, admin_login):
        assert login(Client(), "operator", "switchboard", addr="10.0.2.1").status_code == 429
    client = Client()
    assert console_login(client, "reviewer", "switchboard", addr="10.0.2.1").status_code == 302
    assert signed_in_as(client) == "reviewer"
    client = Client()
    assert admin_login(client, "admin", "switchboard", addr="10.0.2.1").status_code == 302
    assert signed_in_as(client) == "admin"


def test_it_does_not_count_a_successful_sign_in_anywhere(demo: None) -> None:
    for _ in range(LOCK + 2):
        assert console_login(Client(), "admin", "switchboard").status_code == 302
        assert admin_login(Client(), "admin", "switchboard").status_code == 302


# --- the username as sign-in reads it -----------------------------------------------------------


def test_it_signs_a_full_width_name_in_as_its_ascii_twin(demo: None) -> None:
    """Why the count must be normalised: Django's sign-in takes ｒｅｖｉｅｗｅｒ２ as reviewer2."""
    client = Client()
    assert console_login(client, "reviewer\uff12", "switchboard").status_code == 302
    assert signed_in_as(client) == "reviewer2"


def test_it_counts_a_full_width_name_with_its_ascii_twin(demo: None) -> None:
    fail(console_login, "reviewer2")
    for spelling in ("reviewer\uff12", "\uff52\uff45\uff56\uff49\uff45\uff57\uff45\uff52\uff12",
                     "REVIEWER2", " reviewer2 "):
        client = Client()
        for login in (console_login, admin_login):
            assert login(client, spelling, "switchboard", addr="10.0.2.1").status_code == 429
        assert signed_in_as(client) is None


def test_it_counts_guesses_at_the_full_width_name_against_the_account(demo: None) -> None:
    fail(console_login, "reviewer\uff12", times=3)
    fail(admin_login, "Reviewer2", times=2)
    assert console_login(Client(), "reviewer2", "switchboard", addr="10.0.2.1").status_code == 429


def test_it_unlocks_by_any_spelling(demo: None) -> None:
    fail(console_login, "reviewer2")
    auth_views.clear("REVIEWER\uff12")
    assert console_login(Client(), "reviewer2", "switchboard", addr="10.0.2.1").status_code == 302


# --- the client address ----------------------------------------------------------------------


def test_it_ignores_forwarded_for_from_an_untrusted_peer(demo: None) -> None:
    for i in range(ADDRESS_LOCK):
        response = console_login(Client(), f"nobody-{i}", "x", addr="10.9.9.9",
                                 HTTP_X_FORWARDED_FOR=f"203.0.113.{i}")
        assert response.status_code == 200
    blocked = console_login(Client(), "operator", "switchboard", addr="10.9.9.9",
                            HTTP_X_FORWARDED_FOR="198.51.100.77")
    assert blocked.status_code == 429
    assert console_login(Client(), "operator", "switchboard", addr="10.9.9.8").status_code == 302


def test_it_counts_the_forwarded_client_behind_a_trusted_proxy(demo: None,
                                                                behind_proxy: None) -> None:
    for i in range(ADDRESS_LOCK):
        # The client wrote a different left-hand hop each time; the proxy appended the truth.
        response = console_login(Client(), f"nobody-{i}", "x", addr=PROXY,
                                 HTTP_X_FORWARDED_FOR=f"192.0.2.{i}, 203.0.113.7")
        assert response.status_code == 200
    blocked = console_login(Client(), "operator", "switchboard", addr=PROXY,
                            HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert blocked.status_code == 429
    # Another client behind the same proxy is not locked out with it.
    client = Client()
    assert console_login(client, "operator", "switchboard", addr=PROXY,
                         HTTP_X_FORWARDED_FOR="203.0.113.8").status_code == 302
    assert signed_in_as(client) == "operator"


def _address(remote: str, forwarded: str | None = None) -> str:
    headers = {} if forwarded is None else {"HTTP_X_FORWARDED_FOR": forwarded}
    return client_address(RequestFactory().get("/", REMOTE_ADDR=remote, **headers))


def test_it_reads_the_right_most_untrusted_hop(behind_proxy: None) -> None:
    assert _address(PROXY, "198.51.100.1, 203.0.113.7") == "203.0.113.7"
    # Proxies in a chain, all trusted: the hop before the first of them is the client.
    assert _address(PROXY, "198.51.100.1, 203.0.113.7, 10.1.2.3") == "203.0.113.7"
    assert _address(PROXY, "2001:db8::7") == "2001:db8::7"
    assert _address(PROXY, "10.1.0.1, 10.1.0.2") == "10.1.0.1"  # only proxies: the left-most
    assert _address(PROXY) == PROXY
    assert _address(PROXY, "not-an-address, 10.1.0.2") == "10.1.0.2"
    assert _address(f"::ffff:{PROXY}", "203.0.113.7") == "203.0.113.7"


def test_it_takes_the_peer_when_no_proxy_is_trusted(settings: Any) -> None:
    settings.SWITCHBOARD_TRUSTED_PROXIES = ()
    assert _address(PROXY, "203.0.113.7") == PROXY
    assert _address("203.0.113.9", "10.0.0.1") == "203.0.113.9"


def test_it_reads_no_header_from_a_peer_outside_the_trusted_list(behind_proxy: None) -> None:
    assert _address("10.2.0.1", "203.0.113.7") == "10.2.0.1"
