"""A fake crates.io-like sparse registry: a real aiohttp server on loopback.

Used as the upstream of the mirror's integration tests and for end-to-end tests with the real
``cargo``.  Everything is in memory; crates are real, deterministic ``.crate`` tarballs that cargo
can build.  Faults (``down``, ``delay``, ``status_override``, ...) can be flipped at any time while
the server runs.  Helpers to drive the real cargo against a registry live at the bottom
(:func:`write_cargo_home`, :func:`write_cargo_project`, :func:`run_cargo`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import functools
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web

__all__ = [
    "CHUNK_SIZE",
    "CrateVersion",
    "Dep",
    "FakeRegistry",
    "index_path",
    "make_crate_tarball",
    "run_cargo",
    "write_cargo_home",
    "write_cargo_project",
]

#: Crate bodies are streamed in chunks of this size.
CHUNK_SIZE = 16 * 1024

_DL_MARKERS = ("{crate}", "{version}", "{prefix}", "{lowerprefix}", "{sha256-checksum}")


# --------------------------------------------------------------------------------------------------
# Crates, index lines, tarballs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dep:
    """A dependency as it appears in an index line (``name`` is the name used in the dependent,
    i.e. the rename when ``package`` is set)."""

    name: str
    req: str
    kind: str = "normal"  # "normal" | "dev" | "build"
    optional: bool = False
    features: tuple[str, ...] = ()
    default_features: bool = True
    target: str | None = None
    package: str | None = None
    #: the index URL of another registry (e.g. crates.io's, from a private registry's index line)
    registry: str | None = None

    def index_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "req": self.req,
            "features": list(self.features),
            "optional": self.optional,
            "default_features": self.default_features,
            "target": self.target,
            "kind": self.kind,
        }
        if self.registry is not None:
            d["registry"] = self.registry
        if self.package is not None:
            d["package"] = self.package
        return d


def _uses_new_feature_syntax(values: Sequence[str]) -> bool:
    return any(v.startswith("dep:") or "?/" in v for v in values)


@dataclass
class CrateVersion:
    name: str
    vers: str
    data: bytes
    cksum: str
    yanked: bool = False
    deps: tuple[Dep, ...] = ()
    features: dict[str, list[str]] = field(default_factory=dict)
    pubtime: str | None = None  # RFC 3339, as crates.io writes it ("2025-01-02T03:04:05Z"); None: omitted

    def index_line(self) -> bytes:
        """One index line exactly as crates.io serialises it (compact, key order of crates.io,
        ``features2`` + ``"v":2`` only when a feature uses ``dep:`` / ``?/`` syntax, ``links``
        omitted because it is null)."""
        features1: dict[str, list[str]] = {}
        features2: dict[str, list[str]] = {}
        for key in sorted(self.features):
            values = list(self.features[key])
            (features2 if _uses_new_feature_syntax(values) else features1)[key] = values
        obj: dict[str, Any] = {
            "name": self.name,
            "vers": self.vers,
            "deps": [d.index_json() for d in self.deps],
            "cksum": self.cksum,
            "features": features1,
        }
        if features2:
            obj["features2"] = features2
        obj["yanked"] = self.yanked
        if features2:
            obj["v"] = 2
        if self.pubtime is not None:
            obj["pubtime"] = self.pubtime
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _prefix(name: str) -> str:
    """The directory part of the sparse index path, keeping the name's case."""
    n = len(name)
    if n == 0:
        raise ValueError("empty crate name")
    if n == 1:
        return "1"
    if n == 2:
        return "2"
    if n == 3:
        return f"3/{name[0]}"
    return f"{name[0:2]}/{name[2:4]}"


def index_path(name: str) -> str:
    """Sparse index path of a crate (whole name lowercased): 1/n, 2/nn, 3/n/nnn, nn/nn/name."""
    lower = name.lower()
    return f"{_prefix(lower)}/{lower}"


def _toml_str(s: str) -> str:
    # JSON strings are valid TOML basic strings.
    return json.dumps(s, ensure_ascii=False)


def _cargo_toml(
    name: str,
    vers: str,
    deps: Sequence[Dep],
    features: Mapping[str, Sequence[str]] | None,
    license: str | None = "MIT OR Apache-2.0",
) -> str:
    lines = [
        "[package]",
        f"name = {_toml_str(name)}",
        f"version = {_toml_str(vers)}",
        'edition = "2021"',
        f"description = {_toml_str(f'fake crate {name} {vers}')}",
        *([f"license = {_toml_str(license)}"] if license is not None else []),
        "",
    ]
    section_of = {"normal": "dependencies", "dev": "dev-dependencies", "build": "build-dependencies"}
    groups: dict[tuple[str | None, str], list[Dep]] = {}
    for dep in deps:
        if dep.kind not in section_of:
            raise ValueError(f"unknown dependency kind {dep.kind!r}")
        groups.setdefault((dep.target, dep.kind), []).append(dep)
    for (target, kind), group in groups.items():
        section = section_of[kind]
        header = f"[target.{_toml_str(target)}.{section}]" if target is not None else f"[{section}]"
        lines.append(header)
        for dep in group:
            parts = [f"version = {_toml_str(dep.req)}"]
            if dep.package is not None:
                parts.append(f"package = {_toml_str(dep.package)}")
            if dep.optional:
                parts.append("optional = true")
            if not dep.default_features:
                parts.append("default-features = false")
            if dep.features:
                parts.append("features = [" + ", ".join(_toml_str(f) for f in dep.features) + "]")
            lines.append(f"{_toml_str(dep.name)} = {{ {', '.join(parts)} }}")
        lines.append("")
    if features:
        lines.append("[features]")
        for key in sorted(features):
            lines.append(f"{_toml_str(key)} = [" + ", ".join(_toml_str(v) for v in features[key]) + "]")
        lines.append("")
    return "\n".join(lines)


def _build_tarball(files: Sequence[tuple[str, bytes]]) -> bytes:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, content in files:
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(content))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(tar_buf.getvalue())
    return out.getvalue()


def make_crate_tarball(
    name: str,
    vers: str,
    deps: Sequence[Dep] = (),
    lib_rs: str | None = None,
    pad_to: int = 0,
    *,
    features: Mapping[str, Sequence[str]] | None = None,
    license: str | None = "MIT OR Apache-2.0",
) -> bytes:
    """A real, deterministic ``.crate`` (gzip'd tar) that cargo can build.

    Contains ``{name}-{vers}/Cargo.toml`` (dependency sections matching ``deps``, ``[features]``
    from ``features``, ``license`` unless None) and ``{name}-{vers}/src/lib.rs``.  With
    ``pad_to > 0`` an extra ``{name}-{vers}/data.bin`` of incompressible deterministic bytes makes
    the result at least ``pad_to`` bytes long.
    """
    root = f"{name}-{vers}"
    if lib_rs is None:
        lib_rs = f'pub fn hello() -> &\'static str {{ "{name} {vers}" }}\n'
    files: list[tuple[str, bytes]] = [
        (f"{root}/Cargo.toml", _cargo_toml(name, vers, deps, features, license).encode()),
        (f"{root}/src/lib.rs", lib_rs.encode()),
    ]
    data = _build_tarball(files)
    if pad_to <= 0 or len(data) >= pad_to:
        return data
    seed = int.from_bytes(hashlib.sha256(f"{name}\0{vers}".encode()).digest()[:8], "big")
    size = pad_to
    while True:
        padding = random.Random(seed).randbytes(size)
        data = _build_tarball([*files, (f"{root}/data.bin", padding)])
        if len(data) >= pad_to:
            return data
        size += pad_to - len(data) + 1024


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


class _CIHeaders(dict[str, str]):
    """A ``dict`` of request headers with case-insensitive lookups (keys stored lowercased)."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:40] + '"'


def _accepts_gzip(header: str) -> bool:
    for item in header.split(","):
        token, _, params = item.strip().partition(";")
        if token.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            k, _, v = param.strip().partition("=")
            if k.strip().lower() == "q":
                with contextlib.suppress(ValueError):
                    q = float(v)
        if q > 0:
            return True
    return False


def _etag_matches(if_none_match: str, etag: str) -> bool:
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(cand.strip().removeprefix("W/") == bare for cand in if_none_match.split(","))


class FakeRegistry:
    """A crates.io-like sparse registry on loopback.

    Index at ``{url}/index/`` (``config.json`` + prefix-path files), crates at
    ``{url}/crates/{name}/{version}/download`` and at whatever URL ``dl_template`` produces.
    """

    def __init__(self, dl_template: str | None = None) -> None:
        self.dl_template: str = dl_template if dl_template is not None else "{base}/crates"
        self.url = ""
        self.index_url = ""
        self.requests: collections.Counter[str] = collections.Counter()
        self.request_log: list[tuple[str, str, dict[str, str]]] = []

        # Faults.
        self.down = False
        self.delay = 0.0
        self.status_override: int | None = None
        self.retry_after: str | None = None
        self.corrupt_crates = False
        self.body_chunk_delay = 0.0
        self.crate_status_403_for_missing = True
        #: a private registry: every request needs exactly this Authorization (config.json says so)
        self.required_token: str | None = None
        #: answer crate downloads with a 302 to this base URL + the same path (another host's storage)
        self.redirect_crates_to: str | None = None
        self.hold_started = asyncio.Event()
        #: number of crate requests currently parked on ``gate``
        self.held = 0
        self._fail_every_other: int | None = None
        self._feo_counter = 0
        self._stall_after_bytes: int | None = None
        self._gate: asyncio.Event | None = None
        #: while set and not yet fired, index requests park here (a slow upstream, without sleeping)
        self.index_gate: asyncio.Event | None = None
        self.index_hold_started = asyncio.Event()
        #: number of index requests currently parked on ``index_gate``
        self.index_held = 0

        self._crates: dict[str, list[CrateVersion]] = {}  # key: lowercased name
        #: the query parameters of every search API request (GET /api/v1/crates)
        self.search_queries: list[dict[str, str]] = []
        self._raw: dict[str, bytes] = {}  # key: path relative to the index root
        self._mtimes: dict[str, int] = {}  # key: path relative to the index root
        self._clock = 0
        self._changed = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._runner: web.AppRunner | None = None

    # ---- faults that wake parked handlers when changed ---------------------------------------

    def _notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    @property
    def fail_every_other(self) -> int | None:
        return self._fail_every_other

    @fail_every_other.setter
    def fail_every_other(self, status: int | None) -> None:
        self._fail_every_other = status
        self._feo_counter = 0  # the next request is the 1st one: it fails

    @property
    def stall_after_bytes(self) -> int | None:
        return self._stall_after_bytes

    @stall_after_bytes.setter
    def stall_after_bytes(self, value: int | None) -> None:
        self._stall_after_bytes = value
        self._notify()

    def _stall_resumable(self, sent: int) -> bool:
        stall = self._stall_after_bytes
        return stall is None or stall > sent

    @property
    def gate(self) -> asyncio.Event | None:
        return self._gate

    @gate.setter
    def gate(self, value: asyncio.Event | None) -> None:
        self._gate = value
        self._notify()

    # ---- content -------------------------------------------------------------------------------

    def _touch(self, rel: str) -> None:
        # Strictly increasing whole seconds, so Last-Modified changes on every change.
        self._clock = max(int(time.time()), self._clock + 1)
        self._mtimes[rel] = self._clock

    def add_crate(
        self,
        name: str,
        vers: str,
        deps: Sequence[Dep] = (),
        yanked: bool = False,
        features: Mapping[str, Sequence[str]] | None = None,
        pad_to: int = 0,
        lib_rs: str | None = None,
        license: str | None = "MIT OR Apache-2.0",
        pubtime: str | None = None,
    ) -> CrateVersion:
        """Publish a version: builds its tarball (``license`` in its Cargo.toml, none if None) and
        appends a line to the crate's index file."""
        versions = self._crates.setdefault(name.lower(), [])
        if any(v.vers == vers for v in versions):
            raise ValueError(f"{name} {vers} already exists")
        feats = {k: list(v) for k, v in (features or {}).items()}
        data = make_crate_tarball(
            name, vers, deps, lib_rs=lib_rs, pad_to=pad_to, features=feats, license=license
        )
        cv = CrateVersion(
            name=name,
            vers=vers,
            data=data,
            cksum=hashlib.sha256(data).hexdigest(),
            yanked=yanked,
            deps=tuple(deps),
            features=feats,
            pubtime=pubtime,
        )
        versions.append(cv)
        self._touch(index_path(name))
        return cv

    @staticmethod
    def _rel(path: str) -> str:
        rel = path.lstrip("/")
        return rel.removeprefix("index/")

    def add_raw_index_file(self, path: str, body: bytes) -> None:
        """Serve ``body`` as an index file.  ``path`` is relative to the index root
        (``"se/rd/serde"``; a leading ``/`` or ``index/`` is accepted).  Raw files take precedence
        over crates added with :meth:`add_crate` and over the generated ``config.json``."""
        rel = self._rel(path)
        self._raw[rel] = bytes(body)
        self._touch(rel)

    def get_version(self, name: str, vers: str) -> CrateVersion:
        for cv in self._crates.get(name.lower(), []):
            if cv.vers == vers:
                return cv
        raise KeyError(f"{name} {vers}")

    def versions(self, name: str) -> list[CrateVersion]:
        return list(self._crates.get(name.lower(), []))

    def set_yanked(self, name: str, vers: str, yanked: bool) -> None:
        cv = self.get_version(name, vers)
        if cv.yanked != yanked:
            cv.yanked = yanked
            self._touch(index_path(name))

    def remove_crate(self, name: str) -> None:
        """Delete the crate: its index file (and its downloads) then 404/403."""
        rel = index_path(name)
        self._crates.pop(name.lower(), None)
        self._raw.pop(rel, None)
        self._touch(rel)

    def index_file(self, name: str) -> bytes:
        rel = index_path(name)
        body = self._index_body(rel)
        if body is None:
            raise KeyError(name)
        return body

    def _index_body(self, rel: str) -> bytes | None:
        if rel in self._raw:
            return self._raw[rel]
        key = rel.rsplit("/", 1)[-1]
        versions = self._crates.get(key)
        if not versions or index_path(key) != rel:
            return None
        return b"".join(v.index_line() + b"\n" for v in versions)

    def dl_url(self) -> str:
        """The ``dl`` value served in config.json."""
        return self.dl_template.replace("{base}", self.url)

    def download_url(self, cv: CrateVersion) -> str:
        """The URL cargo builds from ``dl`` for a version."""
        dl = self.dl_url()
        if not any(m in dl for m in _DL_MARKERS):
            return f"{dl}/{cv.name}/{cv.vers}/download"
        return (
            dl.replace("{crate}", cv.name)
            .replace("{version}", cv.vers)
            .replace("{prefix}", _prefix(cv.name))
            .replace("{lowerprefix}", _prefix(cv.name).lower())
            .replace("{sha256-checksum}", cv.cksum)
        )

    def _find_crate(self, raw_path: str, raw_query: str) -> CrateVersion | None:
        path = unquote(raw_path)
        query = unquote(raw_query)
        parts = path.split("/")
        if len(parts) == 5 and parts[0] == "" and parts[1] == "crates" and parts[4] == "download":
            for cv in self._crates.get(parts[2].lower(), []):
                if cv.name == parts[2] and cv.vers == parts[3]:
                    return cv
        for versions in self._crates.values():
            for cv in versions:
                target = urlsplit(self.download_url(cv))
                if unquote(target.path) == path and (not target.query or unquote(target.query) == query):
                    return cv
        return None

    # ---- bookkeeping ---------------------------------------------------------------------------

    def count(self, path_substring: str) -> int:
        return sum(n for path, n in self.requests.items() if path_substring in path)

    def reset_counts(self) -> None:
        self.requests.clear()
        self.request_log.clear()

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._runner is not None:
            raise RuntimeError("already started")
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        self.index_url = f"{self.url}/index/"
        return self.index_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        self._stop_event.set()
        self._notify()
        await runner.cleanup()

    async def __aenter__(self) -> FakeRegistry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- waiting helpers (all wake up on stop()) -----------------------------------------------

    async def _sleep(self, seconds: float) -> bool:
        """Sleep; False if stop() happened meanwhile."""
        if seconds <= 0:
            return not self._stopping
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)
        return not self._stopping

    async def _park(self, done: Callable[[], bool], extra: asyncio.Event | None = None) -> bool:
        """Wait until ``done()``; False if stop() happened first."""
        while not done():
            if self._stopping:
                return False
            waits = [
                asyncio.ensure_future(self._changed.wait()),
                asyncio.ensure_future(self._stop_event.wait()),
            ]
            if extra is not None:
                waits.append(asyncio.ensure_future(extra.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return not self._stopping

    @staticmethod
    def _reset_connection(request: web.BaseRequest) -> web.Response:
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # Nothing reaches the client: the connection is already gone.
        return web.Response(status=599)

    # ---- request handling ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        self.requests[raw_path] += 1
        headers = _CIHeaders()
        for key, value in request.headers.items():
            k = key.lower()
            headers[k] = f"{headers[k]}, {value}" if k in headers else value
        self.request_log.append((request.method, raw_path, headers))

        if self.down:
            return self._reset_connection(request)
        if self.required_token is not None and request.headers.get("Authorization") != self.required_token:
            return web.Response(
                status=401,
                text="fake upstream: a valid token is required\n",
                headers={"WWW-Authenticate": f'Cargo login_url="{self.url}/me"'},
            )
        if self.delay > 0 and not await self._sleep(self.delay):
            return self._reset_connection(request)
        if self.down:
            return self._reset_connection(request)

        fail_status: int | None = self.status_override
        if fail_status is None and self._fail_every_other is not None:
            n = self._feo_counter
            self._feo_counter += 1
            if n % 2 == 0:
                fail_status = self._fail_every_other
        if fail_status is not None:
            fail_headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return web.Response(
                status=fail_status, text=f"fake upstream: injected {fail_status}\n", headers=fail_headers
            )

        if raw_path.startswith("/index/"):
            index_gate = self.index_gate
            if index_gate is not None and not index_gate.is_set():
                self.index_held += 1
                self.index_hold_started.set()
                try:
                    released = await self._park(index_gate.is_set, extra=index_gate)
                finally:
                    self.index_held -= 1
                if not released:
                    return self._reset_connection(request)
            return self._handle_index(request, self._rel(unquote(raw_path)))
        if raw_path == "/api/v1/crates" and request.method == "GET":
            return self._handle_search(request)
        return await self._handle_crate(request, raw_path, raw_query)

    def _handle_search(self, request: web.Request) -> web.Response:
        """crates.io's search API in small: `q` matched against names (substring, case-insensitive),
        newest version per crate, `per_page` (default 10) of them, and the total."""
        self.search_queries.append(dict(request.query))
        query = request.query.get("q", "").lower()
        try:
            per_page = int(request.query.get("per_page", "10"))
        except ValueError:
            return web.json_response({"errors": [{"detail": "invalid per_page"}]}, status=400)
        matches = sorted(key for key in self._crates if query in key and self._crates[key])
        crates = [
            {
                "name": self._crates[key][-1].name,
                "max_version": self._crates[key][-1].vers,
                "description": f"fake crate {self._crates[key][-1].name}",
            }
            for key in matches[:per_page]
        ]
        return web.json_response({"crates": crates, "meta": {"total": len(matches)}})

    def _handle_index(self, request: web.Request, rel: str) -> web.Response:
        body = self._index_body(rel)
        content_type = "text/plain"
        if body is None and rel == "config.json":
            document: dict[str, Any] = {"dl": self.dl_url(), "api": self.url}
            if self.required_token is not None:
                document["auth-required"] = True
            body = json.dumps(document, separators=(",", ":")).encode()
            content_type = "application/json"
        if body is None:
            return web.Response(status=404, text="not found\n")
        etag = _etag(body)
        mtime = self._mtimes.get(rel, 0)
        headers = {
            "ETag": etag,
            "Last-Modified": _http_date(mtime),
            "Cache-Control": "public,max-age=600",
            "Vary": "Accept-Encoding",
        }
        inm = request.headers.get("If-None-Match")
        ims = request.headers.get("If-Modified-Since")
        not_modified = False
        if inm is not None:
            not_modified = _etag_matches(inm, etag)
        elif ims is not None:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                not_modified = mtime <= email.utils.parsedate_to_datetime(ims).timestamp()
        if not_modified:
            return web.Response(status=304, headers=headers)
        if _accepts_gzip(request.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        headers["Content-Type"] = content_type
        return web.Response(status=200, body=body, headers=headers)

    async def _handle_crate(self, request: web.Request, raw_path: str, raw_query: str) -> web.StreamResponse:
        if self.redirect_crates_to is not None:
            target = self.redirect_crates_to.rstrip("/") + raw_path + (f"?{raw_query}" if raw_query else "")
            return web.Response(status=302, headers={"Location": target})
        cv = self._find_crate(raw_path, raw_query)
        if cv is None:
            if self.crate_status_403_for_missing:
                return web.Response(
                    status=403,
                    body=b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code></Error>",
                    content_type="application/xml",
                )
            return web.Response(status=404, text="not found\n")

        is_head = request.method == "HEAD"
        gate = self._gate
        if not is_head and gate is not None and not gate.is_set():
            self.held += 1
            self.hold_started.set()
            try:
                released = await self._park(lambda: self._gate is not gate or gate.is_set(), extra=gate)
            finally:
                self.held -= 1
            if not released:
                return self._reset_connection(request)

        data = cv.data
        if self.corrupt_crates and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]

        resp = web.StreamResponse(status=200)
        resp.content_type = "application/gzip"
        resp.content_length = len(data)
        resp.headers["Cache-Control"] = "public,max-age=31536000,immutable"
        resp.headers["ETag"] = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
        try:
            await resp.prepare(request)
            if is_head:
                await resp.write_eof()
                return resp
            sent = 0
            while sent < len(data):
                stall = self._stall_after_bytes
                end = min(sent + CHUNK_SIZE, len(data))
                if stall is not None and sent >= stall:
                    if not await self._park(functools.partial(self._stall_resumable, sent)):
                        return self._reset_connection(request)
                    continue
                if stall is not None:
                    end = min(end, stall)
                await resp.write(data[sent:end])
                sent = end
                if (
                    sent < len(data)
                    and self.body_chunk_delay > 0
                    and not await self._sleep(self.body_chunk_delay)
                ):
                    return self._reset_connection(request)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            # The client went away mid-body (e.g. it timed out on a stall).
            return self._reset_connection(request)
        return resp


# --------------------------------------------------------------------------------------------------
# Driving the real cargo
# --------------------------------------------------------------------------------------------------


def write_cargo_home(cargo_home: Path, registry_index_url: str, *, source_name: str = "mirror") -> None:
    """Write ``{cargo_home}/config.toml`` replacing crates-io with the sparse registry at
    ``registry_index_url`` (``sparse+`` is prepended unless already there)."""
    url = registry_index_url if registry_index_url.startswith("sparse+") else f"sparse+{registry_index_url}"
    cargo_home.mkdir(parents=True, exist_ok=True)
    (cargo_home / "config.toml").write_text(
        "[source.crates-io]\n"
        f"replace-with = {_toml_str(source_name)}\n"
        "\n"
        f"[source.{_toml_str(source_name)}]\n"
        f"registry = {_toml_str(url)}\n"
        "\n"
        "[net]\n"
        "retry = 0\n"
        "\n"
        "[term]\n"
        'color = "never"\n'
        'progress.when = "never"\n'
    )


def write_cargo_project(path: Path, deps: Mapping[str, str]) -> None:
    """A binary package ``app`` at ``path`` depending on ``deps`` (name -> version requirement)."""
    (path / "src").mkdir(parents=True, exist_ok=True)
    lines = [
        "[package]",
        'name = "app"',
        'version = "0.1.0"',
        'edition = "2021"',
        "publish = false",
        "",
        "[dependencies]",
        *(f"{_toml_str(name)} = {_toml_str(req)}" for name, req in deps.items()),
        "",
        "[workspace]",
        "",
    ]
    (path / "Cargo.toml").write_text("\n".join(lines))
    (path / "src" / "main.rs").write_text("fn main() {}\n")


async def run_cargo(
    args: Sequence[str],
    cwd: Path,
    cargo_home: Path,
    timeout: float = 240,  # noqa: ASYNC109 - part of the shared interface
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> tuple[int, str]:
    """Run the real ``cargo`` without blocking the event loop (so a server in the same loop keeps
    answering).  Returns (exit code, combined stdout+stderr).  On timeout the process group is
    killed and the exit code is negative.  Raises FileNotFoundError if cargo is not on PATH.
    ``env`` adds variables (e.g. ``CARGO_REGISTRIES_MIRROR_TOKEN``) after the CARGO_* ones are cleared.
    ``prefix``: a command cargo runs under (the fleet bench pins it to a CPU with ``taskset``)."""
    cargo = shutil.which("cargo")
    if cargo is None:
        raise FileNotFoundError("cargo not found on PATH")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("CARGO_")}
    child_env.update(env or {})
    child_env.update(
        CARGO_HOME=str(cargo_home),
        CARGO_NET_RETRY="0",
        CARGO_TERM_COLOR="never",
        CARGO_TERM_PROGRESS_WHEN="never",
        CARGO_HTTP_TIMEOUT="60",
    )
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        cargo,
        *args,
        cwd=str(cwd),
        env=child_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = await proc.communicate()
        text = out.decode(errors="replace") + f"\n[run_cargo: timed out after {timeout}s]\n"
        return (proc.returncode if proc.returncode is not None and proc.returncode < 0 else -9), text
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


# crates.io's real index files, copied into the repository (tests/data/README.md says which).
REAL_INDEX = Path(__file__).resolve().parent / "data" / "crates-io-index"


# What cargo resolves `a = "1"`, `Inflect = "0.1"` to in publish_small_tree's registry.
SMALL_TREE_DEPS = {"a": "1", "Inflect": "0.1"}
SMALL_TREE_RESOLVED = {"a": "1.1.0", "b": "0.2.1+build.5", "Inflect": "0.1.0", "z": "0.1.0", "opt": "0.3.0"}


def publish_small_tree(registry: FakeRegistry) -> None:
    """A small tree: a dependency chain, an uppercase name, +build metadata, an optional dependency
    behind a default feature, a dev-dependency that does not exist, and a newer yanked version."""
    registry.add_crate("z", "0.1.0")
    registry.add_crate("opt", "0.3.0")
    registry.add_crate("b", "0.2.0")
    registry.add_crate("b", "0.2.1+build.5")
    registry.add_crate(
        "Inflect", "0.1.0", deps=[Dep("z", "^0.1")], lib_rs="pub fn f() -> &'static str { z::hello() }\n"
    )
    registry.add_crate("a", "1.0.0", deps=[Dep("b", "^0.2")])
    registry.add_crate(
        "a",
        "1.1.0",
        deps=[Dep("b", "^0.2"), Dep("opt", "^0.3", optional=True), Dep("nonexistent-dev", "^9", kind="dev")],
        features={"default": ["extra"], "extra": ["dep:opt"]},
        lib_rs="pub fn f() -> (&'static str, &'static str) { (b::hello(), opt::hello()) }\n",
    )
    registry.add_crate("a", "1.2.0", deps=[Dep("b", "^0.2")], yanked=True)
