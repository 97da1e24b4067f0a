"""PolicyService: the policy as one worker process applies it.

It holds the rules, the advisory database (re-read when its files change, checked every POLL_SECONDS by
a background task, so every worker and replica picks up an edit within seconds and without a restart),
the licences learned from crates' Cargo.toml (a small shared side table in the store, one entry per
crate: version -> licence), the index view cache, and the audit trail: one log line, one count in
cratemirror_policy_decisions_total and one entry in the shared list of recent decisions per decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, BinaryIO

from cachetools import LRUCache, TTLCache

from cratemirror.cache.index import body_etag
from cratemirror.config.schema import Config
from cratemirror.fleet.storage import SharedStorage
from cratemirror.fleet.storage.disk import IndexEntry, Store
from cratemirror.metrics import Metrics
from cratemirror.policy import advisories
from cratemirror.policy.cooldown import COOLDOWN_RULE, Cooldown, Release
from cratemirror.policy.exposure import MAX_WARNED, WARNED_KEY, exposure, served_here, served_in_fleet
from cratemirror.policy.licenses import read_license
from cratemirror.policy.rules import BLOCK, WARN, Decision, Rules, Verdict, check_policy
from cratemirror.policy.view import mark_yanked, versions
from cratemirror.versions import RequirementError, parse_version

log = logging.getLogger("cratemirror.policy")

POLL_SECONDS = 2.0
LICENSE_MEMO_SECONDS = 30.0  # another worker's newly learned licence shows in this one's index view by then
LICENSE_KEY = "license:"
RECENT_KEY = "policy-recent"
RECENT_DECISIONS = 20
VIEW_BYTES = 16 * 1024 * 1024
VIEW_IN_THREAD = 256 * 1024


class PolicyService:
    def __init__(
        self,
        rules: Rules,
        advisory_db: Path | None,
        store: Store,
        metrics: Metrics,
        *,
        cache_dir: Path | None = None,
        audit_retention: float = 0.0,
        shared: SharedStorage | None = None,
    ) -> None:
        self.rules = rules
        self.root = advisory_db
        self.store = store
        self.metrics = metrics
        self.db = advisories.AdvisoryDb(advisory_db)
        self._licenses: TTLCache[str, dict[str, str]] = TTLCache(4096, LICENSE_MEMO_SECONDS)
        # A view is good until its key changes or, with the cooldown, until a held version passes.
        self._views: LRUCache[tuple[Any, ...], tuple[IndexEntry, float]] = LRUCache(
            VIEW_BYTES, getsizeof=_view_size
        )
        # The fleet's bucket (storage.backend s3): first-seen times and the other replicas' audit records.
        self.shared = shared
        self.cooldown = Cooldown(store, rules.min_release_age, rules.cooldown_exempts_fixes, shared)
        self._watcher: asyncio.Task[None] | None = None
        self._exposure: asyncio.Task[None] | None = None
        self._loaded = False
        # Counts what can change this worker's index view (a reloaded database, a learned licence):
        # copies made from a view are good while it is unchanged.
        self.changes = 0
        # Advisory exposure (from the audit trail): advisory id -> clients served an affected version.
        self.cache_dir = cache_dir
        self.audit_retention = audit_retention if cache_dir is not None else 0.0
        self.exposed: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.rules.mode != "off"

    # --- the advisory database -----------------------------------------------------------------

    async def start(self) -> None:
        # The database is read for the policy, and for the exposure gauge even with mode: off.
        if not (self.enabled or self.audit_retention > 0) or self.root is None:
            return
        if not self.root.is_dir():
            log.warning("advisory database %s not found: no advisory applies until it appears", self.root)
        try:
            await self.reload_if_changed()
        except Exception:  # start-up never depends on the checkout: the watcher tries again
            log.exception("could not read the advisory database %s; serving without it for now", self.root)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        for task in (self._watcher, self._exposure):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.reload_if_changed()
            except Exception:  # a broken checkout must not end the watching; the old copy stays
                log.exception("could not re-read the advisory database")

    async def reload_if_changed(self) -> bool:
        if self.root is None:
            return False
        current = await asyncio.to_thread(advisories.signature, self.root)
        if self._loaded and current == self.db.signature:
            return False
        db = await asyncio.to_thread(advisories.load, self.root)
        self._loaded = True
        self.db = db
        if db.failed:
            self.metrics.advisory_errors.inc(db.failed)
        self._views.clear()
        self.changes += 1
        log.info(
            "advisory database %s: %d advisories, newest %s%s",
            self.root, db.count, db.newest_date or "-",
            f"; {len(db.errors)} files left out, e.g. {db.errors[0]}" if db.errors else "",
        )  # fmt: skip
        if self.cache_dir is not None and self.audit_retention > 0:
            # In the background: a fleet's audit objects take a while to read, and start-up and the
            # watcher must not wait on the bucket. A newer database replaces a pass still running.
            if self._exposure is not None:
                self._exposure.cancel()
            self._exposure = asyncio.get_running_loop().create_task(self._update_exposure_logged())
        return True

    async def _update_exposure_logged(self) -> None:
        try:
            await self.update_exposure()
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not read the audit trail for advisory exposure: %s", exc)
        except Exception:  # a task: nobody else would see it
            log.exception("could not compute the advisory exposure")

    async def update_exposure(self) -> None:
        """Who was served what each advisory affects (this replica and, in a fleet, the others): the
        gauge, and one warning per newly exposed advisory for the whole mirror (the advisories already
        warned about are kept in the store)."""
        if self.cache_dir is None or self.audit_retention <= 0:
            return
        db = self.db
        since = time.time() - self.audit_retention
        served = await asyncio.to_thread(served_here, self.cache_dir, since) if db.count else set()
        if self.shared is not None and db.count:
            try:
                served |= await served_in_fleet(self.shared, self.cache_dir, since, db)
            except Exception as exc:  # the bucket failing: this replica's own clients still count
                log.warning(
                    "advisory exposure: the other replicas' audit records could not be read from the "
                    "bucket (%s); counting this replica's clients only", exc,
                )  # fmt: skip
        found = await asyncio.to_thread(exposure, db, self.rules, served)
        counts = {advisory_id: len(clients) for advisory_id, clients in found.items()}
        for gone in set(self.exposed) - set(counts):
            self.metrics.advisory_exposure.labels(gone).set(0)
        for advisory_id, count in counts.items():
            self.metrics.advisory_exposure.labels(advisory_id).set(count)
        self.exposed = counts
        if not counts:
            return
        async with self.store.lock(WARNED_KEY):
            stored = self.store.get_json(WARNED_KEY)
            warned = {item for item in stored if isinstance(item, str)} if isinstance(stored, list) else set()
            new = sorted(set(counts) - warned)
            if not new:
                return
            await asyncio.to_thread(self.store.put_json, WARNED_KEY, sorted(warned | set(new))[-MAX_WARNED:])
        for advisory_id in new:
            clients = sorted(found[advisory_id])
            shown = ", ".join(clients[:10]) + (f" and {len(clients) - 10} more" if len(clients) > 10 else "")
            log.warning(
                "advisory %s affects versions this mirror already served to %d client%s (%s); "
                "see `cratemirror audit impact %s`",
                advisory_id, len(clients), "" if len(clients) == 1 else "s", shown, advisory_id,
                extra={"fields": {"advisory": advisory_id, "clients": len(clients)}},
            )  # fmt: skip

    # --- licences learned from the crates ------------------------------------------------------

    def known_licenses(self, lower: str) -> dict[str, str]:
        """version -> licence expression ("" when the Cargo.toml declares none) of this crate's
        versions the mirror has read."""
        table = self._licenses.get(lower)
        if table is None:
            stored = self.store.get_json(LICENSE_KEY + lower)
            table = {
                str(version): str(text)
                for version, text in (stored.items() if isinstance(stored, dict) else ())
                if isinstance(version, str) and isinstance(text, str)
            }
            self._licenses[lower] = table
        return table

    def needs_license(self, name: str, version: str) -> bool:
        """Whether the licence rule must see this version's Cargo.toml before deciding."""
        return self.enabled and bool(self.rules.licenses) and version not in self.known_licenses(name.lower())

    async def learn_license(self, name: str, version: str, crate: BinaryIO) -> None:
        """Read the licence from the stored crate (already open: eviction cannot pull it away) once,
        and remember it for every worker."""
        text = await asyncio.to_thread(
            read_license, io.BufferedReader(_Positional(crate.fileno())), name, version
        )
        lower = name.lower()
        async with self.store.lock(LICENSE_KEY + lower):
            self._licenses.pop(lower, None)
            table = dict(self.known_licenses(lower))
            table[version] = text or ""
            try:
                await asyncio.to_thread(self.store.put_json, LICENSE_KEY + lower, table)
            except (OSError, sqlite3.Error) as exc:
                log.warning("could not store the licence of %s %s: %s", name, version, exc)
            self._licenses[lower] = table
            self.changes += 1

    # --- verdicts ------------------------------------------------------------------------------

    def verdict(self, name: str, version: str) -> Verdict:
        if not self.enabled:
            return Verdict()
        try:
            parsed = parse_version(version)
        except RequirementError:  # fail closed: what cannot be judged is not passed unseen
            return self.rules.unjudgeable(self.db, name, version)
        known = self.known_licenses(name.lower()) if self.rules.licenses else {}
        license_text = known.get(version)
        verdict = self.rules.verdict(self.db, name, parsed, license_text or None, license_text is not None)
        if verdict.block is None and self.cooldown.enabled and not self.rules.allowed(name.lower(), parsed):
            hold = self.cooldown.hold(name.lower(), version)
            if hold is not None:
                reason = self.cooldown.reason(name, version, hold)
                return Verdict(Decision(COOLDOWN_RULE, BLOCK, reason), verdict.warnings)
        return verdict

    def blocks(self, name: str, version: str) -> bool:
        return self.verdict(name, version).block is not None

    async def judge(self, name: str, version: str, client: str) -> Decision | None:
        return await self.record(self.verdict(name, version), name, version, client)

    async def record(self, verdict: Verdict, name: str, version: str, client: str) -> Decision | None:
        """Log and count a download's decisions; the block to enforce, if the mode enforces one."""
        for warning in verdict.warnings:
            await self._audit(warning, WARN, name, version, client)
        block = verdict.block
        if block is None:
            return None
        # In report mode a would-be block is a warning: logged and counted, nothing refused.
        await self._audit(block, BLOCK if self.rules.enforcing else WARN, name, version, client)
        return block if self.rules.enforcing else None

    async def _audit(self, decision: Decision, action: str, name: str, version: str, client: str) -> None:
        self.metrics.policy_decisions.labels(action, decision.rule).inc()
        fields = {
            "policy_action": action, "rule": decision.rule, "crate": name, "version": version,
            "client": client, "reason": decision.reason,
        }  # fmt: skip
        log.log(
            logging.WARNING if action == BLOCK else logging.INFO,
            "policy %s %s: crate=%s version=%s client=%s mode=%s: %s",
            action, decision.rule, name, version, client, self.rules.mode, decision.reason,
            extra={"fields": fields},
        )  # fmt: skip
        entry = {**fields, "at": time.time()}
        try:
            async with self.store.lock(RECENT_KEY):
                await asyncio.to_thread(self._remember_recent, entry)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not record a policy decision for the status page: %s", exc)

    def _remember_recent(self, entry: dict[str, Any]) -> None:
        recent = self.recent()
        self.store.put_json(RECENT_KEY, [*recent[-(RECENT_DECISIONS - 1) :], entry])

    def recent(self) -> list[dict[str, Any]]:
        """The newest decisions of every worker, oldest first."""
        stored = self.store.get_json(RECENT_KEY)
        return [item for item in stored if isinstance(item, dict)] if isinstance(stored, list) else []

    # --- the index view ------------------------------------------------------------------------

    async def view(self, lower: str, entry: IndexEntry) -> IndexEntry:
        """The entry as clients see it: with `enforce`, blocked versions are yanked (and the ETag is
        the view's own); anything else is the stored entry itself."""
        cooling = self.enabled and self.cooldown.enabled  # learns release times in report mode too
        if not (self.rules.enforcing or cooling) or entry.status != 200:
            return entry
        known = self.known_licenses(lower) if self.rules.licenses else {}
        if not (cooling or known or self.db.for_crate(lower) or self.rules.names_rules_for(lower)):
            return entry
        key = (lower, entry.etag, self.db.signature, tuple(sorted(known.items())))
        cached = self._views.get(key)
        if cached is None or cached[1] <= time.time():
            # The cooldown learns off the loop (and, in a fleet, merges with the bucket's times).
            learned = await self.cooldown.learn(lower, entry, self.db) if cooling else None
            releases = learned.releases if learned is not None else {}
            if len(entry.body) > VIEW_IN_THREAD:  # parsing every line of a big file would stall the loop
                cached = await asyncio.to_thread(self._make_view, lower, entry, known, releases)
            else:
                cached = self._make_view(lower, entry, known, releases)
            if learned is not None and learned.retry_at < cached[1]:
                cached = (cached[0], learned.retry_at)  # the fleet was not reached: learn again soon
            with contextlib.suppress(ValueError):
                self._views[key] = cached
        return cached[0]

    def _make_view(
        self, lower: str, entry: IndexEntry, known: dict[str, str], releases: dict[str, Release]
    ) -> tuple[IndexEntry, float]:
        """The view and until when it holds (when the next held-back version passes its cooldown)."""
        now = time.time()
        until = math.inf
        if not self.rules.enforcing:
            return entry, until
        blocked = set()
        for version in versions(entry.body):
            license_text = known.get(version)
            try:
                parsed = parse_version(version)
            except RequirementError:
                verdict = self.rules.unjudgeable(self.db, lower, version)
            else:
                verdict = self.rules.verdict(
                    self.db, lower, parsed, license_text or None, license_text is not None
                )
            if verdict.block is not None:
                blocked.add(version)
                continue
            release = releases.get(version)
            if release is None or release[1] or self.rules.allowed(lower, parsed):
                continue
            passes = release[0] + self.cooldown.min_age
            if now < passes:
                blocked.add(version)
                until = min(until, passes)
        body = mark_yanked(entry.body, blocked)
        if body == entry.body:
            return entry, until
        return dataclasses.replace(entry, body=body, etag=body_etag(body)), until


class _Positional(io.RawIOBase):
    """Reads a descriptor with pread from its own position, leaving the descriptor's offset (which the
    response will use) alone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self.fd, len(buffer), self.position)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _view_size(view: tuple[IndexEntry, float]) -> int:
    return len(view[0].body) + 256


def create_policy(
    config: Config, store: Store, metrics: Metrics, shared: SharedStorage | None = None
) -> PolicyService:
    """`shared`: crates.io's part of the fleet's bucket (None with storage.backend local)."""
    return PolicyService(
        check_policy(config), config.policy.advisory_db, store, metrics,
        cache_dir=config.cache.dir, audit_retention=config.audit.retention, shared=shared,
    )  # fmt: skip
