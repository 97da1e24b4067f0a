"""Detached OpenPGP signatures of channel manifests, checked with GnuPG's `gpgv` against one key.

gpgv is GnuPG's verify-only tool (what apt uses for repository signatures): it trusts exactly the
keyring it is given and nothing in a user's ~/.gnupg. The configured key file (armored or binary) is
turned into a keyring once with `gpg --dearmor`; every check then runs gpgv in a subprocess (off the
event loop) with a timeout, on temporary files, and accepts only a `VALIDSIG` status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import tempfile
from importlib.resources import files
from pathlib import Path

log = logging.getLogger("cratemirror.toolchains")

GPG_TIMEOUT = 30.0
MAX_SIGNATURE = 64 * 1024
RUST_RELEASE_KEY = "rust-release-key.asc"


class BadSignature(Exception):
    """The manifest is not signed by the configured key (or cannot be checked): never served or stored."""


def default_key_bytes() -> bytes:
    """The Rust release key shipped with cratemirror (108F 6620 5EAE B0AA A8DD 5E1C 85AB 96E6 FA1B E5FE)."""
    return files("cratemirror").joinpath("data", RUST_RELEASE_KEY).read_bytes()


class SignatureVerifier:
    def __init__(self, key_file: Path | None) -> None:
        self.key_file = key_file
        shipped = f"the Rust release key ({RUST_RELEASE_KEY})"
        self.key_name = str(key_file) if key_file is not None else shipped
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._keyring: Path | None = None
        self._ready = asyncio.Lock()

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
            self._keyring = None

    async def verify(self, data: bytes, signature: bytes, what: str) -> None:
        """Raises BadSignature unless `signature` is a valid detached signature of `data` by the key."""
        if len(signature) > MAX_SIGNATURE:
            raise BadSignature(f"{what}: the signature is larger than {MAX_SIGNATURE} bytes")
        keyring = await self._keyring_path()
        assert self._dir is not None
        with tempfile.TemporaryDirectory(dir=self._dir.name) as work:
            data_file, sig_file = Path(work) / "data", Path(work) / "data.asc"
            data_file.write_bytes(data)
            sig_file.write_bytes(signature)
            status = await _run(
                ["gpgv", "--homedir", work, "--status-fd", "1", "--keyring", str(keyring), str(sig_file),
                 str(data_file)],
                what,
            )  # fmt: skip
        if status.returncode != 0 or b"[GNUPG:] VALIDSIG " not in status.stdout:
            raise BadSignature(f"{what}: the signature does not verify against {self.key_name}")

    async def prepare(self) -> None:
        await self._keyring_path()

    async def _keyring_path(self) -> Path:
        async with self._ready:
            if self._keyring is not None:
                return self._keyring
            if shutil.which("gpgv") is None or shutil.which("gpg") is None:
                raise BadSignature("gpg and gpgv (GnuPG) are needed to check toolchain manifests")
            self._dir = tempfile.TemporaryDirectory(prefix="cratemirror-keyring-")
            keyring = Path(self._dir.name) / "keyring.gpg"
            if self.key_file is not None:
                key = await asyncio.to_thread(self.key_file.read_bytes)
            else:
                key = default_key_bytes()
            if b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in key:
                source = Path(self._dir.name) / "key.asc"
                source.write_bytes(key)
                result = await _run(
                    ["gpg", "--homedir", self._dir.name, "--batch", "--yes", "--dearmor", "--output",
                     str(keyring), str(source)],
                    "the signing key",
                )  # fmt: skip
                if result.returncode != 0:
                    raise BadSignature(f"{self.key_name} is not an OpenPGP public key gpg can read")
            else:
                keyring.write_bytes(key)
            self._keyring = keyring
            return keyring


async def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), GPG_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise BadSignature(f"{what}: {argv[0]} took longer than {GPG_TIMEOUT:g}s") from None
    assert process.returncode is not None
    if process.returncode != 0:
        log.debug("%s for %s: %s", argv[0], what, stderr.decode(errors="replace").strip())
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
