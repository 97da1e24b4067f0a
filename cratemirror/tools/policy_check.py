"""`cratemirror policy check LOCKFILE...`: what the policy would block in these lockfiles, and why.

The same rules and the same verdict function as the server: advisories and deny/allow entries are
decided from name and version alone; a licence from the cache dir's licence table, or read now from the
cached .crate (a crate cached before the licence rule was set), otherwise it is listed as unknown.
Without any policy it says so in one line; an advisory_db that does not exist is exit 2. The mode does
not matter here: the check says what `enforce` would do. Exit 1 if anything would be blocked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import tempfile
from pathlib import Path

from cratemirror.config.paths import missing_paths
from cratemirror.config.schema import ConfigError
from cratemirror.fleet.storage.disk import Store
from cratemirror.metrics import Metrics
from cratemirror.policy import advisories
from cratemirror.policy.rules import check_policy
from cratemirror.policy.service import PolicyService
from cratemirror.tools.common import EXIT_FAILURE, EXIT_OK, plural, tool_config
from cratemirror.tools.lockfile import accepted_sources, read_lockfiles


def run_check(args: argparse.Namespace) -> int:
    config = tool_config(args)
    rules = check_policy(config)
    missing = [line for line in missing_paths(config) if ": policy." in line]
    if missing:  # an advisory_db that is not there would check nothing, silently
        raise ConfigError("\n".join(missing))
    policy = config.policy
    if policy.advisory_db is None and not policy.licenses and not policy.deny:
        print(
            f"policy check: no policy is configured in {config.source} (policy.advisory_db, "
            "policy.licenses and policy.deny are all empty): nothing to check"
        )
        return EXIT_OK
    locked = read_lockfiles(args.lockfiles, accepted_sources([config.upstream.index_url]))
    root = config.policy.advisory_db
    db = advisories.load(root)
    if root is not None and not db.count:
        print(f"policy check: no advisories read from {root}")
    for problem in db.errors:
        print(f"policy check: advisory left out: {problem}")
    with contextlib.ExitStack() as stack:
        if (config.cache.dir / "meta").is_dir():
            store = Store(config.cache.dir)  # only read: the licences the mirror has learned
        else:
            store = Store(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cratemirror-check-"))))
        stack.callback(store.close)
        # The mode is the server's business; the check reports what enforcing would do.
        service = PolicyService(rules, root, store, Metrics())
        service.rules = dataclasses.replace(rules, mode="enforce")
        service.db = db
        # Crates cached before the licence rule was set: read their licence now, as the server would
        # on their next download (and remembered for it).
        cached = [
            (crate.name, crate.version, path)
            for crate in locked.crates
            if service.needs_license(crate.name, crate.version)
            and (path := store.crate_path(crate.name, crate.version)).is_file()
        ]
        if cached:
            asyncio.run(_learn_licenses(service, cached))
        blocked = warned = unknown = 0
        for crate in sorted(locked.crates, key=lambda item: (item.name.lower(), item.version)):
            verdict = service.verdict(crate.name, crate.version)
            for warning in verdict.warnings:
                warned += 1
                print(f"WARN  {crate.name} {crate.version} [{warning.rule}]: {warning.reason}")
            if verdict.block is not None:
                blocked += 1
                print(f"BLOCK {crate.name} {crate.version} [{verdict.block.rule}]: {verdict.block.reason}")
            elif service.needs_license(crate.name, crate.version):
                unknown += 1
                print(f"UNKNOWN LICENCE {crate.name} {crate.version}: not read yet (the mirror reads it on "
                      "the first download, and refuses it then if it is not allowed)")  # fmt: skip
    print(
        f"policy check: {plural(len(locked.crates), 'crate')} ({locked.skipped_text()}): "
        f"{blocked} blocked, {plural(warned, 'warning')}"
        + (f", {unknown} with a licence not yet known" if unknown else "")
    )
    return EXIT_FAILURE if blocked else EXIT_OK


async def _learn_licenses(service: PolicyService, crates: list[tuple[str, str, Path]]) -> None:
    for name, version, path in crates:
        with contextlib.suppress(OSError), path.open("rb") as crate:
            await service.learn_license(name, version, crate)
