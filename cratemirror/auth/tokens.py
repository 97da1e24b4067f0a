"""The client-token file (`auth.tokens_file`): names, sha256 hashes and dates, never a token itself.

Written only by `cratemirror token` (atomically: temp file, fsync, rename, under a lock file so two
commands never lose each other's change); read by every worker process, which re-reads it when its
identity (inode, size, mtime) changes, so an added or revoked token takes effect within seconds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import yaml

# Token names appear in log lines and on the command line: keep them to a plain, safe alphabet.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Bounds on what is read from the file: it is ours, but a stray huge file must not eat a worker.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_TOKENS = 10_000
# A token longer than this in a request is not one of ours (ours are ~47 characters).
MAX_TOKEN_CHARS = 512
TOKEN_PREFIX = "cmt_"
HEADER = "# Written by `cratemirror token`. Holds sha256 hashes of tokens, never the tokens themselves.\n"

Reason = Literal["missing", "unknown", "expired", "revoked"]
REASONS: tuple[Reason, ...] = ("missing", "unknown", "expired", "revoked")


class TokenFileError(Exception):
    """The tokens file is unreadable or malformed; str(e) is one line naming the file."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    name: str
    sha256: str
    created: dt.datetime
    expires: dt.datetime | None = None
    revoked: dt.datetime | None = None

    def state(self, now: dt.datetime) -> Literal["active", "expired", "revoked"]:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    """A fresh random token: 256 bits from the OS, URL-safe (cargo sends it verbatim in a header)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _stamp(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(source: str, where: str, value: object, nullable: bool) -> dt.datetime | None:
    if value is None and nullable:
        return None
    if isinstance(value, dt.datetime):  # YAML turns an unquoted timestamp into a datetime itself
        moment = value
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise TokenFileError(f"{source}: {where}: expected a UTC timestamp, got {value[:40]!r}") from None
    else:
        raise TokenFileError(f"{source}: {where}: expected a UTC timestamp, got {type(value).__name__}")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def parse_records(data: bytes, source: str) -> list[TokenRecord]:
    """The file's bytes into validated records; anything unexpected is a TokenFileError."""
    if len(data) > MAX_FILE_BYTES:
        raise TokenFileError(f"{source}: larger than {MAX_FILE_BYTES} bytes")
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise TokenFileError(f"{source}: not a valid tokens file (YAML)") from None
    if document is None:
        return []
    if not isinstance(document, dict) or not isinstance(document.get("tokens", []), list):
        raise TokenFileError(f"{source}: expected a mapping with a list under 'tokens'")
    entries = document.get("tokens") or []
    if len(entries) > MAX_TOKENS:
        raise TokenFileError(f"{source}: more than {MAX_TOKENS} tokens")
    records = []
    for position, entry in enumerate(entries):
        where = f"tokens[{position}]"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{source}: {where}: expected a mapping")
        name, digest = entry.get("name"), entry.get("sha256")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise TokenFileError(f"{source}: {where}.name: expected a name like ci-runner")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise TokenFileError(f"{source}: {where}.sha256: expected 64 lowercase hex digits")
        created = _parse_time(source, f"{where}.created", entry.get("created"), nullable=False)
        assert created is not None
        records.append(
            TokenRecord(
                name=name,
                sha256=digest,
                created=created,
                expires=_parse_time(source, f"{where}.expires", entry.get("expires"), nullable=True),
                revoked=_parse_time(source, f"{where}.revoked", entry.get("revoked"), nullable=True),
            )
        )
    return records


def read_records(path: Path) -> list[TokenRecord]:
    """The records in `path`; a missing file is an empty list."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_records(data, str(path))


def write_records(path: Path, records: list[TokenRecord]) -> None:
    """Replace the file atomically (readable by its owner only: the hashes are not secrets, but the
    names and dates are nobody else's business)."""
    document = {
        "tokens": [
            {
                "name": record.name,
                "sha256": record.sha256,
                "created": _stamp(record.created),
                "expires": _stamp(record.expires),
                "revoked": _stamp(record.revoked),
            }
            for record in records
        ]
    }
    text = HEADER + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of `token add` / `token revoke` on one file."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_token(path: Path, name: str, lifetime: float | None) -> tuple[str, TokenRecord]:
    """Create a token called `name`; returns (the token, its record). Only the hash is stored."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"expected a token name of letters, digits, '.', '_', '-' (at most 64), got {name!r}"
        )
    with locked(path):
        records = read_records(path)
        now = utcnow()
        if any(record.name == name and record.state(now) == "active" for record in records):
            raise ValueError(f"a token named {name!r} exists already; revoke it first")
        token = new_token()
        expires = None if lifetime is None else now + dt.timedelta(seconds=lifetime)
        record = TokenRecord(name=name, sha256=hash_token(token), created=now, expires=expires)
        write_records(path, [*records, record])
    return token, record


def revoke_token(path: Path, name: str) -> int:
    """Mark every unrevoked token called `name` revoked; returns how many were."""
    with locked(path):
        records = read_records(path)
        now = utcnow()
        changed = [
            replace(record, revoked=now) if record.name == name and record.revoked is None else record
            for record in records
        ]
        count = sum(1 for old, new in zip(records, changed, strict=True) if old is not new)
        if count:
            write_records(path, changed)
    return count


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking one request's token: the token's name, or why it was refused."""

    name: str | None
    reason: Reason | None


class TokenChecker:
    """What a worker asks on every request. Looks at the file's identity at most every `recheck`
    seconds (one stat) and re-reads it only when that changed; a broken file keeps the last good set."""

    def __init__(
        self, path: Path, recheck: float = 1.0, on_problem: Callable[[str], None] | None = None
    ) -> None:
        """`on_problem`: told once per broken version of the file (to log and count it)."""
        self.path = path
        self.recheck = recheck
        self.on_problem = on_problem
        self.problem: str | None = None
        self._records: list[TokenRecord] = []
        self._identity: tuple[int, int, int, int] | None = None
        self._checked_at = -float("inf")
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.recheck:
            return
        self._checked_at = now
        try:
            info = os.stat(self.path)
            identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        except FileNotFoundError:
            identity = (0, 0, 0, 0)
        except OSError as exc:
            self._broken(f"{self.path}: cannot read: {exc.strerror or exc}")
            return
        if identity == self._identity:
            return
        try:
            self._records = read_records(self.path)
            self.problem = None
        except TokenFileError as exc:
            self._broken(str(exc))  # keep the last good set: a half-edited file must not lock everyone out
        self._identity = identity

    def _broken(self, problem: str) -> None:
        if problem != self.problem and self.on_problem is not None:
            self.on_problem(problem)
        self.problem = problem

    def check(self, token: str | None) -> Verdict:
        if not token:
            return Verdict(None, "missing")
        if len(token) > MAX_TOKEN_CHARS:
            return Verdict(None, "unknown")
        self.refresh()
        digest = hash_token(token)
        found: TokenRecord | None = None
        # Every record is compared, in constant time each, so the answer's timing says nothing.
        for record in self._records:
            if hmac.compare_digest(record.sha256, digest):
                found = record
        if found is None:
            return Verdict(None, "unknown")
        state = found.state(utcnow())
        if state != "active":
            return Verdict(found.name, state)
        return Verdict(found.name, None)
