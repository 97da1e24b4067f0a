"""Who took what, with the real cargo and a real 2-worker server: two tokens build two projects, an
advisory lands, `audit impact` names exactly the token that pulled the affected version (count, first and
last time), cratemirror_advisory_exposure rises with one warning, the records survive kill -9 and a
restart, and audit.retention drops old records. Then the release-age cooldown: a version published
"now" is not picked by cargo, a locked build gets the 403 naming its age, and after the (short) cooldown
it resolves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.fake_upstream import Dep, FakeRegistry, run_cargo, write_cargo_project
from tests.mirror_process import MirrorProcess, clean_env, metric_value, wait_until
from tests.policy_support import LEAF_ADVISORY, write_advisory
from tests.tools_support import run_cli

pytestmark = pytest.mark.e2e

EXPOSURE = "cratemirror_advisory_exposure"


def require_cargo() -> None:
    assert shutil.which("cargo") is not None, "the real cargo is required for this test and is not on PATH"


def locked(project: Path) -> dict[str, str]:
    lock = tomllib.loads((project / "Cargo.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"] if p["name"] != "app"}


def write_yaml(path: Path, cache: Path, body: str) -> Path:
    path.write_text(f"cache:\n  dir: {cache}\n{body}")
    return path


def token_add(config: Path, name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cratemirror", "token", "add", name, "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=clean_env(), check=True,
    )  # fmt: skip
    return done.stdout.strip()


def token_home(home: Path, url: str) -> Path:
    """A CARGO_HOME whose crates.io is the mirror, with the token sent (cargo:token)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "mirror"\n\n'
        f'[registries.mirror]\nindex = "sparse+{url}/index/"\ncredential-provider = "cargo:token"\n\n'
        '[net]\nretry = 0\n\n[term]\ncolor = "never"\nprogress.when = "never"\n'
    )
    return home


async def audit_json(config: Path, cwd: Path, *args: str) -> object:
    result = await run_cli("audit", *args, "--format", "json", "--config", str(config), cwd=cwd)
    assert result.code == 0, result.output
    return json.loads(result.stdout)


async def test_audit_impact_names_the_token_that_pulled_the_affected_version(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    require_cargo()
    for version in ("0.2.9", "0.3.0", "0.3.1", "0.3.2"):
        registry.add_crate("leaf", version)
    registry.add_crate("mid", "0.2.0", deps=[Dep("leaf", "^0.3")])
    registry.add_crate("other", "1.0.0")
    db = tmp_path / "advisory-db"
    (db / "crates").mkdir(parents=True)  # empty for now: the advisory lands while the server runs
    cache = tmp_path / "cache"
    tokens = tmp_path / "tokens.yaml"
    config = write_yaml(
        tmp_path / "mirror.yaml", cache,
        f"auth:\n  required: true\n  tokens_file: {tokens}\npolicy:\n  advisory_db: {db}\n",
    )  # fmt: skip
    alice, bob = token_add(config, "alice"), token_add(config, "bob")
    project_a, project_b = tmp_path / "a", tmp_path / "b"
    write_cargo_project(project_a, {"mid": "0.2"})  # -> leaf 0.3.2 (to be affected)
    write_cargo_project(project_b, {"leaf": "=0.2.9", "other": "1"})  # unaffected

    mirror = MirrorProcess(
        registry.index_url, cache, tmp_path, workers=2, extra_args=["--config", str(config)]
    )
    async with mirror:
        started = time.time()
        for project, name, token in ((project_a, "a", alice), (project_b, "b", bob)):
            home = token_home(tmp_path / f"home-{name}", mirror.url)
            code, output = await run_cargo(
                ["fetch"], project, home, env={"CARGO_REGISTRIES_MIRROR_TOKEN": token}
            )
            assert code == 0, output
        assert locked(project_a)["leaf"] == "0.3.2" and locked(project_b)["leaf"] == "0.2.9"

        async def recorded() -> bool:
            rows = await audit_json(config, tmp_path, "query")
            assert isinstance(rows, list)
            return len(rows) == 4  # mid + leaf for alice; leaf + other for bob

        await wait_until(recorded, "the four downloads in the audit trail", timeout=20, interval=0.3)
        rows = await audit_json(config, tmp_path, "query", "--who", "bob")
        assert isinstance(rows, list)
        assert sorted((row["crate"], row["version"], row["result"]) for row in rows) == [
            ("leaf", "0.2.9", "served"), ("other", "1.0.0", "served"),
        ]  # fmt: skip

        # The advisory lands: leaf 0.3.0 and 0.3.2 are affected, 0.2.9 and 0.3.1 are not.
        write_advisory(db, "leaf", LEAF_ADVISORY, patched=["=0.3.1"], unaffected=["< 0.3.0"])
        async with aiohttp.ClientSession(headers={"Authorization": alice}) as session:

            async def exposed() -> bool:
                async with session.get(f"{mirror.url}/metrics") as response:
                    text = await response.text()
                try:
                    return metric_value(text, EXPOSURE, advisory=LEAF_ADVISORY) == 1
                except KeyError:
                    return False

            await wait_until(exposed, f"{EXPOSURE} for {LEAF_ADVISORY}", timeout=20, interval=0.3)

            async def shown() -> bool:
                # Each worker reloads the database on its own: the page may come from one that has not yet.
                async with session.get(f"{mirror.url}/") as response:
                    page = await response.text()
                return 'id="advisory-exposure"' in page and LEAF_ADVISORY in page

            await wait_until(shown, "the exposure table on the status page", timeout=20, interval=0.3)

        impact = await audit_json(config, tmp_path, "impact", LEAF_ADVISORY)
        assert isinstance(impact, dict)
        assert impact["clients"] == 1 and impact["downloads"] == 1
        (served,) = impact["served"]
        assert (served["crate"], served["version"], served["who"], served["count"]) == (
            "leaf",
            "0.3.2",
            "alice",
            1,
        )
        first = datetime.strptime(served["first"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        assert started - 2 <= first <= time.time() and served["last"] == served["first"]
        table = await run_cli("audit", "impact", LEAF_ADVISORY, "--config", str(config), cwd=tmp_path)
        print(table.stdout)
        assert "served to 1 client (1 download)" in table.stdout and "alice" in table.stdout
        assert "bob" not in table.stdout
        by_req = await audit_json(config, tmp_path, "impact", "--crate", "leaf@<0.3")
        assert isinstance(by_req, dict) and [row["who"] for row in by_req["served"]] == ["bob"]

        # kill -9: what was written stays.
        assert mirror.proc is not None
        os.killpg(mirror.proc.pid, signal.SIGKILL)
        assert await mirror.stop() == -signal.SIGKILL
    warnings = [line for line in mirror.output().splitlines() if f"advisory {LEAF_ADVISORY} affects" in line]
    assert len(warnings) == 1, mirror.output()  # one warning for the whole mirror, not one per worker

    (tmp_path / "run2").mkdir()
    async with MirrorProcess(
        registry.index_url, cache, tmp_path / "run2", workers=2, extra_args=["--config", str(config)]
    ) as again:
        assert again.proc is not None
        again_impact = await audit_json(config, tmp_path, "impact", LEAF_ADVISORY)
        assert isinstance(again_impact, dict) and again_impact["served"] == impact["served"]
        assert await again.stop() == 0

    # audit.retention: records older than it are dropped by the next server.
    await wait_until(_later(time.time() + 2.5), "the records to be 2 s old", timeout=5, interval=0.1)
    short = write_yaml(
        tmp_path / "short.yaml", cache,
        f"auth:\n  required: true\n  tokens_file: {tokens}\naudit:\n  retention: 2s\n",
    )  # fmt: skip
    assert len(await audit_json(config, tmp_path, "query", "--since", "1d")) == 4  # type: ignore[arg-type]
    (tmp_path / "run3").mkdir()
    async with MirrorProcess(
        registry.index_url, cache, tmp_path / "run3", workers=2, extra_args=["--config", str(short)]
    ):

        async def dropped() -> bool:
            return await audit_json(config, tmp_path, "query", "--since", "1d") == []

        await wait_until(dropped, "records past audit.retention to be dropped", timeout=20, interval=0.3)


def _later(when: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return time.time() >= when

    return check


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_cooldown_holds_back_a_version_published_now(registry: FakeRegistry, tmp_path: Path) -> None:
    require_cargo()
    registry.add_crate("fresh", "1.0.0", pubtime="2020-01-02T03:04:05Z")
    registry.add_crate("fresh", "1.1.0", pubtime=now_rfc3339())
    age = 20
    plain = write_yaml(tmp_path / "plain.yaml", tmp_path / "cache-plain", "")
    cooling = write_yaml(
        tmp_path / "cooling.yaml", tmp_path / "cache",
        f"policy:\n  mode: enforce\n  min_release_age: {age}s\n",
    )  # fmt: skip
    pinned, fresh = tmp_path / "pinned", tmp_path / "new"
    write_cargo_project(pinned, {"fresh": "1"})
    write_cargo_project(fresh, {"fresh": "1"})
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    async with MirrorProcess(
        registry.index_url, tmp_path / "cache-plain", tmp_path / "w1", workers=1,
        extra_args=["--config", str(plain)],
    ) as without:  # fmt: skip
        code, output = await run_cargo(["generate-lockfile"], pinned, _home(tmp_path / "h1", without.url))
        assert code == 0, output
    assert locked(pinned) == {"fresh": "1.1.0"}  # a lockfile made elsewhere, pinned to the new release

    async with MirrorProcess(
        registry.index_url,
        tmp_path / "cache",
        tmp_path / "w2",
        workers=2,
        extra_args=["--config", str(cooling)],
    ) as mirror:
        home = _home(tmp_path / "h2", mirror.url)
        code, output = await run_cargo(["generate-lockfile"], fresh, home)
        assert code == 0, output
        assert locked(fresh) == {"fresh": "1.0.0"}  # cargo does not pick the version in its cooldown
        code, output = await run_cargo(["fetch", "--locked"], pinned, home)
        print(output)
        assert code != 0 and "403" in output and "fresh 1.1.0 was published" in output, output
        assert "policy.min_release_age" in output and "passes at" in output

        async def resolves() -> bool:
            done, _ = await run_cargo(["fetch", "--locked"], pinned, home)
            return done == 0

        await wait_until(resolves, f"the {age} s cooldown to pass", timeout=age + 30, interval=1.0)
        code, output = await run_cargo(["update"], fresh, home)
        assert code == 0, output
        assert locked(fresh) == {"fresh": "1.1.0"}
        assert await mirror.stop() == 0, mirror.output()


def _home(home: Path, url: str) -> Path:
    from tests.fake_upstream import write_cargo_home

    write_cargo_home(home, f"{url}/index/")
    return home
