"""Licences: a crate's SPDX expression read from the Cargo.toml in its .crate, and whether an allowlist
satisfies it.

The expression is parsed by license-expression with the SPDX key index, so `mit` and `MIT`, and the
deprecated `GPL-3.0` and `GPL-3.0-only`, are the same licence. An expression passes when some choice it
offers uses allowed licences only (`MIT OR GPL-3.0` under MIT/Apache-2.0), and fails when every choice
needs another one (`GPL-3.0-only`, `MIT AND GPL-3.0-only`). cargo's deprecated `/` separator means OR.
"""

from __future__ import annotations

import functools
import tarfile
import tomllib
import zlib
from collections.abc import Iterable
from typing import IO, Any

from license_expression import ExpressionError, Licensing, get_spdx_licensing

MAX_LICENSE_LENGTH = 256
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 64 * 1024 * 1024  # read through at most this much of a tarball to find Cargo.toml


@functools.cache
def _licensing() -> Licensing:
    return get_spdx_licensing()


def _parse(expression: str) -> Any:
    # cargo once documented "MIT/Apache-2.0"; it means what "MIT OR Apache-2.0" means.
    return _licensing().parse(expression.replace("/", " OR "), validate=False, simple=False)


def _key(symbol: Any) -> str:
    # "Apache-2.0 WITH LLVM-exception" only adds permissions to Apache-2.0: it is as allowed as that.
    inner = getattr(symbol, "license_symbol", symbol)
    return str(inner.key).lower()


class Allowlist:
    """The allowed SPDX ids of `policy.licenses`, normalised once."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = tuple(ids)
        self._keys: set[str] = set()
        for text in self.ids:
            for symbol in _licensing().license_symbols(_parse(text), decompose=True):
                self._keys.add(_key(symbol))

    def __bool__(self) -> bool:
        return bool(self.ids)

    def refusal(self, expression: str | None) -> str | None:
        """None when `expression` is satisfiable with allowed licences only, else why not."""
        if not expression:
            return "its Cargo.toml declares no SPDX licence"
        licensing = _licensing()
        try:
            parsed = _parse(expression)
        except ExpressionError:
            return f"its licence {expression!r} is not an SPDX expression"
        if parsed is None:
            return "its Cargo.toml declares no SPDX licence"
        symbols = licensing.license_symbols(parsed, decompose=False, unique=True)
        values = {
            symbol: licensing.TRUE if _key(symbol) in self._keys else licensing.FALSE for symbol in symbols
        }
        if parsed.subs(values, simplify=True) == licensing.TRUE:
            return None
        return f"its licence {expression!r} is not satisfied by the allowed licences ({', '.join(self.ids)})"


def read_license(crate: IO[bytes], name: str, version: str) -> str | None:
    """`package.license` from `<name>-<version>/Cargo.toml` inside a .crate (gzip'd tar); None when the
    crate has none or the tarball, the member or its TOML is bad, oversized or absent."""
    wanted = f"{name}-{version}/Cargo.toml".lower()
    unpacked = 0
    try:
        with tarfile.open(fileobj=crate, mode="r|gz") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_MEMBERS:
                    return None
                unpacked += member.size
                if member.name.lower() != wanted:
                    if unpacked > MAX_UNPACKED_BYTES:
                        return None
                    continue
                if not member.isfile() or member.size > MAX_MANIFEST_BYTES:
                    return None
                handle = tar.extractfile(member)
                if handle is None:
                    return None
                return _license_of(handle.read(MAX_MANIFEST_BYTES + 1))
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError):
        return None
    return None


def _license_of(manifest: bytes) -> str | None:
    try:
        document = tomllib.loads(manifest.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    package = document.get("package")
    license_text = package.get("license") if isinstance(package, dict) else None
    if not isinstance(license_text, str) or not license_text.strip():
        return None
    return license_text.strip()[:MAX_LICENSE_LENGTH]
