"""TLS on the mirror itself: a test CA made now with the openssl CLI, the mirror serving https with a
certificate it signed, and the real cargo trusting that CA through CARGO_HTTP_CAINFO."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.e2e.test_e2e_cargo import assert_lockfile
from tests.fake_upstream import (
    SMALL_TREE_DEPS,
    FakeRegistry,
    publish_small_tree,
    run_cargo,
    write_cargo_home,
    write_cargo_project,
)
from tests.mirror_process import MirrorProcess, clean_env, free_port
from tests.system_tools import require_tool


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, server key), valid for a day."""
    require_tool("openssl", "Debian package openssl")
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=cratemirror test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "server.ext", cwd=directory,
    )  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


def tls_yaml(tmp_path: Path, cert: Path, key: Path | None) -> Path:
    server: dict[str, str] = {"tls_cert": str(cert)}
    if key is not None:
        server["tls_key"] = str(key)
    config = tmp_path / "mirror.yaml"
    config.write_text(yaml.safe_dump({"server": server}))
    return config


async def test_cargo_over_https_with_a_test_ca(registry: FakeRegistry, tmp_path: Path) -> None:
    require_tool("cargo", "rustup or Debian package cargo")
    ca, cert, key = make_test_ca(tmp_path / "pki")
    publish_small_tree(registry)
    project = tmp_path / "app"
    write_cargo_project(project, SMALL_TREE_DEPS)
    config = tls_yaml(tmp_path, cert, key)
    async with MirrorProcess(
        registry.index_url, tmp_path / "cache", tmp_path, workers=1,
        extra_args=["--config", str(config)], ca_file=ca,
    ) as mirror:  # fmt: skip
        assert mirror.url.startswith("https://")
        trusted = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca))
        async with (
            aiohttp.ClientSession(connector=trusted) as session,
            session.get(f"{mirror.url}/index/config.json") as response,
        ):
            assert response.status == 200
            assert (await response.json())["dl"] == f"{mirror.url}/api/v1/crates"
        async with aiohttp.ClientSession() as session:  # plain http on the TLS port gets nowhere
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{mirror.port}/healthz") as response:
                    await response.read()

        # cargo without the CA refuses the certificate...
        home = tmp_path / "home-untrusting"
        write_cargo_home(home, f"{mirror.url}/index/")
        code, output = await run_cargo(["generate-lockfile"], project, home)
        assert code != 0 and "certificate" in output.lower(), output

        # ...and with CARGO_HTTP_CAINFO resolves, fetches and builds over https.
        home = tmp_path / "home"
        write_cargo_home(home, f"{mirror.url}/index/")
        for args in (["generate-lockfile"], ["fetch"], ["build", "--offline"]):
            code, output = await run_cargo(args, project, home, env={"CARGO_HTTP_CAINFO": str(ca)})
            assert code == 0, f"cargo {args} failed:\n{output}"
        assert_lockfile(project, registry)
        assert await mirror.stop() == 0, mirror.output()
    assert "serving on https://" in mirror.output()


@pytest.mark.parametrize("problem", ["no-key", "wrong-key"])
def test_bad_tls_config_stops_start_up(tmp_path: Path, problem: str) -> None:
    _, cert, key = make_test_ca(tmp_path / "pki")
    if problem == "wrong-key":
        _, _, key = make_test_ca(tmp_path / "other-pki")
    config = tls_yaml(tmp_path, cert, None if problem == "no-key" else key)
    done = subprocess.run(
        [sys.executable, "-m", "cratemirror", "serve", "--config", str(config), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert ("server.tls_key" if problem == "no-key" else "server.tls_cert") in lines[0]
    if problem == "wrong-key":  # (the schema's own check for a missing half names the last layer read)
        assert str(config) in lines[0]
