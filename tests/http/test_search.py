"""`GET /api/v1/crates?q=…&per_page=…` (cargo search) through the mirror: the registry's answer, cached a
minute, from the cache while the API is down, only a validated query forwarded, the index's auth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from cratemirror.auth.tokens import add_token
from cratemirror.http.search import SEARCH
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry
from tests.mirror_process import metric_value


def publish(registry: FakeRegistry) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("serde", "1.0.1")
    registry.add_crate("serde_json", "1.0.0")
    registry.add_crate("tokio", "1.0.0")


async def search(mirror: TestClient[Any, Any], query: str, **headers: str) -> tuple[int, str, Any]:
    response = await mirror.get(f"/api/v1/crates?{query}", headers=headers)
    return response.status, response.headers.get("X-Cache", ""), await response.json()


async def test_search_is_the_registrys_answer_cached_a_minute(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    publish(registry)
    mirror = await mirror_factory(upstream__api_url=registry.url)
    status, cache, answer = await search(mirror, "q=serde&per_page=10")
    assert (status, cache) == (200, "MISS")
    assert [(c["name"], c["max_version"]) for c in answer["crates"]] == [
        ("serde", "1.0.1"),
        ("serde_json", "1.0.0"),
    ]
    assert answer["meta"]["total"] == 2
    status, cache, again = await search(mirror, "q=serde&per_page=10")
    assert (status, cache, again) == (200, "HIT", answer)
    assert registry.count("/api/v1/crates") == 1
    status, cache, one = await search(mirror, "q=serde&per_page=1")  # another query: its own answer
    assert (status, cache, len(one["crates"])) == (200, "MISS", 1)

    metrics = await (await mirror.get("/metrics")).text()
    assert metric_value(metrics, "cratemirror_cache_requests_total", kind="search", result="miss") == 2
    assert metric_value(metrics, "cratemirror_cache_requests_total", kind="search", result="hit") == 1


async def test_answered_from_the_cache_while_the_api_is_down(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    publish(registry)
    mirror = await mirror_factory(upstream__api_url=registry.url)
    _, _, answer = await search(mirror, "q=tokio&per_page=5")
    mirror.app[SEARCH].ttl = 0  # every copy is now past its minute
    registry.down = True
    status, cache, stale = await search(mirror, "q=tokio&per_page=5")
    assert (status, cache, stale) == (200, "STALE", answer)
    status, _, error = await search(mirror, "q=never-asked&per_page=5")  # nothing cached: a JSON error
    assert status == 502 and "search failed" in error["errors"][0]["detail"]
    registry.down = False
    status, cache, _ = await search(mirror, "q=tokio&per_page=5")
    assert (status, cache) == (200, "MISS")


async def test_only_a_valid_query_is_forwarded(registry: FakeRegistry, mirror_factory: MirrorFactory) -> None:
    publish(registry)
    mirror = await mirror_factory(upstream__api_url=registry.url)
    for query in ("per_page=10", "q=&per_page=10", f"q={'x' * 257}", "q=serde&per_page=0",
                  "q=serde&per_page=101", "q=serde&per_page=ten", "q=a%0Ab"):  # fmt: skip
        status, _, answer = await search(mirror, query)
        assert status == 400, query
        assert answer["errors"][0]["detail"].startswith("search: "), answer
    assert registry.search_queries == []
    status, _, _ = await search(mirror, "q=serde&per_page=3&sort=downloads&include=evil&q2=x")
    assert status == 200
    assert registry.search_queries == [{"q": "serde", "per_page": "3"}]  # nothing else reaches the API


async def test_an_answer_that_is_not_a_search_answer_is_refused(
    registry: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    registry.status_override = 200  # every upstream request answers a plain-text 200
    mirror = await mirror_factory(upstream__api_url=registry.url)
    status, _, error = await search(mirror, "q=serde&per_page=10")
    assert status == 502 and "not a search answer" in error["errors"][0]["detail"], error


async def test_search_needs_a_token_like_the_index(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    publish(registry)
    tokens = tmp_path / "tokens.yaml"
    token, _ = add_token(tokens, "ci", None)
    mirror = await mirror_factory(
        upstream__api_url=registry.url, auth__required=True, auth__tokens_file=tokens
    )
    response = await mirror.get("/api/v1/crates?q=serde&per_page=10")
    assert response.status == 401
    status, _, answer = await search(mirror, "q=serde&per_page=10", Authorization=token)
    assert status == 200 and answer["crates"]


async def test_not_proxied_without_an_api_url(registry: FakeRegistry, mirror: TestClient[Any, Any]) -> None:
    status, _, answer = await search(mirror, "q=serde&per_page=10")
    assert status == 404 and "cargo search --registry crates-io" in answer["errors"][0]["detail"]
    assert registry.requests.total() == 0
