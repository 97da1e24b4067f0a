"""A fleet's first-seen objects (policy/cooldown.py) are input when read back, even authenticated: only
valid versions with finite times that are not in the future are taken, and no more than a replica
writes."""

from __future__ import annotations

import json
import time

from cratemirror.policy.cooldown import (
    FIRST_SEEN_BYTES,
    MAX_VERSIONS,
    decode_first_seen,
    encode_first_seen,
)


def body(seen: object, version: object = 1) -> bytes:
    return json.dumps({"v": version, "seen": seen}).encode()


def test_what_a_replica_writes_reads_back_exactly() -> None:
    times = {"1.0.0": 0.0, "1.1.0-rc.1+build.5": 1796700021.1689868}
    assert decode_first_seen(encode_first_seen(times), time.time()) == times


def test_only_valid_entries_are_taken() -> None:
    now = time.time()
    seen = {
        "1.0.0": 10, "1.1.0": now, "1.2.0": now + 10,  # taken (a little clock skew is tolerated)
        "1.3.0": now + 86400, "1.4.0": -1, "1.5.0": True, "1.6.0": "0", "1.7.0": None, "1.8.0": [0],
        "../../etc": 0, "1.0": 0, "v1.0.0": 0, "1." + "0" * 200 + ".0": 0,
    }  # fmt: skip
    assert decode_first_seen(body(seen), now) == {"1.0.0": 10.0, "1.1.0": now, "1.2.0": now + 10}
    assert decode_first_seen(b'{"v": 1, "seen": {"1.0.0": NaN, "1.1.0": Infinity}}', now) == {}


def test_anything_else_is_no_times_at_all() -> None:
    now = time.time()
    for bad in (
        b"", b"not json", b"[" * 100_000, b"[]", b'{"seen": {"1.0.0": 0}}', body({"1.0.0": 0}, 2),
        body([["1.0.0", 0]]), b" " * (FIRST_SEEN_BYTES + 1) + body({"1.0.0": 0}),
    ):  # fmt: skip
        assert decode_first_seen(bad, now) == {}, bad[:40]


def test_no_more_versions_than_a_replica_writes() -> None:
    many = {f"1.0.{n}": 0.0 for n in range(MAX_VERSIONS + 10)}
    assert len(json.loads(encode_first_seen(many))["seen"]) == MAX_VERSIONS
    assert len(decode_first_seen(body(many), time.time())) == MAX_VERSIONS
    longest = {f"1.0.{n}-{'x' * 130}": time.time() for n in range(MAX_VERSIONS)}
    assert len(encode_first_seen(longest)) <= FIRST_SEEN_BYTES
