"""Extra upstream registries under /registries/<name>/: a fake private registry that wants its own token
(a second FakeRegistry), proxied, verified and cached like crates.io; the real cargo building a project
that depends on both through the mirror with only the mirror's token."""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from cratemirror.auth.tokens import TokenRecord, hash_token, utcnow, write_records
from cratemirror.config.schema import RegistryConfig
from tests.conftest import MirrorFactory
from tests.e2e.test_client_config import run_shell
from tests.fake_upstream import (
    Dep,
    FakeRegistry,
    index_path,
    publish_small_tree,
    run_cargo,
)
from tests.http.test_auth import client_home, printed_client_config, token_add
from tests.mirror_process import MirrorProcess, metric_value
from tests.system_tools import require_tool
from tests.tools_support import run_cli, write_config

CRATES_IO_INDEX = "https://github.com/rust-lang/crates.io-index"
UPSTREAM_TOKEN = "corp-upstream-secret-4f1c"
CLIENT_TOKEN = "client-token-9a7e"


@pytest.fixture
async def private() -> AsyncIterator[FakeRegistry]:
    """A private registry that wants its own token everywhere, with a crate depending on crates.io."""
    async with FakeRegistry() as fake:
        fake.required_token = UPSTREAM_TOKEN
        fake.add_crate(
            "corp-util", "1.0.0", deps=[Dep("z", "^0.1", registry=CRATES_IO_INDEX)],
            lib_rs="pub fn corp() -> &'static str { z::hello() }\n",
        )  # fmt: skip
        fake.add_crate("corp-big", "2.0.0", pad_to=64 * 1024)
        yield fake


def authorizations(registry: FakeRegistry) -> set[str | None]:
    return {headers.get("Authorization") for _, _, headers in registry.request_log}


async def test_private_registry_through_the_mirror(
    registry: FakeRegistry,
    private: FakeRegistry,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry.add_crate("z", "0.1.0")
    monkeypatch.setenv("CORP_TOKEN", UPSTREAM_TOKEN)
    tokens_file = tmp_path / "tokens.yaml"
    write_records(tokens_file, [TokenRecord("dev", hash_token(CLIENT_TOKEN), utcnow())])
    mirror = await mirror_factory(
        registries={"corp": RegistryConfig(index_url=private.index_url, token_env="CORP_TOKEN")},
        auth__required=True,
        auth__tokens_file=tokens_file,
    )
    base = str(mirror.make_url("")).rstrip("/")
    client = {"Authorization": CLIENT_TOKEN}
    seen: list[bytes] = []

    async def get(path: str, status: int = 200) -> aiohttp.ClientResponse:
        response = await mirror.get(path, headers=client)
        seen.append(str(response.headers).encode() + await response.read())
        assert response.status == status, (path, await response.text())
        return response

    response = await get("/registries/corp/index/config.json")
    assert await response.json() == {
        "dl": f"{base}/registries/corp/api/v1/crates",
        "api": f"{base}/registries/corp",
        "auth-required": True,
    }
    response = await get(f"/registries/corp/index/{index_path('corp-util')}")
    assert await response.read() == private.get_version("corp-util", "1.0.0").index_line() + b"\n"
    assert response.headers["X-Cache"] == "MISS"
    response = await get("/registries/corp/api/v1/crates/corp-util/1.0.0/download")
    assert await response.read() == private.get_version("corp-util", "1.0.0").data
    # Its dependency on crates.io goes through the crates.io route, as cargo will ask for it.
    response = await get(f"/index/{index_path('z')}")
    assert b'"name":"z"' in await response.read()

    # Downloads answered by a redirect to another host: the credential stays with the registry.
    async with FakeRegistry() as storage:
        storage.add_crate("corp-big", "2.0.0", pad_to=64 * 1024)
        private.redirect_crates_to = storage.url
        response = await get("/registries/corp/api/v1/crates/corp-big/2.0.0/download")
        assert await response.read() == private.get_version("corp-big", "2.0.0").data
        assert storage.count("/crates/corp-big/2.0.0/download") == 1
        assert authorizations(storage) == {None}

    assert authorizations(private) == {UPSTREAM_TOKEN}  # its own token on index and downloads
    assert authorizations(registry) == {None}  # never sent to crates.io
    assert (tmp_path / "cache" / "registries" / "corp" / "crates" / "corp-util").is_dir()
    assert not (tmp_path / "cache" / "crates" / "corp-util").exists()

    await get("/registries/nope/index/config.json", 404)
    await get("/registries/crates-io/index/config.json", 404)
    await get("/registries/corp/index/co/rp/..%2F..%2Fetc", 400)

    # The private registry down: what is cached is still served.
    private.down = True
    response = await get(f"/registries/corp/index/{index_path('corp-util')}")
    assert response.headers["X-Cache"] == "HIT"
    response = await get("/registries/corp/api/v1/crates/corp-util/1.0.0/download")
    assert await response.read() == private.get_version("corp-util", "1.0.0").data

    metrics = await (await get("/metrics")).text()
    assert (
        metric_value(metrics, "cratemirror_cache_requests_total", registry="corp", kind="index") == 3
    )  # one was the 400
    assert metric_value(metrics, "cratemirror_cache_requests_total", registry="corp", kind="crate") == 3
    assert metric_value(metrics, "cratemirror_cache_requests_total", registry="crates-io", kind="index") == 1
    assert metric_value(metrics, "cratemirror_upstream_requests_total", registry="corp", kind="crate") == 2
    for answer in seen:
        assert UPSTREAM_TOKEN.encode() not in answer and CLIENT_TOKEN.encode() not in answer


async def test_private_registry_stale_if_error_and_offline(
    registry: FakeRegistry, private: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    corp = RegistryConfig(index_url=private.index_url, token=UPSTREAM_TOKEN, index_ttl=0.0)
    mirror = await mirror_factory(registries={"corp": corp}, upstream__retries=0)
    path = f"/registries/corp/index/{index_path('corp-util')}"
    assert (await mirror.get(path)).status == 200
    private.down = True  # past its (zero) TTL and the upstream fails: stale, not an error
    response = await mirror.get(path)
    assert response.status == 200 and response.headers["X-Cache"] == "STALE"
    assert (await mirror.get(f"/registries/corp/index/{index_path('corp-big')}")).status == 502

    offline = await mirror_factory(cache_dir=tmp_path / "cache", registries={"corp": corp}, offline=True)
    assert (await offline.get(path)).status == 200
    response = await offline.get("/registries/corp/api/v1/crates/corp-util/1.0.0/download")
    assert response.status == 503  # offline and not cached


# ---- the real cargo ------------------------------------------------------------------------------------


def write_project(path: Path, private_index: str) -> None:
    (path / "src").mkdir(parents=True, exist_ok=True)
    (path / "Cargo.toml").write_text(
        '[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\npublish = false\n\n'
        '[dependencies]\na = "1"\ncorp-util = { version = "1", registry = "corp" }\n\n[workspace]\n'
    )
    (path / "src" / "main.rs").write_text('fn main() { println!("{}", corp_util::corp()); }\n')
    # The project names the private registry by its own URL, as it would without a mirror.
    (path / ".cargo").mkdir(exist_ok=True)
    (path / ".cargo" / "config.toml").write_text(f'[registries.corp]\nindex = "sparse+{private_index}"\n')


async def test_cargo_builds_with_a_private_registry_through_the_mirror(
    registry: FakeRegistry, private: FakeRegistry, tmp_path: Path, record_property: Any
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    publish_small_tree(registry)
    config = tmp_path / "mirror.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {"required": True, "tokens_file": str(tmp_path / "tokens.yaml")},
                "registries": {"corp": {"index_url": private.index_url, "token": UPSTREAM_TOKEN}},
            }
        )
    )
    token = token_add(config, "dev")
    project = tmp_path / "app"
    write_project(project, private.index_url)
    env = {"CARGO_REGISTRIES_MIRROR_TOKEN": token, "CARGO_REGISTRIES_CORP_MIRROR_TOKEN": token}

    async with MirrorProcess(
        registry.index_url, tmp_path / "cache", tmp_path, workers=2, extra_args=["--config", str(config)]
    ) as mirror:
        printed = printed_client_config(config, mirror.url)
        for variable in ("CARGO_REGISTRIES_MIRROR_TOKEN", "CARGO_REGISTRIES_CORP_MIRROR_TOKEN"):
            assert f"{variable}=<token>" in printed
        assert UPSTREAM_TOKEN not in printed
        home = tmp_path / "home"
        client_home(home, printed)  # the printed TOML, verbatim
        for args in (["generate-lockfile"], ["fetch"], ["build", "--offline"]):
            code, output = await run_cargo(args, project, home, env=env)
            assert code == 0, f"cargo {args} failed:\n{output}"
        lock = {p["name"]: p for p in tomllib.loads((project / "Cargo.lock").read_text())["package"]}
        assert lock["corp-util"]["source"] == f"sparse+{private.index_url}"  # the original URL
        assert lock["corp-util"]["checksum"] == private.get_version("corp-util", "1.0.0").cksum
        assert lock["z"]["source"] == f"registry+{CRATES_IO_INDEX}"
        assert authorizations(private) == {UPSTREAM_TOKEN}
        assert authorizations(registry) == {None}
        assert private.count("/crates/corp-util/1.0.0/download") == 1

        # The private registry down, a fresh CARGO_HOME and no lockfile: the mirror's cache is enough.
        private.down = True
        private.reset_counts()
        (project / "Cargo.lock").unlink()
        shutil.rmtree(project / "target")
        home = tmp_path / "home-warm"
        code, output = await run_shell(printed_client_config(config, mirror.url, "--ci"), home, tmp_path)
        assert code == 0, output  # the --ci form, run as a CI step would
        for args in (["generate-lockfile"], ["fetch"], ["build", "--offline"]):
            code, output = await run_cargo(args, project, home, env=env)
            assert code == 0, f"cargo {args} (private registry down) failed:\n{output}"
        assert private.requests.total() == 0
        assert await mirror.stop() == 0
    log = mirror.output()
    assert UPSTREAM_TOKEN not in log and token not in log


# ---- warm, verify, prune, export and import cover every registry ---------------------------------------


async def test_tools_cover_every_registry(
    registry: FakeRegistry, private: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    z = registry.add_crate("z", "0.1.0")
    corp = private.get_version("corp-util", "1.0.0")
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        "version = 4\n\n"
        f'[[package]]\nname = "z"\nversion = "0.1.0"\nsource = "registry+{CRATES_IO_INDEX}"\n'
        f'checksum = "{z.cksum}"\n\n'
        f'[[package]]\nname = "corp-util"\nversion = "1.0.0"\nsource = "sparse+{private.index_url}"\n'
        f'checksum = "{corp.cksum}"\ndependencies = ["z"]\n'
    )

    def config_for(cache_dir: Path) -> Path:
        path = write_config(tmp_path / f"{cache_dir.name}.yaml", registry.index_url, cache_dir)
        with path.open("a") as handle:
            handle.write(
                f"registries:\n  corp:\n    index_url: {private.index_url}\n    token: {UPSTREAM_TOKEN}\n"
            )
        return path

    cache = tmp_path / "cache"
    config = config_for(cache)
    done = await run_cli("warm", str(lockfile), "--config", str(config), cwd=tmp_path)
    assert done.code == 0, done.output
    assert "warm: 1 crate: 1 fetched" in done.stdout and "warm [corp]: 1 crate: 1 fetched" in done.stdout
    corp_file = cache / "registries" / "corp" / "crates" / "corp-util" / "corp-util-1.0.0.crate"
    assert corp_file.read_bytes() == corp.data
    assert authorizations(private) == {UPSTREAM_TOKEN}

    done = await run_cli("verify", "--config", str(config), cwd=tmp_path)
    assert done.code == 0 and "verify [corp]: 1 crate file checked: 1 ok" in done.stdout, done.output
    corp_file.write_bytes(b"not the crate")
    done = await run_cli("verify", "--config", str(config), "--fix", cwd=tmp_path)
    assert "verify [corp]: 1 crate file checked: 0 ok, 1 corrupt" in done.stdout, done.output
    assert not corp_file.exists()
    done = await run_cli("warm", str(lockfile), "--config", str(config), cwd=tmp_path)
    assert done.code == 0 and corp_file.read_bytes() == corp.data, done.output

    bundle = tmp_path / "bundle.tar"
    done = await run_cli(
        "export", str(bundle), "--config", str(config), "--lockfile", str(lockfile), cwd=tmp_path
    )
    assert done.code == 0 and "export [corp]: 1 crate" in done.stdout, done.output
    other = tmp_path / "other"
    done = await run_cli("import", str(bundle), "--config", str(config_for(other)), cwd=tmp_path)
    assert done.code == 0 and "2 crates in the bundle: 2 loaded" in done.stdout, done.output
    # Without the registry configured, its part of the bundle is refused, the rest still loads.
    plain = write_config(tmp_path / "plain.yaml", registry.index_url, tmp_path / "plain")
    done = await run_cli("import", str(bundle), "--config", str(plain), cwd=tmp_path)
    assert done.code == 1 and "registries/corp.tar" in done.stderr and "1 loaded" in done.stdout, done.output

    # The imported cache serves the private crate with every upstream down.
    private.down = registry.down = True
    offline = await mirror_factory(
        cache_dir=other, registries={"corp": RegistryConfig(index_url=private.index_url)}, offline=True
    )
    response = await offline.get("/registries/corp/api/v1/crates/corp-util/1.0.0/download")
    assert response.status == 200 and await response.read() == corp.data

    done = await run_cli("prune", "--config", str(config), "--max-size", "0", cwd=tmp_path)
    assert done.code == 0 and "prune [corp]: removed 1 crate" in done.stdout, done.output
    assert not corp_file.exists()


@pytest.mark.parametrize(
    ("command", "registries", "message"),
    [
        (["serve"], {"corp": {"index_url": "http://127.0.0.1:9/index/", "token_env": "NOT_SET_ANYWHERE"}},
         "registries.corp.token_env: expected the environment variable NOT_SET_ANYWHERE"),
        (["client-config"], {"mirror": {"index_url": "http://127.0.0.1:9/index/"}},
         "registries.mirror: this name clashes"),
    ],
)  # fmt: skip
async def test_registry_config_problems_stop_with_one_line(
    tmp_path: Path, command: list[str], registries: dict[str, Any], message: str
) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(yaml.safe_dump({"registries": registries}))
    done = await run_cli(*command, "--config", str(config), cwd=tmp_path)
    assert done.code == 2, done.output
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.output


async def test_the_policy_gates_crates_io_not_a_private_registry(
    registry: FakeRegistry, private: FakeRegistry, mirror_factory: MirrorFactory
) -> None:
    """A deny rule names a crates.io crate; a private crate of the same name is not that crate."""
    registry.add_crate("corp-util", "1.0.0")
    corp = RegistryConfig(index_url=private.index_url, token=UPSTREAM_TOKEN)
    mirror = await mirror_factory(
        registries={"corp": corp}, policy__mode="enforce", policy__deny=("corp-util",)
    )
    refused = await mirror.get("/api/v1/crates/corp-util/1.0.0/download")
    assert refused.status == 403 and "X-Cratemirror-Policy" in refused.headers
    response = await mirror.get("/registries/corp/api/v1/crates/corp-util/1.0.0/download")
    assert response.status == 200 and await response.read() == private.get_version("corp-util", "1.0.0").data
    index = await mirror.get(f"/registries/corp/index/{index_path('corp-util')}")
    assert await index.read() == private.get_version("corp-util", "1.0.0").index_line() + b"\n"
