"""Command line: `cratemirror serve|warm|verify|prune|client-config|export|import|config` (see the README)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cratemirror import __version__
from cratemirror.config.schema import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    from cratemirror.server.serve import serve  # imported late: it may set up multiprocess metrics first

    return serve(args)


def _client_config(args: argparse.Namespace) -> int:
    from cratemirror.config.client import (
        BadBaseURL,
        cargo_ci_snippet,
        cargo_config_snippet,
        checked_base,
        client_setup,
    )
    from cratemirror.config.load import find_config_path, load_config

    try:
        base = checked_base("http://127.0.0.1:8080" if args.url is None else args.url)
    except BadBaseURL as exc:
        raise ConfigError(f"client-config: --url: {exc}") from exc
    if args.rustup:  # rustup's two environment variables (no config file needed)
        from cratemirror.config.rustup_client import rustup_ci_snippet, rustup_env_snippet

        print(rustup_ci_snippet(base) if args.ci else rustup_env_snippet(base), end="")
        return EXIT_OK
    # The mirror's config says whether tokens are needed and which extra registries it serves.
    config = load_config(find_config_path(args.config, os.environ, Path.cwd()), os.environ)
    try:
        setup = client_setup(config)
    except BadBaseURL as exc:
        raise ConfigError(f"{config.source}: {exc}") from exc
    # Only what the chosen form is: the TOML goes verbatim into a file, the shell form into a CI step.
    print(cargo_ci_snippet(base, setup) if args.ci else cargo_config_snippet(base, setup), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cratemirror", description="A pull-through caching mirror for crates.io."
    )
    parser.add_argument("--version", action="version", version=f"cratemirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument(
        "--config", metavar="PATH", help="config file (default: $CRATEMIRROR_CONFIG, ./mirror.yaml)"
    )
    serve.add_argument("--host", help="address to listen on (server.host)")
    serve.add_argument("--port", help="port to listen on (server.port)")
    serve.add_argument("--workers", help="worker processes sharing the port, or 'auto' (server.workers)")
    serve.add_argument("--cache-dir", metavar="DIR", help="where crates and index files are kept (cache.dir)")
    serve.add_argument("--upstream", metavar="URL", help="upstream sparse index root (upstream.index_url)")
    serve.add_argument(
        "--offline",
        action="store_true",
        default=None,
        help="never contact upstream; serve only what is cached",
    )
    serve.add_argument(
        "--ready-file",
        metavar="PATH",
        help="write this file once every worker accepts connections; removed at exit",
    )
    serve.set_defaults(run=_serve)

    client_config = commands.add_parser(
        "client-config", help="print the cargo config that points at a mirror"
    )
    client_config.add_argument("--url", help="the mirror's base URL (default http://127.0.0.1:8080)")
    client_config.add_argument(
        "--ci",
        action="store_true",
        help="print shell for a CI step: (over)write $CARGO_HOME/config.toml, or cargo --config flags",
    )
    client_config.add_argument(
        "--config",
        metavar="PATH",
        help="the mirror's config (auth.required, registries); default: $CRATEMIRROR_CONFIG, ./mirror.yaml",
    )
    client_config.add_argument(
        "--rustup",
        action="store_true",
        help="print the RUSTUP_DIST_SERVER and RUSTUP_UPDATE_ROOT lines for rustup instead (--ci: a CI step)",
    )
    client_config.set_defaults(run=_client_config)

    from cratemirror.config.command import add_config_command
    from cratemirror.tools.cli import add_tool_commands

    add_tool_commands(commands)
    add_config_command(commands)

    from cratemirror.tools.tokens import add_token_command

    add_token_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except ConfigError as exc:
        print(f"cratemirror: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
