"""Client tokens (cargo's RFC 3139): the token file and its command, the request check in the app, and
the real cargo against a real `cratemirror serve` that requires a token."""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from cratemirror.__main__ import main
from cratemirror.auth.tokens import (
    TokenChecker,
    TokenRecord,
    hash_token,
    read_records,
    write_records,
)
from tests.conftest import MirrorFactory
from tests.fake_upstream import (
    SMALL_TREE_DEPS,
    FakeRegistry,
    publish_small_tree,
    run_cargo,
    write_cargo_project,
)
from tests.mirror_process import MirrorProcess, clean_env, metric_value, wait_until
from tests.system_tools import require_tool

LOGIN_HINT = "cargo login --registry mirror"


def token_cli(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["token", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def auth_yaml(tmp_path: Path, **extra: object) -> Path:
    config = tmp_path / "mirror.yaml"
    auth = {"required": True, "tokens_file": str(tmp_path / "tokens.yaml"), **extra}
    config.write_text(yaml.safe_dump({"auth": auth}))
    return config


# ---- the token file and `cratemirror token` ------------------------------------------------------------


def test_token_add_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = auth_yaml(tmp_path)
    tokens_file = tmp_path / "tokens.yaml"
    code, out, err = token_cli(capsys, config, "add", "ci-runner", "--expires", "90d")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("cmt_") and len(token) >= 40 and "\n" not in token
    assert "ci-runner" in err and token not in err
    text = tokens_file.read_text()
    assert token not in text and hash_token(token) in text  # only the hash is kept
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    (record,) = read_records(tokens_file)
    assert record.name == "ci-runner" and record.revoked is None
    assert record.expires is not None
    assert abs((record.expires - record.created) - dt.timedelta(days=90)) < dt.timedelta(seconds=2)

    code, out2, err = token_cli(capsys, config, "add", "laptop")
    assert code == 0, err
    assert out2.strip() != token
    code, _, err = token_cli(capsys, config, "add", "laptop")
    assert code == 1 and "exists already" in err  # one active token per name

    code, listing, _ = token_cli(capsys, config, "list")
    assert code == 0
    assert "ci-runner" in listing and "laptop" in listing and "never" in listing
    assert token not in listing and out2.strip() not in listing and hash_token(token) not in listing

    code, _, err = token_cli(capsys, config, "revoke", "ci-runner")
    assert code == 0, err
    code, listing, _ = token_cli(capsys, config, "list")
    assert "revoked" in listing.splitlines()[1] and "active" in listing.splitlines()[2]
    code, _, err = token_cli(capsys, config, "revoke", "nobody")
    assert code == 1 and "nobody" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "bad name"], "token name"),
        (["add", "x", "--expires", "soon"], "--expires"),
    ],
)
def test_token_cli_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = token_cli(capsys, auth_yaml(tmp_path), *args)
    assert code in (1, 2) and message in err and out == ""
    *usage, reason = err.strip().splitlines()  # one line, after the subcommand's usage for a bad flag
    assert message in reason and all(line.startswith("usage: cratemirror token add") for line in usage)
    assert len(usage) <= 1


def test_checker_rereads_a_changed_file_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    now = dt.datetime.now(dt.UTC)
    write_records(path, [TokenRecord("a", hash_token("tok-a"), now)])
    checker = TokenChecker(path, recheck=0.0)
    assert checker.check("tok-a").name == "a"
    assert checker.check("tok-b").reason == "unknown"
    write_records(path, [TokenRecord("a", hash_token("tok-a"), now, revoked=now)])
    assert checker.check("tok-a").reason == "revoked"
    path.write_text("tokens: [{name: 'no spaces allowed'}]\n")
    assert checker.check("tok-a").reason == "revoked"  # a broken file keeps the last good set
    assert checker.problem is not None and "tokens[0].name" in checker.problem
    assert checker.check("").reason == "missing"
    assert checker.check("x" * 10_000).reason == "unknown"


# ---- the request check, in-process ---------------------------------------------------------------------


def _records(tokens: dict[str, str], **states: dict[str, dt.datetime]) -> list[TokenRecord]:
    now = dt.datetime.now(dt.UTC)
    return [
        TokenRecord(name, hash_token(token), now, **states.get(name, {})) for name, token in tokens.items()
    ]


async def test_auth_required_in_the_app(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    registry.add_crate("alpha", "1.0.0")
    tokens_file = tmp_path / "tokens.yaml"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    write_records(
        tokens_file,
        _records(
            {"good": "tok-good", "old": "tok-old", "gone": "tok-gone"},
            old={"expires": past},
            gone={"revoked": past},
        ),
    )
    mirror = await mirror_factory(auth__required=True, auth__tokens_file=tokens_file)
    base = str(mirror.make_url("")).rstrip("/")
    paths = ["/index/config.json", "/index/al/ph/alpha", "/api/v1/crates/alpha/1.0.0/download"]

    for path in paths:
        for headers, reason in [
            ({}, "missing"),
            ({"Authorization": "tok-nope"}, "unknown"),
            ({"Authorization": "tok-old"}, "expired"),
            ({"Authorization": "Bearer tok-gone"}, "revoked"),
        ]:
            response = await mirror.get(path, headers=headers)
            body = await response.text()
            assert response.status == 401, (path, reason)
            assert response.headers["WWW-Authenticate"] == f'Cargo login_url="{base}/"'
            assert body.startswith(f"token {reason}:") and body.count("\n") == 1
            assert "tok-" not in body
    assert registry.requests.total() == 0  # nothing went upstream for a refused request

    response = await mirror.get("/index/config.json", headers={"Authorization": "tok-good"})
    assert response.status == 200
    assert (await response.json())["auth-required"] is True
    response = await mirror.get(paths[1], headers={"Authorization": "Bearer tok-good"})
    assert response.status == 200 and b"alpha" in await response.read()
    response = await mirror.get(paths[2], headers={"Authorization": "tok-good"})
    assert response.status == 200 and await response.read() == registry.get_version("alpha", "1.0.0").data

    for open_path in ("/healthz", "/readyz", "/", "/metrics"):
        assert (await mirror.get(open_path)).status == 200, open_path
    metrics = await (await mirror.get("/metrics")).text()
    for reason in ("missing", "unknown", "expired", "revoked"):
        assert metric_value(metrics, "cratemirror_auth_failures_total", reason=reason) == len(paths)


async def test_protect_status_and_open_mirror(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    write_records(tokens_file, _records({"good": "tok-good"}))
    guarded = await mirror_factory(
        auth__required=True, auth__tokens_file=tokens_file, auth__protect_status=True
    )
    for path in ("/", "/metrics"):
        assert (await guarded.get(path)).status == 401, path
        assert (await guarded.get(path, headers={"Authorization": "tok-good"})).status == 200, path
    for path in ("/healthz", "/readyz"):
        assert (await guarded.get(path)).status == 200, path

    # Without auth.required nothing asks for a token and config.json does not mention it.
    open_mirror = await mirror_factory(cache_dir=tmp_path / "other")
    response = await open_mirror.get("/index/config.json")
    assert response.status == 200 and "auth-required" not in await response.json()


# ---- the real cargo against a real server process ------------------------------------------------------


def printed_client_config(config: Path, url: str, *extra: str) -> str:
    """What `cratemirror client-config` prints for this mirror config (used verbatim by the tests)."""
    done = subprocess.run(
        [sys.executable, "-m", "cratemirror", "client-config", "--url", url, "--config", str(config), *extra],
        capture_output=True, text=True, timeout=60, env=clean_env(), check=True,
    )  # fmt: skip
    return done.stdout


def client_home(home: Path, printed: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(printed)


async def _statuses(url: str, token: str, count: int) -> list[int]:
    """`count` requests, each on its own connection (so each worker process gets asked)."""
    statuses = []
    for _ in range(count):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(url, headers={"Authorization": token}) as response,
        ):
            statuses.append(response.status)
    return statuses


def token_add(config: Path, name: str, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cratemirror", "token", "add", name, *extra, "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=clean_env(), check=True,
    )  # fmt: skip
    return done.stdout.strip()


async def token_revoke(config: Path, name: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cratemirror", "token", "revoke", name, "--config", str(config),
        env=clean_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_cargo_with_a_token_through_the_served_process(
    registry: FakeRegistry, tmp_path: Path, record_property: Any
) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    publish_small_tree(registry)
    config = auth_yaml(tmp_path)
    token = token_add(config, "ci")
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    with_token = {"CARGO_REGISTRIES_MIRROR_TOKEN": token}
    seen_responses: list[bytes] = []

    async with MirrorProcess(
        registry.index_url, tmp_path / "cache", tmp_path, workers=2, extra_args=["--config", str(config)]
    ) as mirror:
        printed = printed_client_config(config, mirror.url)
        assert (
            "CARGO_REGISTRIES_MIRROR_TOKEN=<token>" in printed
            and 'credential-provider = "cargo:token"' in printed
        )
        async with aiohttp.ClientSession() as session, session.get(mirror.url + "/") as response:
            page = html.unescape(await response.text())  # the status page shows the same text
        assert printed.strip() in page
        # Without a token: cargo stops and says how to log in.
        home = tmp_path / "home-none"
        client_home(home, printed)
        code, output = await run_cargo(["generate-lockfile"], project, home)
        assert code != 0 and LOGIN_HINT in output, output
        assert registry.requests.total() == 0

        # With the token: resolve, fetch and build.
        home = tmp_path / "home-token"
        client_home(home, printed)
        for args in (["generate-lockfile"], ["fetch"], ["build", "--offline"]):
            code, output = await run_cargo(args, project, home, env=with_token)
            assert code == 0, f"cargo {args} failed:\n{output}"
            assert token not in output
        assert (project / "target" / "debug" / "app").exists()
        assert all("Authorization" not in headers for _, _, headers in registry.request_log)

        async with aiohttp.ClientSession() as session:
            for path in ("/index/config.json", "/index/1/a", "/nope", "/"):
                async with session.get(mirror.url + path, headers={"Authorization": token}) as response:
                    seen_responses.append(str(response.headers).encode() + await response.read())

        # Revoked while the server runs: every worker refuses it within seconds, no restart.
        revoked_at = time.monotonic()
        await token_revoke(config, "ci")

        async def refused_everywhere() -> bool:
            # 20 fresh connections: the kernel spreads them over both workers (all on one: p = 2^-19).
            return set(await _statuses(f"{mirror.url}/index/config.json", token, 20)) == {401}

        await wait_until(
            refused_everywhere, "every worker to refuse the revoked token", timeout=15, interval=0.1
        )
        took = time.monotonic() - revoked_at
        (project / "Cargo.lock").unlink()
        home = tmp_path / "home-revoked"
        client_home(home, printed)
        code, output = await run_cargo(["generate-lockfile"], project, home, env=with_token)
        assert code != 0 and "401" in output, output
        assert token not in output

        metrics = await _metrics(mirror.url)
        assert metric_value(metrics, "cratemirror_auth_failures_total", reason="revoked") >= 20
        assert metric_value(metrics, "cratemirror_auth_failures_total", reason="missing") >= 1
        assert await mirror.stop() == 0
    log = mirror.output()
    assert token not in log and token[4:] not in log
    assert " token=ci" in log  # the access log names the token
    assert all(token.encode() not in seen for seen in seen_responses)
    print(f"revoked token refused by every worker after {took:.2f}s")
    record_property("revocation_seconds", round(took, 3))


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        return await response.text()


async def test_mirror_tools_send_the_token_from_the_environment(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    """`warm --mirror` and `refresh --mirror` use CARGO_REGISTRIES_MIRROR_TOKEN, as cargo does."""
    alpha = registry.add_crate("alpha", "1.0.0")
    tokens_file = tmp_path / "tokens.yaml"
    write_records(tokens_file, _records({"ops": "tok-ops"}))
    mirror = await mirror_factory(auth__required=True, auth__tokens_file=tokens_file)
    base = str(mirror.make_url("")).rstrip("/")
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        'version = 4\n\n[[package]]\nname = "alpha"\nversion = "1.0.0"\n'
        f'source = "registry+https://github.com/rust-lang/crates.io-index"\nchecksum = "{alpha.cksum}"\n'
    )

    async def cli(*args: str, **env: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cratemirror", *args, cwd=str(tmp_path), env=clean_env(**env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, output = await cli("warm", str(lockfile), "--mirror", base)
    assert code == 1 and "401" in output, output
    code, output = await cli("warm", str(lockfile), "--mirror", base, CARGO_REGISTRIES_MIRROR_TOKEN="tok-ops")
    assert code == 0 and "1 fetched" in output, output
    code, output = await cli("refresh", "alpha", "--mirror", base, CARGO_REGISTRIES_MIRROR_TOKEN="tok-ops")
    assert code == 0, output
    code, output = await cli("refresh", "alpha", "--mirror", base)
    assert code != 0 and "tok-ops" not in output, output
