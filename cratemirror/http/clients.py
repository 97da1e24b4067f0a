"""Who a request is from, behind a reverse proxy or not: one answer for budgets, logs and audit lines.

`server.trusted_proxies` lists the networks whose X-Forwarded-* headers are believed (by default
loopback only). A request whose peer is one of them is from the right-most X-Forwarded-For address
that is not (every hop right of it was appended by a proxy we trust; whatever lies left of it was
written by the client and proves nothing). From any other peer, X-Forwarded-For, -Proto and -Host are
ignored: the peer is the client. Addresses are parsed with ipaddress and printed in its normal form, so
a key or a log line never holds raw header text.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDictProxy

from cratemirror.http.context import MIRROR

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOPS = 32  # X-Forwarded-For entries looked at, from the right
DEFAULT_TRUSTED = ("127.0.0.1/8", "::1/128")

_CLIENT = web.RequestKey("cratemirror.client", str)
_TRUSTED_PEER = web.RequestKey("cratemirror.trusted_peer", bool)


@functools.lru_cache(maxsize=8)
def trusted_networks(texts: tuple[str, ...]) -> tuple[Network, ...]:
    """The config's CIDRs (validated at load) as networks, parsed once."""
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def parse_address(text: str) -> Address | None:
    """An address as a proxy writes it (`[::1]` and `%zone` tolerated), IPv4-mapped IPv6 as IPv4."""
    text = text.strip().removeprefix("[").removesuffix("]").split("%", 1)[0]
    if not text or len(text) > 64:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_trusted(address: Address, networks: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in networks)


def resolve_client(peer: str | None, forwarded_for: Sequence[str], networks: Sequence[Network]) -> str:
    """The client of a request from `peer` carrying these X-Forwarded-For header values."""
    address = parse_address(peer or "")
    if address is None:
        return peer or "-"  # a Unix socket or no peer at all: nothing to resolve
    if not _is_trusted(address, networks):
        return str(address)
    hops = [hop for value in forwarded_for for hop in value.split(",")][-MAX_HOPS:]
    passed: Address = address  # the last trusted hop walked through
    for hop in reversed(hops):
        parsed = parse_address(hop)
        if parsed is None:  # garbage beyond the last trusted hop: the hop that passed it on
            return str(passed)
        if not _is_trusted(parsed, networks):
            return str(parsed)
        passed = parsed
    return str(passed)  # every hop trusted: the left-most one


def _networks(request: web.BaseRequest) -> tuple[Network, ...]:
    mirror = None
    if isinstance(request, web.Request):
        with contextlib.suppress(AttributeError, AssertionError, RuntimeError):  # not routed: malformed
            mirror = request.app.get(MIRROR)
    texts = mirror.config.server.trusted_proxies if mirror is not None else DEFAULT_TRUSTED
    return trusted_networks(tuple(texts))


def from_trusted_proxy(request: web.BaseRequest) -> bool:
    """Whether the peer is a trusted proxy, so its X-Forwarded-* headers may be believed."""
    known = request.get(_TRUSTED_PEER)
    if known is None:
        address = parse_address(request.remote or "")
        known = address is not None and _is_trusted(address, _networks(request))
        request[_TRUSTED_PEER] = known
    return known


def client_address(request: web.BaseRequest) -> str:
    """The client's address (normal form), for budgets, the access log and audit lines."""
    known = request.get(_CLIENT)
    if known is None:
        headers = request.headers  # a plain dict on a request that did not parse: nothing forwarded
        forwarded = headers.getall("X-Forwarded-For", []) if isinstance(headers, CIMultiDictProxy) else []
        if forwarded:
            known = resolve_client(request.remote, forwarded, _networks(request))
        else:  # trusted peer or not, the peer itself: parsed once per address, not per request
            known = _peer_text(request.remote)
        request[_CLIENT] = known
    return known


@functools.lru_cache(maxsize=4096)
def _peer_text(peer: str | None) -> str:
    """resolve_client(peer, [], any networks): the peer's address in normal form."""
    address = parse_address(peer or "")
    return peer or "-" if address is None else str(address)
