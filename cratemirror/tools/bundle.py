"""The bundle format shared by `export` and `import`, and its types: one uncompressed tar file.

    crates/<name>/<name>-<version>.crate    the verified tarballs (already gzip: no point compressing again)
    index/<prefix>/<name>                   the sparse-index files, byte for byte
    registries/<name>.tar                   an extra registry's own bundle, in this same format
    toolchains.tar                          rustup toolchain files (export --toolchain; toolchain_bundle.py)
    manifest.json                           written last: format, creation time, upstream dl config,
                                            every crate (name, version, sha256, size, fetched_at) and
                                            every index file (name, sha256 of the body, validators)

Member paths are derived from validated names on both sides; the importer never uses a path it read.
Writing: a tar renamed into place only once complete (`bundle_file`), the manifest's long lists spooled
(`Records`). Reading: the safe members' offsets in a throwaway SQLite file (`Members`), the manifest
parsed in one streaming pass with its crate list left to stream (`Manifest`), within bounds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, overload

import ijson
from ijson.common import ObjectBuilder

from cratemirror.config.schema import Config
from cratemirror.names import index_path
from cratemirror.tools.common import format_size

FORMAT = "cratemirror-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOOLCHAINS_MEMBER = "toolchains.tar"  # rustup toolchain files (tools/toolchain_bundle.py)
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # about 300,000 crate entries
STREAMED = ("crates", "index_files")  # the manifest's long lists: read an entry at a time
MAX_MANIFEST_DEPTH = 32  # a manifest nests 3 deep; the crate list is streamed only after this check


def crate_member(name: str, version: str) -> str:
    return f"crates/{name}/{name}-{version}.crate"


def index_member(name: str) -> str:
    return f"index/{index_path(name)}"


def registry_member(registry: str) -> str:
    return f"registries/{registry}.tar"


def manifest_document(
    created: str,
    created_by: str,
    upstream_config: dict[str, Any] | None,
    crates: list[dict[str, Any]],
    index_files: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": created,
        "created_by": created_by,
        "upstream_config": upstream_config,
        "crates": crates,
        "index_files": index_files,
    }


# ---- writing ----------------------------------------------------------------------------------------


class Records:
    """The manifest's entries of one kind, spooled to a temp file as JSON lines: memory stays flat."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.count += 1

    def lines(self) -> Iterator[str]:
        self.file.seek(0)
        for line in self.file:
            yield line.rstrip("\n")

    def close(self) -> None:
        self.file.close()


def add_bytes(tar: tarfile.TarFile, name: str, body: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(body))
    vars(tar)["members"].clear()  # tarfile keeps every header it wrote; nothing reads them


def write_manifest(out: IO[bytes], head: dict[str, Any], lists: dict[str, Records]) -> None:
    """The manifest document, its long lists streamed from their spools."""
    text = json.dumps({key: value for key, value in head.items() if key not in lists}, indent=1)
    out.write(text[: -len("\n}")].encode())
    for key, records in lists.items():
        out.write(f',\n "{key}": ['.encode())
        for number, line in enumerate(records.lines()):
            out.write(("," if number else "").encode() + b"\n  " + line.encode())
        out.write(b"\n ]")
    out.write(b"\n}")


@contextlib.contextmanager
def bundle_file(target: Path) -> Iterator[tarfile.TarFile]:
    """A tar written next to `target`, synced and renamed into place only if the block ends well."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(partial, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                yield tar
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


# ---- reading ----------------------------------------------------------------------------------------


class BundleError(Exception):
    """The file is not a bundle this version can read."""


@dataclass(frozen=True, slots=True)
class Caps:
    """The server's own caps on what enters the cache (upstream.max_index_size / max_crate_size): a
    bundle is another way in, held to the same sizes, checked against the tar header before a copy."""

    index: int
    crate: int

    @classmethod
    def of(cls, config: Config) -> Caps:
        return cls(config.upstream.max_index_size, config.upstream.max_crate_size)


def path_problem(name: str) -> str | None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        return "path outside the bundle (absolute, '..' or '\\'): nothing written"
    return None


@dataclass(frozen=True, slots=True)
class Member:
    """Where a regular member's bytes are: all that is kept of its header."""

    name: str
    offset: int
    size: int

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.offset_data, info.size, info.type = self.offset, self.size, tarfile.REGTYPE
        return info


class Members:
    """Where each regular member's bytes are, in a throwaway SQLite file rather than in memory: a
    bundle of 100,000 crates costs the importer no more memory than one of ten. `pop` hands a member
    out once; what nobody asked for is left over for the report."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cratemirror-import-")
        self.db = sqlite3.connect(Path(self._dir.name) / "members.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute(
            "CREATE TABLE members (name TEXT PRIMARY KEY, tar_name TEXT, offset INTEGER, size INTEGER,"
            " copies INTEGER NOT NULL DEFAULT 1, taken INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        self.db.execute("BEGIN")

    def add(self, name: str, member: tarfile.TarInfo) -> None:
        self.db.execute(
            "INSERT INTO members (name, tar_name, offset, size) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET copies = copies + 1",
            (name, member.name, member.offset_data, member.size),
        )

    def drop_duplicates(self) -> list[str]:
        """A name that appears twice is refused entirely: which copy is "the" member is ambiguous."""
        self.db.execute("COMMIT")
        rows = self.db.execute("SELECT name FROM members WHERE copies > 1 ORDER BY name").fetchall()
        self.db.execute("DELETE FROM members WHERE copies > 1")
        return [str(name) for (name,) in rows]

    @overload
    def pop(self, name: str) -> tarfile.TarInfo: ...
    @overload
    def pop(self, name: str, default: None) -> tarfile.TarInfo | None: ...

    def pop(self, name: str, default: object = KeyError) -> tarfile.TarInfo | None:
        """As dict.pop: the member (a header enough to read it), once; KeyError without a default."""
        row = self.db.execute(
            "SELECT tar_name, offset, size FROM members WHERE name = ? AND taken = 0", (name,)
        ).fetchone()
        if row is None:
            if default is KeyError:
                raise KeyError(name)
            return None
        self.db.execute("UPDATE members SET taken = 1 WHERE name = ?", (name,))
        return Member(str(row[0]), int(row[1]), int(row[2])).info()

    def __iter__(self) -> Iterator[str]:
        """The names nobody has taken yet (a snapshot: popping while iterating is fine)."""
        return iter(list(self.left_over()))

    def left_over(self) -> Iterator[str]:
        for (name,) in self.db.execute("SELECT name FROM members WHERE taken = 0 ORDER BY name"):
            yield str(name)

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()


def safe_members(tar: tarfile.TarFile, refused: list[str]) -> Members:
    """Regular members with plain relative names; everything else is refused (a line each into
    `refused`). One pass over the headers (tarfile's own list of them is emptied as it goes)."""
    members = Members()
    while (member := tar.next()) is not None:
        vars(tar)["members"].clear()  # tarfile keeps every header it read; memory stays flat without
        problem = path_problem(member.name)
        if problem is None and member.isdir():
            continue  # a bundle re-packed with `tar` may list directories; they carry nothing
        if problem is None and not member.isfile():
            problem = "not a regular file (a link or device): nothing written"
        if problem is not None:
            refused.append(f"{member.name!r}: {problem}")
            continue
        members.add(member.name.removeprefix("./"), member)
    for name in members.drop_duplicates():
        refused.append(f"{name!r}: appears more than once in the bundle")
    return members


def open_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    handle = tar.extractfile(member)
    assert handle is not None  # a regular file
    return handle


@dataclass
class Manifest:
    """The manifest without its crate list, which `crates()` streams (it may hold 100,000 entries)."""

    head: dict[str, Any]
    crate_count: int
    tar: tarfile.TarFile
    member: tarfile.TarInfo

    def crates(self) -> Iterator[object]:
        yield from ijson.items(open_member(self.tar, self.member), "crates.item", use_float=True)

    def index_files(self) -> Iterator[object]:
        yield from ijson.items(open_member(self.tar, self.member), "index_files.item", use_float=True)


def read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> Manifest:
    """One streaming pass: every top-level value but the crate list is built, the crates are counted;
    the whole document is parsed, so a second pass over the crates cannot fail halfway."""
    if member is None:
        raise BundleError(f"no {MANIFEST}: not a cratemirror bundle")
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} is implausibly large ({format_size(member.size)})")
    head: dict[str, Any] = {}
    kinds: dict[str, str] = {}  # top-level key -> the first event of its value (start_array: a list)
    crate_count = 0
    key = ""
    builder: ObjectBuilder | None = None
    depth = 0
    try:
        # basic_parse: no prefix strings, so a deeply nested document costs linear time.
        for event, value in ijson.basic_parse(open_member(tar, member), use_float=True):
            outer = depth
            if event in ("start_map", "start_array"):
                depth += 1
                if depth > MAX_MANIFEST_DEPTH:
                    raise RecursionError
            elif event in ("end_map", "end_array"):
                depth -= 1
            if outer == 0:
                if event != "start_map":
                    raise BundleError(f"{MANIFEST} does not describe a {FORMAT}")
                continue
            if outer == 1 and event == "map_key":
                key = str(value)
                builder = None if key in STREAMED else ObjectBuilder()
                continue
            if outer == 1:
                kinds.setdefault(key, event)
            elif key == "crates" and outer == 2 and event not in ("end_array", "end_map", "map_key"):
                crate_count += 1
            if builder is not None and depth >= 1:
                builder.event(event, value)
                if depth == 1:  # the value is complete
                    head[key] = builder.value
    except ijson.JSONError as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise BundleError(f"{MANIFEST} is nested too deeply to be a manifest") from None
    if head.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST} does not describe a {FORMAT}")
    if head.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {head.get('format_version')!r}; "
            f"this cratemirror reads version {FORMAT_VERSION}"
        )
    for name in ("crates", "index_files"):
        if kinds.get(name) != "start_array":
            raise BundleError(f"{MANIFEST}: {name!r} is not a list")
    return Manifest(head, crate_count, tar, member)
