"""`cratemirror warm --mirror URL` when what answers at URL sends wrong bytes, an error, or half a body.

warm hashes every download through --mirror against what it already trusts (the index `cksum` for a
crate, the manifest's hash for a toolchain file), so a broken or tampered mirror, or a proxy in front of
one, is reported: one `warm: FAILED <what>: <why>` line, the file counted as failed (never as fetched or
already cached) and exit 1. The thing at URL here is a HostileUpstream posing as a mirror: it answers the
index file (or manifest) honestly and the download with the fault under test.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from cratemirror.cache.delivery import CacheResult
from cratemirror.tools.warm_toolchains import host_triple
from tests.dist_server import TRIPLE, build_release
from tests.fake_upstream import FakeRegistry, index_path
from tests.hostile_upstream import Handler, HostileUpstream
from tests.tools_support import CRATES_IO, run_cli

# What a reverse proxy (nginx) in front of a mirror answers when the mirror behind it fails.
PROXY_ERROR_PAGE = (
    "<html>\r\n<head><title>500 Internal Server Error</title></head>\r\n<body>\r\n"
    "<center><h1>500 Internal Server Error</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


Respond = Callable[[bytes], Handler]  # the right bytes of a file -> how its download is answered


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flip_middle_byte(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]


@dataclass(frozen=True)
class Fault:
    """How the download of a file whose right bytes are `good` is answered, and the reason warm gives
    (the start of it: after `warm: FAILED <what>: `)."""

    handler: Respond
    reason: Callable[[bytes, str], str]  # (good bytes, expected sha256) -> reason


def answer(body: Callable[[bytes], bytes], headers: dict[str, str] | None = None) -> Respond:
    """A 200 with `body(good)` (aiohttp sends no body to a HEAD); `headers` on the GET only, so the HEAD
    never claims a hit and warm always downloads."""

    def make(good: bytes) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if request.method == "HEAD":
                return web.Response(body=good, content_type="application/gzip")
            return web.Response(body=body(good), headers=headers, content_type="application/gzip")

        return handler

    return make


def cut_off(declared_length: bool) -> Respond:
    """Headers and the first half of the body, then the connection is closed (a FIN). With the full
    Content-Length declared, the client can tell the body is short; without one (a close-delimited body,
    as HTTP/1.1 allows), only the hash can."""

    def make(good: bytes) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if request.method == "HEAD":
                return web.Response(body=good, content_type="application/gzip")
            framing = f"Content-Length: {len(good)}" if declared_length else "Connection: close"
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\n{framing}\r\n\r\n".encode()
            transport = request.transport
            assert transport is not None
            transport.write(head + good[: len(good) // 2])
            transport.close()  # flushes what was written, then closes
            return web.Response(status=599)  # never reaches the client: the connection is gone

        return handler

    return make


def server_error(good: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text=PROXY_ERROR_PAGE, content_type="text/html")

    return handler


def hash_mismatch(sent: Callable[[bytes], bytes]) -> Callable[[bytes, str], str]:
    return lambda good, expected: f"the mirror sent bytes hashing to {sha256(sent(good))}, not {expected}"


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


FAULTS = {
    "tampered": Fault(answer(flip_middle_byte), hash_mismatch(flip_middle_byte)),
    # A GET claiming to be a hit must not make tampered bytes count as "already cached".
    "tampered-claims-hit": Fault(
        answer(flip_middle_byte, {"X-Cache": CacheResult.HIT}), hash_mismatch(flip_middle_byte)
    ),
    "truncated-close-delimited": Fault(cut_off(declared_length=False), hash_mismatch(half)),
    "truncated-short-of-content-length": Fault(
        cut_off(declared_length=True), lambda good, expected: "Response payload is not completed"
    ),
    "status-500": Fault(server_error, lambda good, expected: "the mirror answered 500: <html>"),
}


def assert_one_failure(stderr: str, what: str, reason: str) -> None:
    """Exactly one FAILED line, for `what`, with `reason`; every line warm's own (a reason spanning lines,
    a traceback, would not be)."""
    lines = stderr.splitlines()
    failed = [line for line in lines if line.startswith("warm: FAILED ")]
    assert len(failed) == 1 and failed[0].startswith(f"warm: FAILED {what}: {reason}"), stderr
    strays = [line for line in lines if not line.startswith("warm: ")]
    assert not strays, stderr


@pytest.fixture
async def impostor() -> AsyncIterator[HostileUpstream]:
    """Whatever answers at --mirror URL."""
    async with HostileUpstream() as server:
        yield server


# --- crates: checked against the index cksum -----------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
async def test_warm_mirror_crate_with_wrong_bytes_fails(
    impostor: HostileUpstream, tmp_path: Path, fault: Fault
) -> None:
    registry = FakeRegistry()  # never started: only builds the crates and their index files
    good, evil = registry.add_crate("good", "1.0.0"), registry.add_crate("evil", "2.0.0")
    for cv in (good, evil):
        impostor.serve_bytes(f"/index/{index_path(cv.name)}", registry.index_file(cv.name))
    good_path, evil_path = (f"/api/v1/crates/{cv.name}/{cv.vers}/download" for cv in (good, evil))
    impostor.serve(good_path, answer(lambda data: data)(good.data))
    impostor.serve(evil_path, fault.handler(evil.data))
    lockfile = tmp_path / "Cargo.lock"
    lockfile.write_text(
        "version = 3\n\n"
        + "".join(
            f'[[package]]\nname = "{cv.name}"\nversion = "{cv.vers}"\nsource = "{CRATES_IO}"\n'
            f'checksum = "{cv.cksum}"\n\n'
            for cv in (good, evil)
        )
    )

    result = await run_cli("warm", str(lockfile), "--mirror", impostor.url, "--jobs", "1", cwd=tmp_path)
    print(result.output)
    assert result.code == 1, result.output
    assert_one_failure(result.stderr, "evil 2.0.0", fault.reason(evil.data, evil.cksum))
    assert not any("evil" in line for line in result.stderr.splitlines() if "FAILED" not in line)
    assert result.stdout.splitlines()[-1] == (
        "warm: 2 crates: 1 fetched, 0 already cached, 1 failed; 0 skipped (git/path)"
    )
    assert impostor.count(evil_path) >= 1  # the download was asked for, and its answer refused
    assert impostor.count(good_path) >= 1


# --- toolchain files: checked against the manifest's hash ---------------------------------------------


@pytest.mark.skipif(host_triple() != TRIPLE, reason=f"the fake release is built for {TRIPLE} only")
@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
async def test_warm_mirror_toolchain_file_with_wrong_bytes_fails(
    impostor: HostileUpstream, tmp_path: Path, fault: Fault
) -> None:
    release = build_release("stable", "1.90.0", "2026-01-01")  # profile default: rustc and cargo
    impostor.serve_bytes("/toolchains/dist/channel-rust-stable.toml", release.manifest)
    rustc, cargo = (f"dist/2026-01-01/{name}-1.90.0-{TRIPLE}.tar.gz" for name in ("rustc", "cargo"))
    impostor.serve(f"/toolchains/{rustc}", answer(lambda data: data)(release.files[rustc]))
    impostor.serve(f"/toolchains/{cargo}", fault.handler(release.files[cargo]))

    result = await run_cli("warm", "--toolchain", "stable", "--mirror", impostor.url, cwd=tmp_path)
    print(result.output)
    assert result.code == 1, result.output
    good = release.files[cargo]
    assert_one_failure(result.stderr, cargo, fault.reason(good, sha256(good)))
    assert result.stdout.splitlines() == [
        f"warm: toolchain stable (default, {TRIPLE}): 2 files: 1 fetched, 0 already cached, 1 failed"
    ]
    assert impostor.count(f"/toolchains/{cargo}") >= 1
    assert impostor.count(f"/toolchains/{rustc}") >= 1
