"""What a replica reads from the shared bucket is authenticated with the fleet secret
(storage.s3.integrity_key), which is never stored in the bucket: anyone who can write the bucket but
does not hold the secret cannot make a replica take an object it did not write.

Every object a replica writes carries, in its metadata, an HMAC-SHA256 over

    "cratemirror/storage-object" v1, the object's kind (index | crate | toolchain), its full key
    (prefix included, so an object cannot be moved to another name or registry), the SHA-256 of its
    body and each of its validators (a fixed list per kind, in a fixed order)

every field length-prefixed, so no two different records encode to the same bytes. A crate's body is
authenticated through its SHA-256: the reader hashes the bytes as they arrive and drops them unless
they match the authenticated digest. An object without a MAC (written by an older version) or with one
that does not verify is treated as absent.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Literal

__all__ = ["CRATE_FIELDS", "INDEX_FIELDS", "KEY_ID_FIELD", "MAC_FIELD", "ObjectKind", "Sealer"]

ObjectKind = Literal["index", "crate", "toolchain", "audit", "first-seen"]

DOMAIN = b"cratemirror/storage-object"
VERSION = "v1"
MAC_FIELD = "mac"  # object metadata key holding "v1:<64 hex>"
KEY_ID_FIELD = "mac-key"  # which secret made it (a fingerprint, not the secret): says "rotated" in logs
# The validators each kind records in its metadata, all of them under the MAC.
INDEX_FIELDS = ("etag", "last-modified", "checked-at", "upstream-etag", "upstream-last-modified")
CRATE_FIELDS = ("sha256",)
# A toolchain file (component, rustup-init) is authenticated like a crate: through its sha256.
_FIELDS: dict[ObjectKind, Sequence[str]] = {
    "index": INDEX_FIELDS,
    "crate": CRATE_FIELDS,
    "toolchain": CRATE_FIELDS,
    # An audit object (cache/audit.py) and a crate's first-seen times (policy/cooldown.py) have no
    # validators: their key and body are what is authenticated.
    "audit": (),
    "first-seen": (),
}
MAX_FIELD = 4096  # S3 user metadata is 2 KiB in all: anything longer is not ours


def _framed(parts: Sequence[bytes]) -> bytes:
    return b"".join(len(part).to_bytes(8, "big") + part for part in parts)


class Sealer:
    """Makes and checks the MACs of one fleet secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("an empty integrity key")
        self._secret = secret
        self.key_id = hmac.new(secret, DOMAIN + b" key id", hashlib.sha256).hexdigest()[:16]

    def _mac(self, kind: ObjectKind, key: str, body_sha256: str, meta: Mapping[str, str]) -> str:
        parts = [DOMAIN, VERSION.encode(), kind.encode(), key.encode(), body_sha256.encode()]
        for name in _FIELDS[kind]:
            parts += [name.encode(), meta.get(name, "").encode()]
        return hmac.new(self._secret, _framed(parts), hashlib.sha256).hexdigest()

    def seal(self, kind: ObjectKind, key: str, body_sha256: str, meta: Mapping[str, str]) -> dict[str, str]:
        """`meta` plus the MAC fields: the metadata to store the object with."""
        mac = self._mac(kind, key, body_sha256, meta)
        return {**meta, MAC_FIELD: f"{VERSION}:{mac}", KEY_ID_FIELD: self.key_id}

    def problem(self, kind: ObjectKind, key: str, body_sha256: str, meta: Mapping[str, str]) -> str | None:
        """None if `meta` (as read back) authenticates this object, else why not, in a few words."""
        stored = meta.get(MAC_FIELD)
        if not isinstance(stored, str) or not stored:
            return "no MAC (written by an older version, or not by a replica)"
        if any(len(meta.get(name, "")) > MAX_FIELD for name in _FIELDS[kind]):
            return "a validator longer than any replica writes"
        version, _, mac = stored.partition(":")
        expected = self._mac(kind, key, body_sha256, meta)
        if version != VERSION or not hmac.compare_digest(mac.encode(), expected.encode()):
            if meta.get(KEY_ID_FIELD) not in (None, self.key_id):
                return "a MAC made with another integrity_key (rotated?)"
            return "a MAC that does not match (altered since a replica wrote it)"
        return None
