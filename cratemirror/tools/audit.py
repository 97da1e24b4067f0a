"""`cratemirror audit query|impact`: who took what, and who took what an advisory affects.

Reads the audit trail the server writes (cache/audit.py): this cache dir's `audit.sqlite`, and with
storage.backend s3 every other replica's hourly objects under `audit/` in the bucket. Every record is
parsed and bounded on the way in. `impact` reads the advisory from policy.advisory_db (the same parser
the policy uses) or takes `--crate NAME@REQ`, and groups the served records of affected versions by
crate, version and client: how many downloads, first and last time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cratemirror.cache.audit import (
    AUDIT_FILE,
    MAX_ROWS,
    SERVED,
    AuditDb,
    AuditRecord,
    bucket_records,
    replica_id,
)
from cratemirror.config.schema import Config, ConfigError
from cratemirror.names import InvalidRequest, parse_name
from cratemirror.policy import advisories
from cratemirror.tools.common import EXIT_OK, duration_flag, error, tool_config
from cratemirror.versions import CargoRequirement, RequirementError, Version, parse_version

CONFIG_HELP = "config file (default: $CRATEMIRROR_CONFIG, ./mirror.yaml)"
FORMATS = ("table", "json", "csv")


# --- reading the trail ---------------------------------------------------------------------------


def collect(config: Config, since: float) -> list[AuditRecord]:
    """Every record from `since` on: this cache dir's file, then the other replicas' bucket objects."""
    records: list[AuditRecord] = []
    path = config.cache.dir / AUDIT_FILE
    own = None
    if path.is_file():
        db = AuditDb(path, readonly=True)
        try:
            records.extend(db.select(since))
        finally:
            db.close()
        own = replica_id(config.cache.dir, create=False)
    if config.storage.backend == "s3":  # every replica's records are in the bucket
        records.extend(asyncio.run(_from_bucket(config, since, own)))
    records.sort(key=lambda record: record.at)
    return records[:MAX_ROWS]


async def _from_bucket(config: Config, since: float, own: str | None) -> list[AuditRecord]:
    from cratemirror.fleet.storage import make_shared_storage

    shared = make_shared_storage(config.storage, config.upstream.max_index_size)
    await shared.start()
    found: list[AuditRecord] = []
    try:
        async for records in bucket_records(shared, since, own):  # this replica's came from its file
            found.extend(records)
    finally:
        await shared.close()
    return found


# --- selecting -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrateFilter:
    lower: str
    requirement: CargoRequirement | None
    text: str

    @classmethod
    def parse(cls, text: str, *, need_requirement: bool = False) -> CrateFilter:
        name, at, requirement = text.strip().partition("@")
        try:
            crate = parse_name(name.strip())
            if need_requirement and not requirement.strip():
                raise RequirementError("a version requirement is needed")
            parsed = CargoRequirement.parse(requirement) if at else None
        except (InvalidRequest, RequirementError) as exc:
            raise ConfigError(
                f"--crate: expected NAME or NAME@<cargo version requirement>, got {text!r} ({exc})"
            ) from None
        return cls(crate.lower, parsed, text.strip())

    def matches(self, record: AuditRecord) -> bool:
        if _normal(record.crate) != _normal(self.lower):
            return False
        return self.requirement is None or _version_matches(record.version, self.requirement.matches)


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def _version_matches(text: str, predicate: Callable[[Version], bool]) -> bool:
    try:
        return predicate(parse_version(text))
    except RequirementError:
        return False


@dataclass
class Exposure:
    crate: str
    version: str
    who: str
    count: int
    first: float
    last: float


def group_served(records: Iterable[AuditRecord], affected: Callable[[AuditRecord], bool]) -> list[Exposure]:
    """Served records of affected versions, one row per crate, version and client."""
    rows: dict[tuple[str, str, str], Exposure] = {}
    for record in records:
        if record.result != SERVED or not affected(record):
            continue
        key = (record.crate, record.version, record.who)
        row = rows.get(key)
        if row is None:
            rows[key] = Exposure(
                record.crate, record.version, record.who, record.count, record.at, record.last
            )
        else:
            row.count += record.count
            row.first = min(row.first, record.at)
            row.last = max(row.last, record.last)
    return sorted(rows.values(), key=lambda row: (row.crate, row.version, row.who))


# --- output --------------------------------------------------------------------------------------


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(rows: list[dict[str, Any]], columns: list[str], form: str) -> str:
    if form == "json":
        return json.dumps(rows, indent=2) + "\n"
    if form == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    cells = [[str(row[column]) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(widths[i]) for i, column in enumerate(columns)).rstrip()]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


# --- the commands --------------------------------------------------------------------------------


def _since(args: argparse.Namespace, config: Config) -> float:
    if args.since is None:
        return time.time() - config.audit.retention if config.audit.retention else 0.0
    return time.time() - duration_flag("--since", args.since, "30d")


def run_query(args: argparse.Namespace) -> int:
    config = tool_config(args)
    since = _since(args, config)
    wanted = CrateFilter.parse(args.crate) if args.crate else None
    records = [
        record
        for record in collect(config, since)
        if (wanted is None or wanted.matches(record)) and (args.who is None or record.who == args.who)
    ]
    rows = [{**record.as_json(), "at": _when(record.at), "last": _when(record.last)} for record in records]
    columns = ["at", "registry", "crate", "version", "result", "rule", "who", "count", "last"]
    print(render(rows, columns, args.format), end="")
    if args.format == "table":
        downloads = sum(record.count for record in records)
        print(f"audit query: {len(rows)} records, {downloads} requests since {_when(since)}")
    return EXIT_OK


def run_impact(args: argparse.Namespace) -> int:
    config = tool_config(args)
    since = _since(args, config)
    title = ""
    if args.crate:
        wanted = CrateFilter.parse(args.crate, need_requirement=True)
        subject = wanted.text

        def affected(record: AuditRecord) -> bool:
            return wanted.matches(record)
    else:
        if args.advisory is None:
            return error("audit impact: name an advisory (RUSTSEC-YYYY-NNNN) or --crate NAME@REQ")
        found = _advisory(config, args.advisory)
        if found is None:
            return error(
                f"audit impact: {args.advisory} is not in policy.advisory_db ({config.policy.advisory_db})"
            )
        advisory = found
        subject, title = advisory.id, f" ({advisory.package}: {advisory.title})" if advisory.title else ""
        lower = _normal(advisory.package)

        def affected(record: AuditRecord) -> bool:
            return _normal(record.crate) == lower and _version_matches(record.version, advisory.affects)

    rows = group_served(collect(config, since), affected)
    columns = ["crate", "version", "who", "count", "first", "last"]
    shown = [
        {"crate": row.crate, "version": row.version, "who": row.who, "count": row.count,
         "first": _when(row.first), "last": _when(row.last)}
        for row in rows
    ]  # fmt: skip
    if args.format == "json":
        document = {"subject": subject, "since": _when(since), "clients": len({row.who for row in rows}),
                    "downloads": sum(row.count for row in rows), "served": shown}  # fmt: skip
        print(json.dumps(document, indent=2))
        return EXIT_OK
    if args.format == "table":
        clients = len({row.who for row in rows})
        downloads = sum(row.count for row in rows)
        print(
            f"audit impact: {subject}{title}: affected versions served to {clients} "
            f"client{'s' if clients != 1 else ''} ({downloads} download{'s' if downloads != 1 else ''}) "
            f"since {_when(since)}"
        )
        if not rows:
            return EXIT_OK
    print(render(shown, columns, args.format), end="")
    return EXIT_OK


def _advisory(config: Config, advisory_id: str) -> advisories.Advisory | None:
    if not advisories.ADVISORY_ID_RE.fullmatch(advisory_id):
        raise ConfigError(
            f"audit impact: expected an advisory id like RUSTSEC-2023-0001, got {advisory_id!r}"
        )
    if config.policy.advisory_db is None:
        raise ConfigError(
            f"{config.source}: policy.advisory_db: needed by `audit impact RUSTSEC-...`, got null"
        )
    db = advisories.load(config.policy.advisory_db)
    for crate_advisories in db.by_crate.values():
        for advisory in crate_advisories:
            if advisory.id == advisory_id:
                return advisory
    return None


def add_audit_command(commands: argparse._SubParsersAction[Any]) -> None:
    audit = commands.add_parser(
        "audit",
        help="who took what: the download audit trail",
        description="Query the audit trail: every download the mirror answered or refused, and who asked.",
    )
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    query = sub.add_parser(
        "query",
        help="downloads and refusals, newest last",
        description="List the downloads the mirror answered or refused (time, crate, version, result, "
        "rule, who), newest last, filtered by crate, client and age.",
    )
    query.add_argument("--crate", metavar="NAME[@REQ]", help="only this crate (and versions matching REQ)")
    query.add_argument("--who", metavar="NAME", help="only this token name or client address")
    impact = sub.add_parser(
        "impact",
        help="who was served the versions an advisory (or a requirement) affects",
        description="Who was served the versions a RustSec advisory (from policy.advisory_db) or a "
        "requirement (--crate NAME@REQ) affects, within the audit trail's retention.",
    )
    impact.add_argument("advisory", nargs="?", metavar="RUSTSEC-ID", help="an advisory in policy.advisory_db")
    impact.add_argument("--crate", metavar="NAME@REQ", help="instead of an advisory: these versions")
    for command, run in ((query, _run_query), (impact, _run_impact)):
        command.add_argument(
            "--since", metavar="DURATION", help="only this far back (default: audit.retention)"
        )
        command.add_argument(
            "--format", choices=FORMATS, default="table", help="table (default), json or csv"
        )
        command.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
        command.set_defaults(run=run)


def _run_query(args: argparse.Namespace) -> int:
    return run_query(args)


def _run_impact(args: argparse.Namespace) -> int:
    if args.advisory and args.crate:
        return error("audit impact: name an advisory or --crate, not both")
    return run_impact(args)
