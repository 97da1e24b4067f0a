"""Issue 18, finding 6: never silent, never telling. A broken or oversized tokens file is logged,
counted and shown by /readyz (still 200, "degraded: ...") while the last good tokens keep working; the
status page shows a viewer without a token (auth.required) no /registries/ path and no client address."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from cratemirror.auth.tokens import MAX_FILE_BYTES, add_token
from cratemirror.config.schema import RegistryConfig
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import metric_value, wait_until
from tests.policy_support import publish_policy_tree, synthetic_db

TOKENS_FILE_ERRORS = "cratemirror_auth_tokens_file_errors_total"


@pytest.mark.parametrize("broken", [b"tokens: [\n  - {name: x", b"# padding\n" * (MAX_FILE_BYTES // 10 + 1)])
async def test_a_broken_tokens_file_degrades_readyz_and_keeps_the_old_tokens(
    registry: FakeRegistry,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    broken: bytes,
) -> None:
    registry.add_crate("serde", "1.0.0")
    tokens = tmp_path / "tokens.yaml"
    token, _ = add_token(tokens, "ci", None)
    good = tokens.read_bytes()
    mirror = await mirror_factory(auth__required=True, auth__tokens_file=tokens)
    with_token = {"Authorization": token}
    assert await (await mirror.get("/readyz")).text() == "ready\n"

    tokens.write_bytes(broken)

    async def degraded() -> bool:
        response = await mirror.get("/readyz")
        return response.status == 200 and "degraded: " in await response.text()

    await wait_until(degraded, "/readyz to say degraded", timeout=10)
    text = await (await mirror.get("/readyz")).text()
    assert str(tokens) in text and text.count("\n") == 1
    # The last good set still works, and nobody else gets in.
    assert (await mirror.get(f"/index/{index_path('serde')}", headers=with_token)).status == 200
    assert (await mirror.get(f"/index/{index_path('serde')}")).status == 401
    metrics = await (await mirror.get("/metrics", headers=with_token)).text()
    assert metric_value(metrics, TOKENS_FILE_ERRORS) == 1
    assert any("tokens file unusable" in record.getMessage() for record in caplog.records)

    # Fixed: ready again, and the tokens are the file's.
    tokens.write_bytes(good)

    async def ready() -> bool:
        return await (await mirror.get("/readyz")).text() == "ready\n"

    await wait_until(ready, "/readyz to say ready again", timeout=10)
    assert (await mirror.get(f"/index/{index_path('serde')}", headers=with_token)).status == 200


def _table(page: str, element_id: str) -> str:
    match = re.search(rf'<table id="{element_id}">.*?</table>', page, re.S)
    assert match is not None, element_id
    return match.group(0)


async def test_the_status_page_tells_no_token_holder_about_registries_or_clients(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    publish_policy_tree(registry)
    tokens = tmp_path / "tokens.yaml"
    token, _ = add_token(tokens, "ci", None)
    mirror = await mirror_factory(
        registries={"secretcorp": RegistryConfig(index_url=registry.index_url)},
        auth__required=True, auth__tokens_file=tokens,
        policy__mode="enforce", policy__advisory_db=synthetic_db(tmp_path / "db"),
    )  # fmt: skip
    with_token = {"Authorization": token}
    path = f"/registries/secretcorp/index/{index_path('top')}"
    assert (await mirror.get(path, headers=with_token)).status == 200
    assert (await mirror.get("/api/v1/crates/leaf/0.3.2/download", headers=with_token)).status == 403

    anonymous = await (await mirror.get("/")).text()
    assert "/registries/" not in anonymous and "secretcorp" not in anonymous
    assert "127.0.0.1" not in _table(anonymous, "policy-decisions")
    assert "hidden" in _table(anonymous, "policy-decisions")
    # The good path: a token holder sees both.
    known = await (await mirror.get("/", headers=with_token)).text()
    assert path in _table(known, "recent-misses") and "secretcorp" in known
    assert "127.0.0.1" in _table(known, "policy-decisions")
