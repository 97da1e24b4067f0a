"""The client's address without X-Forwarded-For is worked out once per peer address (issue 24: it was
parsed for every access line), and is what resolve_client says for that peer."""

from __future__ import annotations

import pytest

from cratemirror.http.clients import _peer_text, resolve_client, trusted_networks

NETWORKS = trusted_networks(("127.0.0.1/8", "::1/128"))


@pytest.mark.parametrize(
    "peer", ["127.0.0.1", "10.1.2.3", "::1", "2001:db8::1", "::ffff:192.0.2.7", "[::1]", "", None, "garbage"]
)
def test_a_peer_alone_resolves_as_resolve_client_does(peer: str | None) -> None:
    assert _peer_text(peer) == resolve_client(peer, [], NETWORKS)
    assert _peer_text(peer) == resolve_client(peer, [], ())  # trusted or not: the peer itself
