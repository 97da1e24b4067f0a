"""Issue 18, finding 5: behind the shipped HAProxy front, each client has its own budget and its own
address in the access log (the right-most X-Forwarded-For address that is not a trusted proxy), and
X-Forwarded-* from anyone but server.trusted_proxies is ignored."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from pathlib import Path

import aiohttp
import pytest

from cratemirror.cache.ratelimit import BURST
from cratemirror.http.clients import resolve_client, trusted_networks
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.fleet_support import HAProxy, make_tls
from tests.mirror_process import MirrorProcess

FRONT_ONLY = ("127.0.0.1/32", "::1/128")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["10.9.9.9, 203.0.113.7"], "203.0.113.7"),  # what the client wrote is left of it
        ("127.0.0.1", ["203.0.113.7", "127.0.0.1"], "203.0.113.7"),  # two headers, two trusted hops
        ("127.0.0.1", ["not-an-address, 203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["203.0.113.7, junk"], "127.0.0.1"),  # garbage from a trusted hop: that hop
        ("127.0.0.1", ["[2001:db8::1]"], "2001:db8::1"),
        ("127.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1"),
        ("127.0.0.1", ["127.0.0.1"], "127.0.0.1"),  # every hop trusted: the left-most
        ("198.51.100.2", ["203.0.113.7"], "198.51.100.2"),  # not a trusted peer: the header is ignored
        ("::1", ["2001:db8::5"], "2001:db8::5"),
    ],
)
def test_the_client_is_the_right_most_untrusted_address(peer: str, forwarded: list[str], client: str) -> None:
    assert resolve_client(peer, forwarded, trusted_networks(FRONT_ONLY)) == client
    ipaddress.ip_address(client)  # always an address in normal form, never header text


async def _lookups(session: aiohttp.ClientSession, base: str, names: list[str], **kw: object) -> list[int]:
    async def one(name: str) -> int:
        async with session.get(f"{base}/index/{index_path(name)}", **kw) as response:  # type: ignore[arg-type]
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one(name) for name in names)))


async def test_two_clients_behind_haproxy_have_their_own_budgets(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    registry.add_crate("serde", "1.0.0")
    config = tmp_path / "mirror.yaml"
    config.write_text(f"server:\n  trusted_proxies: {json.dumps(list(FRONT_ONLY))}\n")
    tls = make_tls(tmp_path / "tls")
    context = ssl.create_default_context(cafile=str(tls.ca_cert))

    def session_from(address: str) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=context, local_addr=(address, 0), limit=0)
        return aiohttp.ClientSession(connector=connector)

    async with (
        MirrorProcess(
            registry.index_url, tmp_path / "cache", tmp_path, workers=2, extra_args=["--config", str(config)]
        ) as mirror,
        HAProxy(tmp_path, tls, [("127.0.0.1", mirror.port)]) as front,
        session_from("127.0.0.2") as first,
        session_from("127.0.0.3") as second,
    ):
        # The first client spends its budget (and a forged X-Forwarded-For does not move the charge).
        forged = {"X-Forwarded-For": "127.0.0.3"}
        statuses = await _lookups(first, front.url, [f"none{n}" for n in range(BURST + 40)], headers=forged)
        assert statuses.count(429) > 0 and set(statuses) == {404, 429}
        # The second still has all of its own: every lookup answered by upstream.
        statuses = await _lookups(second, front.url, [f"other{n}" for n in range(20)])
        assert statuses == [404] * 20
        assert await _lookups(second, front.url, ["serde"]) == [200]
        assert await _lookups(first, front.url, ["serde"]) == [200]  # a name that exists: never refused
    log = mirror.output()
    assert "127.0.0.2" in log and "127.0.0.3" in log, log[-2000:]


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    mirror = await mirror_factory(server__trusted_proxies=FRONT_ONLY)
    base = str(mirror.make_url("")).rstrip("/")
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-For": "1.2.3.4"}
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{base}/index/config.json", headers=forged) as response:
            document = json.loads(await response.read())
        assert document["dl"] == f"{base}/api/v1/crates"
        # The budget is the peer's: spending it from 127.0.0.2 while claiming to be someone else.
        statuses = await _lookups(session, base, [f"none{n}" for n in range(BURST + 5)], headers=forged)
        assert 429 in statuses
    # From a trusted peer (127.0.0.1 here), the same headers are believed.
    response = await mirror.get("/index/config.json", headers=forged)
    assert json.loads(await response.read())["dl"] == "https://evil.example/api/v1/crates"
    assert (
        await mirror.get(f"/index/{index_path('none0')}", headers={"X-Forwarded-For": "1.2.3.5"})
    ).status == 404
