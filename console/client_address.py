"""The address of the client behind a request, honouring only the proxies we were told to trust.

``X-Forwarded-For`` is whatever the client wrote, with each proxy on the way appending the
address it received the request from. So the header is read only when the peer
(``REMOTE_ADDR``) is in ``SWITCHBOARD_TRUSTED_PROXIES``, and from the right: the right-most
address that is not itself a trusted proxy is the client, everything left of it could be forged.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

from django.conf import settings
from django.http import HttpRequest


def _parse(value: str) -> IPv4Address | IPv6Address | None:
    try:
        address = ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def _trusted(address: IPv4Address | IPv6Address) -> bool:
    return any(address in network for network in settings.SWITCHBOARD_TRUSTED_PROXIES)


def client_address(request: HttpRequest) -> str:
    peer_text = str(request.META.get("REMOTE_ADDR", ""))
    peer = _parse(peer_text)
    if peer is None:
        return peer_text
    if not _trusted(peer):
        return str(peer)
    client = peer
    hops = str(request.META.get("HTTP_X_FORWARDED_FOR", "")).split(",")
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            break  # not written by a proxy we trust: the last trusted hop is all we know
        client = address
        if not _trusted(address):
            break
    return str(client)
