"""The index file as the policy shows it: blocked versions marked `"yanked":true`.

Only those lines change, and only in that one value; every other byte is the upstream's. A line whose
JSON the minimal edit cannot handle is re-serialised (compact, as crates.io writes it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

_YANKED_FALSE = re.compile(rb'"yanked"\s*:\s*false')


def versions(body: bytes) -> Iterator[str]:
    """The `vers` of every well-formed line."""
    for line in body.split(b"\n"):
        record = _record(line)
        if record is not None:
            yield str(record["vers"])


def _record(line: bytes) -> dict[str, object] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # deep nesting raises RecursionError
        return None
    if not isinstance(record, dict) or not isinstance(record.get("vers"), str):
        return None
    return record


def mark_yanked(body: bytes, blocked: set[str]) -> bytes:
    """`body` with the lines of `blocked` versions saying `"yanked":true`."""
    if not blocked:
        return body
    lines = body.split(b"\n")
    for number, line in enumerate(lines):
        record = _record(line)
        if record is None or record["vers"] not in blocked or record.get("yanked") is True:
            continue
        edited = _YANKED_FALSE.sub(b'"yanked":true', line, count=1)
        if _record(edited) != {**record, "yanked": True}:
            edited = json.dumps(
                {**record, "yanked": True}, separators=(",", ":"), ensure_ascii=False
            ).encode()
        lines[number] = edited
    return b"\n".join(lines)
