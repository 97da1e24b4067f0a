"""The fast tier: CrateService.deliver built directly against the fake upstream, no HTTP and no processes.

Each test asks the service for a download and checks the Delivery value it decides: where the bytes come
from, the cache result, and what reached upstream."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from cratemirror.cache.delivery import (
    Blocked,
    Delivery,
    Failed,
    FromFile,
    FromFill,
    HeadersOnly,
    MetricResult,
)
from cratemirror.cache.registry import Registry, build_registries
from cratemirror.fleet.storage.disk import DiskTrouble
from cratemirror.metrics import Metrics
from cratemirror.names import DEFAULT_REGISTRY, parse_crate_version
from tests.conftest import make_config
from tests.fake_upstream import FakeRegistry


@pytest.fixture
async def service(registry: FakeRegistry, tmp_path: Path) -> AsyncIterator[Registry]:
    """crates.io's bundle of services (index, crates, store, upstream client), started and closed."""
    bundle = build_registries(make_config(registry.index_url, tmp_path / "cache"), Metrics(), DiskTrouble())
    crates_io = bundle[DEFAULT_REGISTRY]
    await crates_io.start(offline=False)
    try:
        yield crates_io
    finally:
        await crates_io.close()


async def body_of(delivery: Delivery) -> bytes:
    """The bytes a route would send for this delivery (a fill: once it is verified)."""
    match delivery:
        case FromFile(file=file, size=size):
            with file:
                data = file.read()
            assert len(data) == size
            return data
        case FromFill(body=body, release=release):
            try:
                await body.finished
                return body.read_at(0, body.published)
            finally:
                release()
    raise AssertionError(f"no body in {delivery!r}")


async def deliver(service: Registry, name: str, version: str, *, head: bool = False) -> Delivery:
    return await service.crates.deliver(parse_crate_version(name, version), head=head, client="test")


async def test_a_miss_fills_once_then_hits_from_the_store(registry: FakeRegistry, service: Registry) -> None:
    crate = registry.add_crate("serde", "1.0.0")
    first = await deliver(service, "serde", "1.0.0")
    assert isinstance(first, FromFill) and first.result is MetricResult.MISS
    assert await body_of(first) == crate.data
    second = await deliver(service, "serde", "1.0.0")
    assert isinstance(second, FromFile) and second.result is MetricResult.HIT
    assert second.headers["ETag"] == f'"{hashlib.sha256(crate.data).hexdigest()}"'
    assert await body_of(second) == crate.data
    assert registry.count("/crates/serde/") == 1


async def test_unknown_versions_and_crates_are_negative(registry: FakeRegistry, service: Registry) -> None:
    registry.add_crate("serde", "1.0.0")
    for name, version in (("serde", "9.9.9"), ("nosuch", "1.0.0")):
        answer = await deliver(service, name, version)
        assert isinstance(answer, Failed), answer
        assert (answer.status, answer.result) == (404, MetricResult.NEGATIVE)
    assert registry.count("/crates/") == 0


async def test_head_fetches_no_tarball(registry: FakeRegistry, service: Registry) -> None:
    crate = registry.add_crate("serde", "1.0.0")
    answer = await deliver(service, "serde", "1.0.0", head=True)
    assert isinstance(answer, HeadersOnly)
    assert answer.headers["ETag"] == f'"{crate.cksum}"'
    assert registry.count("/crates/") == 0


async def test_a_corrupt_upstream_tarball_is_never_stored(registry: FakeRegistry, service: Registry) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.corrupt_crates = True
    answer = await deliver(service, "serde", "1.0.0")
    assert isinstance(answer, Failed) and answer.status == 502, answer
    assert service.store.get_crate_meta("serde", "1.0.0") is None


@dataclass
class DenyGate:
    """A gate that blocks one name, the way the policy's deny rule does; it counts what it judged."""

    denied: str
    judged: int = 0

    def blocks(self, name: str, version: str) -> bool:
        return name == self.denied

    def needs_license(self, name: str, version: str) -> bool:
        return False

    async def learn_license(self, name: str, version: str, crate: BinaryIO) -> None:
        raise AssertionError("no licence rule")

    async def judge(self, name: str, version: str, client: str) -> Refused | None:
        self.judged += 1
        return Refused("deny", f"{name} is denied") if name == self.denied else None


@dataclass(frozen=True)
class Refused:
    rule: str
    reason: str


async def test_the_gate_decides_before_anything_is_fetched(registry: FakeRegistry, service: Registry) -> None:
    registry.add_crate("evil", "1.0.0")
    good = registry.add_crate("good", "1.0.0")
    gate = DenyGate("evil")
    service.crates.gate = gate
    blocked = await deliver(service, "evil", "1.0.0")
    assert blocked == Blocked("deny", "evil is denied")
    assert registry.count("/crates/evil/") == 0
    assert await body_of(await deliver(service, "good", "1.0.0")) == good.data
    # a stored crate is judged again on every hit: a rule added later still applies
    gate.denied = "good"
    assert isinstance(await deliver(service, "good", "1.0.0"), Blocked)
    assert gate.judged == 3
