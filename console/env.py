"""Typed readers for environment variables. Every one fails loudly on a bad value."""

from __future__ import annotations

import os
import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


def envstr(name: str, default: str) -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no")


def envint(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


def envchoice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` (compared in lower case)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return value


def envlist(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def credentials_from_env(prefix: str) -> dict[str, str]:
    found = {}
    for key, value in os.environ.items():
        if key.startswith(prefix):
            name = key[len(prefix):].lower()
            if not name or not value:
                raise ImproperlyConfigured(f"{key} must name a credential and hold a value")
            found[name] = value
    return found


def database_from_url(url: str, *, sqlite_default_path: str) -> dict:
    """Turn ``DATABASE_URL`` into a Django DATABASES entry (PostgreSQL or SQLite only)."""
    if not url:
        url = f"sqlite:///{sqlite_default_path}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = unquote(parts.path)
        if url.startswith("sqlite:////"):
            name = path
        else:
            name = path[1:] if path.startswith("/") else path
        if not name:
            raise ImproperlyConfigured(f"DATABASE_URL={url!r} names no SQLite file")
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": name,
            "OPTIONS": {
                # WAL lets readers proceed while one writer commits; IMMEDIATE takes the write
                # lock at BEGIN so two workers never both read-then-upgrade and deadlock.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
        }
    if scheme in {"postgres", "postgresql", "pgsql"}:
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured(f"DATABASE_URL={url!r} names no database")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "CONN_MAX_AGE": 0,
        }
    raise ImproperlyConfigured(
        f"DATABASE_URL scheme {scheme!r} is not supported; use postgresql://... or sqlite:///..."
    )


def envnetworks(name: str, default: list[str] | None = None
                ) -> tuple[IPv4Network | IPv6Network, ...]:
    """Comma-separated IP addresses and CIDR blocks (``10.0.0.5,10.1.0.0/16,fd00::/8``)."""
    networks = []
    for item in envlist(name, default or []):
        try:
            networks.append(ip_network(item))
        except ValueError as error:
            raise ImproperlyConfigured(
                f"{name}: {item!r} is not an IP address or network ({error})") from None
    return tuple(networks)


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` in the form browsers send in ``Origin``: lower case, no default
    port, no trailing slash. ValueError for anything else (a path, user info, another scheme)."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError("an origin has no user info")
    if not parts.hostname:
        raise ValueError("it names no host")
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        raise ValueError("an origin has no path, query or fragment")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port  # ValueError when it is not a number in range
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return f"{scheme}://{host}"


def envorigins(name: str, default: list[str]) -> list[str]:
    """Comma-separated origins, each ``scheme://host[:port]``; normalised (see above)."""
    origins = []
    for item in envlist(name, default):
        try:
            origins.append(normalise_origin(item))
        except ValueError as error:
            raise ImproperlyConfigured(
                f"{name}: {item!r} is not an origin scheme://host[:port] ({error})") from None
    return origins


def envheader(name: str) -> tuple[str, str] | None:
    """``Header-Name: value`` as Django's ``SECURE_PROXY_SSL_HEADER`` pair
    (``("HTTP_HEADER_NAME", "value")``); None when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    header, sep, value = raw.partition(":")
    header, value = header.strip(), value.strip()
    if not sep or not _HEADER_NAME.fullmatch(header) or not value:
        raise ImproperlyConfigured(
            f"{name}={raw!r} is not a header and its value, e.g. 'X-Forwarded-Proto: https'")
    return "HTTP_" + header.upper().replace("-", "_"), value


def envtimezone(name: str, default: str) -> str:
    """An IANA time zone name (``Europe/Paris``, ``UTC``), checked against the zone database."""
    from console.time_zones import is_known_zone

    raw = os.environ.get(name)
    value = default if raw is None or raw.strip() == "" else raw.strip()
    if not is_known_zone(value):
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a time zone this machine knows; use an IANA name such "
            "as UTC, Europe/Paris or America/New_York")
    return value
