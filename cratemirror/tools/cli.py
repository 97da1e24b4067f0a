"""Registers the operator commands on the main parser: warm, verify, prune, export, import.

Each command's module is imported only when it runs, so `cratemirror serve` and `client-config` do not
pay for them.
"""

from __future__ import annotations

import argparse
from typing import Any

CONFIG_HELP = "config file (default: $CRATEMIRROR_CONFIG, ./mirror.yaml)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _warm(args: argparse.Namespace) -> int:
    from cratemirror.config.schema import ConfigError
    from cratemirror.tools.warm import run_warm
    from cratemirror.tools.warm_toolchains import is_toolchain_file, run_warm_toolchains

    toolchain_files = [path for path in args.lockfiles if is_toolchain_file(path)]
    args.lockfiles = [path for path in args.lockfiles if not is_toolchain_file(path)]
    if not args.lockfiles and not toolchain_files and not args.toolchain:
        raise ConfigError("warm: expected a Cargo.lock, a rust-toolchain.toml or --toolchain SPEC")
    code = run_warm(args) if args.lockfiles else 0
    if toolchain_files or args.toolchain:
        code = max(code, run_warm_toolchains(args, toolchain_files))
    return code


def _verify(args: argparse.Namespace) -> int:
    from cratemirror.tools.verify import run_verify

    return run_verify(args)


def _prune(args: argparse.Namespace) -> int:
    from cratemirror.tools.prune import run_prune

    return run_prune(args)


def _export(args: argparse.Namespace) -> int:
    from cratemirror.tools.export import run_export

    return run_export(args)


def _import(args: argparse.Namespace) -> int:
    from cratemirror.tools.importer import run_import

    return run_import(args)


def _policy_check(args: argparse.Namespace) -> int:
    from cratemirror.tools.policy_check import run_check

    return run_check(args)


def _add_lockfiles(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lockfiles", nargs="+", metavar="LOCKFILE", help="a Cargo.lock (format 1 to 4)")


def _refresh(args: argparse.Namespace) -> int:
    from cratemirror.tools.refresh import run_refresh

    return run_refresh(args)


def _cache_or_mirror(command: argparse.ArgumentParser, config_help: str) -> None:
    """--config (work on the cache dir directly) or --mirror (through a running mirror), not both."""
    where = command.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="PATH", help=f"{config_help}; {CONFIG_HELP}")
    where.add_argument(
        "--mirror", metavar="URL", help="go through a running mirror, e.g. http://127.0.0.1:8080"
    )


def _add_warm(commands: argparse._SubParsersAction[Any]) -> None:
    warm = commands.add_parser(
        "warm",
        help="prefetch every crate a Cargo.lock needs",
        description="Prefetch the crates.io crates (and index files) of one or more Cargo.lock files: "
        "straight into the configured cache dir, or through a running mirror with --mirror.",
    )
    warm.add_argument(
        "lockfiles", nargs="*", metavar="LOCKFILE",
        help="a Cargo.lock (format 1 to 4), or a rust-toolchain.toml / rust-toolchain file",
    )  # fmt: skip
    warm.add_argument(
        "--toolchain", action="append", metavar="SPEC",
        help="a rustup toolchain to fetch: stable, beta, nightly, 1.79, 1.79.0, nightly-2024-06-13",
    )  # fmt: skip
    warm.add_argument(
        "--profile", choices=["minimal", "default", "complete"], help="rustup profile for --toolchain"
    )
    warm.add_argument(
        "--target", action="append", metavar="TRIPLE", help="also rust-std for this target (--toolchain)"
    )
    _cache_or_mirror(warm, "fill this config's cache dir")
    warm.add_argument(
        "--jobs", type=_positive_int, default=8, metavar="N", help="crates fetched at once (default 8)"
    )
    warm.set_defaults(run=_warm)


def _add_refresh(commands: argparse._SubParsersAction[Any]) -> None:
    refresh = commands.add_parser(
        "refresh",
        help="revalidate these index files with upstream now",
        description="Ask upstream for these crates' index files now, whatever their age, so a version "
        "published a moment ago can be locked at once: straight in the configured cache dir (every "
        "worker sees it), or through a running mirror with --mirror.",
    )
    refresh.add_argument("names", nargs="+", metavar="NAME", help="a crate name, e.g. serde")
    _cache_or_mirror(refresh, "refresh in this config's cache dir")
    refresh.set_defaults(run=_refresh)


def _add_verify(commands: argparse._SubParsersAction[Any]) -> None:
    verify = commands.add_parser(
        "verify",
        help="re-hash every cached crate",
        description="Re-hash every cached crate against the sha256 recorded when it was stored; report "
        "corrupt files, files without a recorded checksum and checksums without a file (storage.backend "
        "s3: crate objects, against a record authenticated with storage.s3.integrity_key). Safe while the "
        "server runs.",
    )
    verify.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    verify.add_argument(
        "--fix", action="store_true", help="remove what is bad (it is fetched again on the next request)"
    )
    verify.set_defaults(run=_verify)


def _add_prune(commands: argparse._SubParsersAction[Any]) -> None:
    prune = commands.add_parser(
        "prune",
        help="evict least-recently-used crates down to a size",
        description="Evict least-recently-used crates until the cache is at most --max-size.",
    )
    prune.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    prune.add_argument("--max-size", metavar="SIZE", help="e.g. 10GiB (default: cache.max_size)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    prune.set_defaults(run=_prune)


def _add_export(commands: argparse._SubParsersAction[Any]) -> None:
    export = commands.add_parser(
        "export",
        help="write the working set (crates + index files) to one tar",
        description="Write cached crates, their index files and a manifest to one tar file, for "
        "`cratemirror import` on another (possibly offline) mirror.",
    )
    export.add_argument("bundle", metavar="BUNDLE", help="the tar file to write")
    export.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    which = export.add_mutually_exclusive_group()
    which.add_argument(
        "--since", metavar="DURATION", help="only crates fetched or served within it, e.g. 30d"
    )
    which.add_argument(
        "--lockfile",
        action="extend",
        nargs="+",
        metavar="LOCKFILE",
        help="only the crates of these Cargo.lock files (give BUNDLE first; repeatable)",
    )
    export.add_argument(
        "--advisory-db",
        action="store_true",
        help="also carry policy.advisory_db (the RustSec advisory files) for `import` to install",
    )
    export.add_argument(
        "--toolchain", action="append", metavar="SPEC",
        help="also carry this cached rustup toolchain (stable, 1.79.0, nightly-2024-06-13; repeatable)",
    )  # fmt: skip
    export.set_defaults(run=_export)


def _add_import(commands: argparse._SubParsersAction[Any]) -> None:
    importer = commands.add_parser(
        "import",
        help="verify a bundle's checksums, then load it into the cache",
        description="Verify every crate of a bundle against its manifest and its index line, then load "
        "what matched into the cache dir. Anything that does not match is refused (exit 1).",
    )
    importer.add_argument("bundle", metavar="BUNDLE", help="a tar file written by `cratemirror export`")
    importer.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    importer.add_argument(
        "--replace-advisory-db",
        action="store_true",
        help="install the bundle's advisory db even if it is empty or older than the one in place",
    )
    importer.set_defaults(run=_import)


def _add_policy(commands: argparse._SubParsersAction[Any]) -> None:
    policy = commands.add_parser(
        "policy",
        help="supply-chain policy tools",
        description="Tools for the supply-chain policy (advisories, licences, deny/allow lists).",
    )
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_commands.add_parser(
        "check",
        help="what the policy would block in these lockfiles, and why (exit 1 if anything)",
        description="Check Cargo.lock files against the configured policy as `enforce` would: advisories, "
        "deny/allow entries, and the licences the mirror has already read.",
    )
    _add_lockfiles(check)
    check.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    check.set_defaults(run=_policy_check)


def add_tool_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """The operator commands, in the order `cratemirror --help` lists them."""
    from cratemirror.tools.audit import add_audit_command

    for add in (_add_warm, _add_refresh, _add_verify, _add_prune, _add_export, _add_import, _add_policy):
        add(commands)
    add_audit_command(commands)
