"""A fake rustup dist server (static.rust-lang.org's shape): a real aiohttp server on loopback.

Channel manifests (`manifest-version = "2"`, component URLs under https://static.rust-lang.org, which
rustup swaps for RUSTUP_DIST_SERVER), their `.sha256`, and `.asc` signatures made at test time with a
throwaway OpenPGP key (`TestSigningKey`, gpg in a temporary GNUPGHOME). Components are tiny
rust-installer v3 tarballs whose `bin/rustc` is a shell script printing its version, so
`rustup run stable rustc --version` works. Faults can be flipped while it runs: a manifest signed by
another key, a component whose bytes are not the manifest's, a delay per request.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web

TRIPLE = "x86_64-unknown-linux-gnu"
ORIGIN = "https://static.rust-lang.org"
GPG_TIMEOUT = 60


def have_gpg() -> bool:
    return shutil.which("gpg") is not None and shutil.which("gpgv") is not None


# GNUPGHOMEs whose gpg-agent a test started: the conftest stops them after each test.
AGENT_HOMES: list[Path] = []


def stop_agents() -> None:
    """Stop the gpg-agent every TestSigningKey of the test started (gpg leaves it running)."""
    while AGENT_HOMES:
        home = AGENT_HOMES.pop()
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
            capture_output=True, timeout=GPG_TIMEOUT, check=False,
        )  # fmt: skip


class TestSigningKey:
    """An ed25519 signing key made in a temporary GNUPGHOME; `public_key` is its armored export."""

    __test__ = False

    def __init__(self, home: Path, uid: str = "cratemirror test <test@example.invalid>") -> None:
        self.home = home
        AGENT_HOMES.append(home)
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        self.uid = uid
        self._gpg("--quick-generate-key", uid, "ed25519", "sign", "never")
        self.public_key = home / "public.asc"
        self.public_key.write_bytes(self._gpg("--armor", "--export", uid))

    def _gpg(self, *args: str, data: bytes | None = None) -> bytes:
        result = subprocess.run(
            ["gpg", "--homedir", str(self.home), "--batch", "--yes", "--pinentry-mode", "loopback",
             "--passphrase", "", *args],
            input=data, capture_output=True, timeout=GPG_TIMEOUT, check=True,
        )  # fmt: skip
        return result.stdout

    def sign(self, data: bytes) -> bytes:
        return self._gpg("--armor", "--detach-sign", "--local-user", self.uid, "--output", "-", data=data)


def installer_tarball(component: str, version: str, script: str, triple: str = TRIPLE) -> tuple[str, bytes]:
    """A rust-installer v3 tarball (gzip, the same bytes each time) with one file, bin/<component>:
    (top dir name, bytes)."""
    top = f"{component}-{version}-{triple}"
    files = {
        "rust-installer-version": b"3\n",
        "components": f"{component}\n".encode(),
        f"{component}/manifest.in": f"file:bin/{component}\n".encode(),
        f"{component}/bin/{component}": script.encode(),
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for folder in (top, f"{top}/{component}", f"{top}/{component}/bin"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for name, body in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(body)
            info.mode = 0o755 if "/bin/" in name else 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    return top, gzip.compress(out.getvalue(), mtime=0)  # the same bytes every time


@dataclass
class Release:
    channel: str
    version: str  # e.g. 1.90.0
    date: str  # YYYY-MM-DD
    manifest: bytes = b""
    files: dict[str, bytes] = field(default_factory=dict)  # path under / -> bytes


def build_release(channel: str, version: str, date: str, padding: int = 0) -> Release:
    """A release with rustc (and cargo) for TRIPLE; `padding` bytes of incompressible data in rustc."""
    release = Release(channel, version, date)
    full_version = f"{version} (0000000 {date})"
    lines = ['manifest-version = "2"', f'date = "{date}"', ""]
    lines += ["[pkg.rust]", f'version = "{full_version}"', ""]
    lines += [f"[pkg.rust.target.{TRIPLE}]", "available = true"]
    components = []
    for component in ("rustc", "cargo"):
        script = f"#!/bin/sh\necho '{component} {full_version}'\n"
        if component == "rustc" and padding:
            script += "# " + os.urandom(padding).hex() + "\n"
        _, body = installer_tarball(component, version, script)
        path = f"dist/{date}/{component}-{version}-{TRIPLE}.tar.gz"
        release.files[path] = body
        components.append((component, path, hashlib.sha256(body).hexdigest()))
    for component, _, _ in components:
        lines += [f"[[pkg.rust.target.{TRIPLE}.components]]", f'pkg = "{component}"', f'target = "{TRIPLE}"']
    lines.append("")
    for component, path, digest in components:
        lines += [
            f"[pkg.{component}]", f'version = "{full_version}"', "",
            f"[pkg.{component}.target.{TRIPLE}]", "available = true",
            f'url = "{ORIGIN}/{path}"', f'hash = "{digest}"', "",
        ]  # fmt: skip
    lines += ["[renames]", "", "[profiles]", 'minimal = ["rustc"]', 'default = ["rustc", "cargo"]',
              'complete = ["rustc", "cargo"]', ""]  # fmt: skip
    release.manifest = "\n".join(lines).encode()
    return release


class DistServer:
    """`publish()` a release on a channel; the server answers what static.rust-lang.org would."""

    def __init__(self, key: TestSigningKey, *, delay: float = 0.0) -> None:
        self.key = key
        self.delay = delay
        self.files: dict[str, bytes] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        #: paths served with these bytes instead (a tampered component, a manifest signed by another key)
        self.override: dict[str, bytes] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, release: Release, *, dated_too: bool = True) -> None:
        manifest_names = [f"dist/channel-rust-{release.channel}.toml"]
        if dated_too:
            manifest_names.append(f"dist/{release.date}/channel-rust-{release.channel}.toml")
        signature = self.key.sign(release.manifest)
        digest = hashlib.sha256(release.manifest).hexdigest()
        for name in manifest_names:
            self.files[name] = release.manifest
            self.files[f"{name}.asc"] = signature
            self.files[f"{name}.sha256"] = f"{digest}  {name.rsplit('/', 1)[-1]}\n".encode()
        self.files.update(release.files)

    def component_requests(self) -> int:
        return sum(count for path, count in self.requests.items() if path.endswith((".tar.gz", ".tar.xz")))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests[path] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        body = self.override.get(path, self.files.get(path))
        if body is None:
            return web.Response(status=404, text="not found\n")
        return web.Response(body=body, content_type="application/octet-stream")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DistServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def publish_rustup_init(dist: DistServer, version: str, body: bytes, triple: str = TRIPLE) -> None:
    """rustup-init and its .sha256 under rustup/dist/<triple>/ and rustup/archive/<version>/<triple>/,
    and rustup/release-stable.toml pointing at `version`."""
    digest = hashlib.sha256(body).hexdigest()
    for folder in (f"rustup/dist/{triple}", f"rustup/archive/{version}/{triple}"):
        dist.files[f"{folder}/rustup-init"] = body
        dist.files[f"{folder}/rustup-init.sha256"] = f"{digest} *rustup-init\n".encode()
    dist.files["rustup/release-stable.toml"] = f'schema-version = "1"\nversion = "{version}"\n'.encode()
