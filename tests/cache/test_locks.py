"""The per-key fill locks of a cache dir: exclusive per key across descriptors, coroutines and
processes, free for other keys, and no file per key (creating files is what made cold fills slow)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from cratemirror.fleet.storage.locks import KEYS_LOCK, KeyLocks

HOLD_IN_CHILD = """
import sys, time
from pathlib import Path
from cratemirror.fleet.storage.locks import KeyLocks
with KeyLocks(Path(sys.argv[1])).try_lock(sys.argv[2]) as held:
    print("held" if held else "busy", flush=True)
    sys.stdin.readline()  # until the test says so
"""


def test_one_key_excludes_another_holder_and_other_keys_are_free(tmp_path: Path) -> None:
    first, second = KeyLocks(tmp_path), KeyLocks(tmp_path)
    assert first.ranges, "this platform has F_OFD_SETLK (Linux): the single-file locks are in use"
    with first.try_lock("crate:serde/1.0.0") as held:
        assert held
        with second.try_lock("crate:serde/1.0.0") as again:
            assert not again
        with first.try_lock("crate:serde/1.0.0") as same_object_again:
            assert not same_object_again  # a lock belongs to its descriptor, not to the process
        with second.try_lock("crate:serde/1.0.1") as other:
            assert other
    with second.try_lock("crate:serde/1.0.0") as after:
        assert after


def test_another_process_holding_the_key_is_seen(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_CHILD, str(tmp_path), "index:serde"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with KeyLocks(tmp_path).try_lock("index:serde") as held:
            assert not held
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    with KeyLocks(tmp_path).try_lock("index:serde") as held:
        assert held  # the child's exit released it


async def test_a_second_fill_of_the_key_waits_for_the_first(tmp_path: Path) -> None:
    locks = KeyLocks(tmp_path)
    order: list[str] = []
    first_holds, release_first = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        async with locks.lock("crate:serde/1.0.0"):
            order.append("first in")
            first_holds.set()
            await release_first.wait()
            order.append("first out")

    async def second() -> None:
        await first_holds.wait()
        async with locks.lock("crate:serde/1.0.0"):
            order.append("second in")

    async def other_key() -> None:
        await first_holds.wait()
        async with locks.lock("crate:tokio/1.0.0"):
            order.append("other key in")
        release_first.set()  # only now may the first finish: the other key did not wait for it

    await asyncio.wait_for(asyncio.gather(first(), second(), other_key()), timeout=30)
    assert order == ["first in", "other key in", "first out", "second in"]


async def test_locking_many_keys_creates_one_file(tmp_path: Path) -> None:
    locks = KeyLocks(tmp_path)
    for i in range(200):
        async with locks.lock(f"crate:crate{i}/1.0.0"):
            pass
    assert os.listdir(tmp_path) == [KEYS_LOCK]
