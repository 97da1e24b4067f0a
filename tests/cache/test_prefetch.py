"""Dependency prefetch: a fresh index file brings in the index files cargo will ask for next.

What is prefetched is read from real crates.io index files; the behaviour runs the mirror app against
the fake upstream, and one test drives the real cargo through the mirror process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.cache.prefetch import (
    MAX_DEPENDENCIES,
    MAX_DEPTH,
    MAX_PER_TRIGGER,
    dependencies,
    newest_matching,
)
from cratemirror.http.context import MIRROR
from tests.conftest import MirrorFactory
from tests.fake_upstream import (
    REAL_INDEX,
    Dep,
    FakeRegistry,
    index_path,
    run_cargo,
    write_cargo_home,
    write_cargo_project,
)
from tests.mirror_process import MirrorProcess
from tests.policy_support import write_advisory


def real(name: str) -> bytes:
    return (REAL_INDEX / index_path(name)).read_bytes()


def names(body: bytes) -> list[str]:
    return sorted(dependency.name.name for dependency in dependencies(body))


def test_what_cargo_needs_next_from_real_index_files() -> None:
    # regex: regex-automata and regex-syntax always; aho-corasick and memchr through default -> perf
    # -> perf-literal -> dep:...; the dev-dependencies (anyhow, quickcheck, ...) never.
    assert names(real("regex")) == ["aho-corasick", "memchr", "regex-automata", "regex-syntax"]
    # serde: serde_derive is a normal dependency under cfg(any()) (cargo fetch takes every target)
    assert names(real("serde")) == ["serde_derive"]
    assert names(real("syn")) == ["proc-macro2", "quote", "unicode-ident"]
    assert names(real("anyhow")) == []  # only optional (backtrace) and dev dependencies


def line(vers: str, deps: list[dict[str, Any]], **extra: Any) -> bytes:
    record = {"name": "app", "vers": vers, "deps": deps, "cksum": "0" * 64, "features": {}, "yanked": False}
    return json.dumps({**record, **extra}).encode()


def dep(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "req": "^1", "optional": False, "kind": "normal", **extra}


def test_newest_non_yanked_release_and_its_features() -> None:
    chosen = [
        dep("chosen"),
        dep("renamed", package="real-name"),
        dep("tool", kind="build"),
        dep("dev-only", kind="dev"),
        dep("off", optional=True),
        dep("weak", optional=True),
        dep("on", optional=True),
        dep("viafeat", optional=True),
        dep("other-registry", registry="https://example.com/index"),
    ]
    features = {"default": ["std", "weak?/x"], "std": ["dep:on", "viafeat/std"]}
    body = b"\n".join(
        [
            line("2.0.0", [dep("newest-yanked")], yanked=True),
            line("1.5.0", chosen, features=features),
            line("1.4.0", [dep("older")]),
            line("3.0.0-beta.1", [dep("prerelease")]),
            b"not json",
            b"",
        ]
    )
    assert names(body) == ["chosen", "on", "real-name", "tool", "viafeat"]


def test_hostile_index_lines_cost_nothing() -> None:
    hostile = [
        dep("../../etc"),
        dep("/abs"),
        dep("a" * 65),
        dep("x", package=["not", "a", "string"]),
        {"name": 7},
        "a string",
    ]
    body = line("1.0.0", [*hostile, *(dep(f"dep{i}") for i in range(500))])
    picked = names(body)
    assert len(picked) == MAX_DEPENDENCIES
    assert all(name.startswith("dep") for name in picked)
    assert names(b"[" * 100_000) == []
    assert names(json.dumps({"vers": "1.0.0", "deps": "not a list"}).encode()) == []
    assert names(line("1.0.0", [dep("x")], features={"default": ["a"], "a": ["a", "default"]})) == ["x"]


def publish_tree(registry: FakeRegistry) -> None:
    registry.add_crate("leaf", "1.0.0")
    registry.add_crate("builder", "1.0.0")
    registry.add_crate("test-helper", "1.0.0")
    registry.add_crate("extra", "1.0.0")
    registry.add_crate(
        "middle",
        "1.0.0",
        deps=[
            Dep("leaf", "^1"),
            Dep("builder", "^1", kind="build"),
            Dep("test-helper", "^1", kind="dev"),
            Dep("extra", "^1", optional=True),
        ],
    )
    registry.add_crate("top", "1.0.0", deps=[Dep("middle", "^1")])


async def prefetched(mirror: TestClient[Any, Any]) -> None:
    await mirror.app[MIRROR].registries["crates-io"].index.prefetch.drained()


async def test_dependencies_are_fetched_before_cargo_asks(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    publish_tree(registry)
    mirror = await mirror_factory(upstream__prefetch="index")
    response = await mirror.get(f"/index/{index_path('top')}")
    assert response.status == 200
    await prefetched(mirror)
    # top -> middle -> leaf and builder, without a client asking; never the dev or optional ones
    for name in ("middle", "leaf", "builder"):
        assert registry.count(f"/index/{index_path(name)}") == 1, name
    for name in ("test-helper", "extra"):
        assert registry.count(f"/index/{index_path(name)}") == 0, name

    registry.reset_counts()
    for name in ("middle", "leaf", "builder"):
        response = await mirror.get(f"/index/{index_path(name)}")
        assert response.status == 200
        assert response.headers["X-Cache"] == "HIT", name
    assert registry.count("/index/") == 0
    metrics = await (await mirror.get("/metrics")).text()
    # prefetches are upstream requests, not client requests: 1 miss (top) and 3 hits
    assert 'cratemirror_cache_requests_total{kind="index",registry="crates-io",result="miss"} 1.0' in metrics
    assert 'cratemirror_cache_requests_total{kind="index",registry="crates-io",result="hit"} 3.0' in metrics


async def test_prefetch_can_be_turned_off(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    publish_tree(registry)
    mirror = await mirror_factory(upstream__prefetch="off")
    assert (await mirror.get(f"/index/{index_path('top')}")).status == 200
    await prefetched(mirror)
    assert registry.count("/index/") == 1


async def test_a_missing_dependency_is_remembered(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    mirror = await mirror_factory(upstream__prefetch="index")
    registry.add_crate("top", "1.0.0", deps=[Dep("ghost", "^1"), Dep("leaf", "^1")])
    registry.add_crate("leaf", "1.0.0")
    assert (await mirror.get(f"/index/{index_path('top')}")).status == 200
    await prefetched(mirror)
    assert registry.count(f"/index/{index_path('ghost')}") == 1
    response = await mirror.get(f"/index/{index_path('ghost')}")
    assert response.status == 404  # the remembered "not found", not a second upstream request
    assert registry.count(f"/index/{index_path('ghost')}") == 1


async def test_cargo_finds_the_next_round_cached(registry: FakeRegistry, tmp_path: Path) -> None:
    """Real cargo, cold: every index file below the first round was fetched before it asked."""
    publish_tree(registry)
    project, home = tmp_path / "project", tmp_path / "home"
    # One worker: with two, cargo's next request may reach the other one before the prefetch takes the
    # fetch lock, and that one fetches instead (still one upstream request, but not a prefetch).
    async with MirrorProcess(registry.index_url, tmp_path / "cache", tmp_path, workers=1) as mirror:
        write_cargo_home(home, f"{mirror.url}/index/")
        write_cargo_project(project, {"top": "1"})
        code, output = await run_cargo(["fetch"], project, home)
        assert code == 0, output
        assert await mirror.stop() == 0, mirror.output()
    log = mirror.output()  # after the stop: every worker has flushed its batched access lines
    for name in ("top", "middle", "leaf", "builder"):
        assert registry.count(f"/index/{index_path(name)}") == 1, name
    # Only cargo's first request waited on an upstream fetch of its own ("upstream=" in the access
    # line); the rest were cached, or joined the prefetch already on its way.
    lines = [entry for entry in log.splitlines() if '"GET /index/' in entry and "cargo/" in entry]
    lines = [entry for entry in lines if "config.json" not in entry]
    assert len(lines) == 4, lines
    fetched_for_cargo = [entry for entry in lines if " upstream=" in entry]
    assert len(fetched_for_cargo) == 1 and index_path("top") in fetched_for_cargo[0], fetched_for_cargo


def test_the_version_cargo_would_pick() -> None:
    body = b"\n".join(
        [
            line("1.2.0", []),
            line("1.9.0", [], yanked=True),
            line("1.3.1", []),
            line("2.0.0", []),
            line("1.4.0-rc.1", []),
            b"{broken",
        ]
    )
    assert newest_matching(body, "^1.2") == "1.3.1"
    assert newest_matching(body, "1") == "1.3.1"
    assert newest_matching(body, "*") == "2.0.0"
    assert newest_matching(body, "=1.4.0-rc.1") == "1.4.0-rc.1"
    assert newest_matching(body, "^3") is None
    assert newest_matching(body, "not a requirement") is None


async def test_crates_mode_stores_the_picked_versions_before_cargo_asks(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    publish_tree(registry)
    registry.add_crate("leaf", "1.1.0")
    registry.add_crate("leaf", "2.0.0")  # outside middle's ^1: never fetched
    mirror = await mirror_factory(upstream__prefetch="crates")
    assert (await mirror.get(f"/index/{index_path('top')}")).status == 200
    await prefetched(mirror)
    for name, version in (("middle", "1.0.0"), ("leaf", "1.1.0"), ("builder", "1.0.0")):
        assert registry.count(f"/crates/{name}/{version}/download") == 1, name
    assert registry.count("/crates/leaf/2.0.0/") == registry.count("/crates/leaf/1.0.0/") == 0
    assert registry.count("/crates/top/") == 0  # what cargo asked for itself: its version is cargo's choice
    registry.reset_counts()
    response = await mirror.get("/api/v1/crates/leaf/1.1.0/download")
    assert response.status == 200 and response.headers["X-Cache"] == "HIT"
    assert await response.read() == registry.get_version("leaf", "1.1.0").data
    assert registry.requests.total() == 0


async def test_crates_mode_never_fetches_what_the_policy_blocks(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    """cargo sees a blocked version yanked in the policy's view and picks the next one: so does the
    prefetch, and the blocked one is never downloaded from upstream."""
    publish_tree(registry)
    registry.add_crate("leaf", "1.1.0")
    db = tmp_path / "advisory-db"
    write_advisory(db, "leaf", "RUSTSEC-2099-0007", patched=[">= 1.2.0"], unaffected=["< 1.1.0"])
    mirror = await mirror_factory(upstream__prefetch="crates", policy__mode="enforce", policy__advisory_db=db)
    assert (await mirror.get(f"/index/{index_path('top')}")).status == 200
    await prefetched(mirror)
    assert registry.count("/crates/leaf/1.1.0/") == 0
    assert registry.count("/crates/leaf/1.0.0/download") == 1


def publish_fan_out(registry: FakeRegistry, width: int = 6, depth: int = 4) -> int:
    """A tree where every crate depends on `width` others, `depth` levels deep: sum(width^k) crates."""
    level = ["fan"]
    total = 0
    for round_ in range(depth + 1):
        following = [f"{name}-{n}" for name in level for n in range(width)] if round_ < depth else []
        for position, name in enumerate(level):
            children = following[position * width : (position + 1) * width]
            registry.add_crate(name, "1.0.0", deps=[Dep(child, "^1") for child in children])
            total += 1
        level = following
    return total


async def test_one_request_sets_off_a_bounded_prefetch(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    total = publish_fan_out(registry)
    assert total > 1000  # what an unbounded prefetch would walk
    mirror = await mirror_factory(upstream__prefetch="crates")
    assert (await mirror.get(f"/index/{index_path('fan')}")).status == 200
    await prefetched(mirror)
    index_files = registry.count("/index/") - registry.count("/index/config.json")
    assert 1 < index_files <= 1 + MAX_PER_TRIGGER, index_files
    assert registry.count("/download") <= MAX_PER_TRIGGER
    # Never deeper than MAX_DEPTH rounds from the crate the client asked for.
    deepest = max(path.rsplit("/", 1)[1].count("-") for path in registry.requests if "/index/" in path)
    assert deepest <= MAX_DEPTH
    # The good path: the next client request gets its own budget, and what was prefetched is a hit.
    registry.reset_counts()
    response = await mirror.get(f"/index/{index_path('fan-0')}")
    assert response.status == 200 and response.headers["X-Cache"] == "HIT"
    assert (await mirror.get(f"/index/{index_path('fan-5-5-5-5')}")).status == 200
    await prefetched(mirror)
    assert 1 <= registry.count("/index/") <= 1 + MAX_PER_TRIGGER
