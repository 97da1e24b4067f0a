"""`cratemirror token add NAME [--expires DURATION] | list | revoke NAME [--config PATH]`."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from cratemirror.auth.tokens import TokenFileError, add_token, read_records, revoke_token, utcnow
from cratemirror.config.client import ClientSetup, token_names, token_variable
from cratemirror.config.load import find_config_path, load_config
from cratemirror.config.schema import ConfigError
from cratemirror.tools.cli import CONFIG_HELP
from cratemirror.tools.common import EXIT_OK, duration_flag, error


def _lifetime(text: str | None) -> float | None:
    if text is None:
        return None
    seconds = duration_flag("--expires", text, "90d")
    if seconds == 0:
        raise ConfigError(f"--expires: expected a positive duration like 90d, got {text!r}")
    return None if math.isinf(seconds) else seconds


def run_token(args: argparse.Namespace) -> int:
    config_path = find_config_path(args.config, os.environ, Path.cwd())
    config = load_config(config_path, os.environ)
    path = config.auth.tokens_file
    try:
        if args.action == "add":
            lifetime = _lifetime(args.expires)
            try:
                token, record = add_token(path, args.name, lifetime)
            except ValueError as exc:
                return error(str(exc))
            until = record.expires.strftime("%Y-%m-%d %H:%M UTC") if record.expires else "never"
            # The variables client-config's file makes cargo read (the same token for every registry)
            setup = ClientSetup(True, tuple((name, "") for name in config.registries))
            variables = ", ".join(f"{token_variable(name)}=<token>" for name in token_names(setup))
            print(token)
            print(
                f"token {record.name!r} added to {path} (expires: {until}); it is shown only now. "
                f"On the client (beside `cratemirror client-config`'s file): {variables}",
                file=sys.stderr,
            )
            if not config.auth.required:
                print(
                    f"warning: auth.required is false in {config.source}: the mirror asks no client for "
                    "a token until it is set to true",
                    file=sys.stderr,
                )
            return EXIT_OK
        if args.action == "revoke":
            if not revoke_token(path, args.name):
                return error(f"no unrevoked token named {args.name!r} in {path}")
            print(f"token {args.name!r} revoked; every worker refuses it within seconds", file=sys.stderr)
            return EXIT_OK
        now = utcnow()
        print(f"{'NAME':<24} {'CREATED':<20} {'EXPIRES':<20} STATE")
        for record in read_records(path):
            created = record.created.strftime("%Y-%m-%d %H:%M")
            expires = record.expires.strftime("%Y-%m-%d %H:%M") if record.expires else "never"
            print(f"{record.name:<24} {created:<20} {expires:<20} {record.state(now)}")
        return EXIT_OK
    except (TokenFileError, OSError) as exc:
        return error(str(exc))


def add_token_command(commands: argparse._SubParsersAction[Any]) -> None:
    token = commands.add_parser(
        "token",
        help="add, list or revoke client tokens",
        description="Client tokens for auth.required (cargo's RFC 3139). `add` prints the new token once; "
        "only its sha256 is kept in auth.tokens_file. Workers see changes within seconds.",
    )
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="create a token and print it once",
        description="Create a token for NAME, print it once on stdout (only its sha256 is kept in "
        "auth.tokens_file) and say on stderr which variable cargo reads it from.",
    )
    add.add_argument("name", metavar="NAME", help="who the token is for, e.g. ci-runner (shown in logs)")
    add.add_argument("--expires", metavar="DURATION", help="lifetime, e.g. 90d (default: never)")
    listing = actions.add_parser(
        "list",
        help="names and dates (never the tokens)",
        description="List the tokens: name, created, expires and state (active, expired, revoked).",
    )
    revoke = actions.add_parser(
        "revoke",
        help="refuse this token from now on",
        description="Revoke NAME's token: every worker refuses it within seconds, without a restart.",
    )
    revoke.add_argument("name", metavar="NAME")
    for parser in (add, listing, revoke):
        parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    token.set_defaults(run=run_token)
