"""Fetching a document by URL for the knowledge base, without letting a URL reach inside.

The project's HTTP tools (orchestration/engine/http_tool.py) call endpoints an admin
configured, so they trust their URLs; a URL a user sends is not trusted: only http and https,
no credentials in it, every address its host resolves to must be public (no loopback, private,
link-local, multicast, reserved or unspecified address: no cloud metadata service, no admin
port on the server), the connection goes to the very address that was checked (a DNS answer
that changes between the check and the connection cannot move it inside), redirects are
followed by hand and checked the same way, and the body is read up to a size limit within a
timeout. ``SWITCHBOARD_KNOWLEDGE_FETCH_ALLOWED_HOSTS`` (empty by default) names hosts exempt
from the address check: an intranet wiki, or tests serving a page on loopback."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

MAX_BYTES = 5 * 1024 * 1024
TIMEOUT_S = 10.0
MAX_REDIRECTS = 3


class FetchRefused(Exception):
    """The URL may not be fetched, or fetching it failed: the message says why."""


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes
    media_type: str
    url: str  # after redirects


def _allowed_hosts() -> set[str]:
    from django.conf import settings

    return {h.lower() for h in settings.SWITCHBOARD_KNOWLEDGE_FETCH_ALLOWED_HOSTS}


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for flag in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(address, f"is_{flag}"):
            name = flag.replace("_", "-")
            return f"{address} is {'an' if name[0] in 'aeiou' else 'a'} {name} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return ""


def _checked(url: str) -> tuple[str, str, str]:
    """(the URL with the checked address as its host, the host, the address)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchRefused("only http and https URLs can be fetched")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused("a URL with credentials in it is refused")
    host = (parts.hostname or "").lower()
    if not host:
        raise FetchRefused("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchRefused("the URL's port is not a number between 0 and 65535") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise FetchRefused(f"the host {host!r} could not be resolved") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise FetchRefused(f"the host {host!r} could not be resolved")
    if host not in _allowed_hosts():
        for address in addresses:
            why = _refusal(address)
            if why:
                raise FetchRefused(f"the URL's host {host!r} is refused: {why}")
    address = str(addresses[0])
    netloc = f"[{address}]" if ":" in address else address
    pinned = urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path or "/", parts.query, ""))
    return pinned, host, address


def fetch(url: str, *, max_bytes: int = MAX_BYTES, timeout_s: float = TIMEOUT_S) -> Fetched:
    """The body and media type at ``url``; FetchRefused with the reason otherwise."""
    current = url
    # httpx's timeout bounds each read; this bounds the whole fetch (a server trickling one
    # byte every few seconds included).
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            pinned, host, _address = _checked(current)
            headers = {"Host": host if urlsplit(current).port is None
                       else f"{host}:{urlsplit(current).port}",
                       "Accept": "text/html, text/plain, text/markdown, application/pdf;q=0.9"}
            try:
                with client.stream("GET", pinned, headers=headers,
                                   extensions={"sni_hostname": host}) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        if not location:
                            raise FetchRefused("the URL redirected without a location")
                        current = urljoin(current, location)
                        continue
                    if response.status_code >= 400:
                        raise FetchRefused(f"the URL answered HTTP {response.status_code}")
                    body = bytearray()
                    for piece in response.iter_bytes():
                        if time.monotonic() > deadline:
                            raise FetchRefused(f"the URL did not answer within {timeout_s:g} s")
                        body += piece
                        if len(body) > max_bytes:
                            raise FetchRefused(f"the document is larger than {max_bytes} bytes")
                    media_type = response.headers.get("content-type", "").split(";")[0]
                    return Fetched(bytes(body), media_type.strip().lower() or "text/plain",
                                   current)
            except httpx.TimeoutException:
                raise FetchRefused(f"the URL did not answer within {timeout_s:g} s") from None
            except httpx.HTTPError as exc:
                raise FetchRefused(f"the URL could not be fetched: {type(exc).__name__}") from None
    raise FetchRefused(f"the URL redirected more than {MAX_REDIRECTS} times")
