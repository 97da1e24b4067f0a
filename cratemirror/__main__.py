"""Command line: `cratemirror serve|warm|verify|prune|client-config|export|import|config` (see the README)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cratemirror import __version__
from cratemirror.config.schema import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]
DEFAULT_URL = "http://127.0.0.1:8080"  # client-config's --url: the mirror on its default address
# A flag that sets a config key, reported by the config loader ("--port: server.port: expected ...")
_CONFIG_LAYER = re.compile(r"(--[\w-]+|[\w-]+: --[\w-]+): [a-z_]+\.[a-z_.]+: ")


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
        base = checked_base(DEFAULT_URL if args.url is None else args.url)
    except BadBaseURL as exc:
        raise ConfigError(f"client-config: --url: {exc}") from exc
    if args.rustup and args.merge is not None:
        raise ConfigError("client-config: --merge: not with --rustup (rustup reads variables, not a file)")
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
    if args.merge is not None:
        from cratemirror.config.merge import merge_into_file

        merge_into_file(Path(args.merge), base, setup)
        print(f"client-config: merged the mirror at {base} into {args.merge}", file=sys.stderr)
        return EXIT_OK
    # Only what the chosen form is: the TOML goes verbatim into a file, the shell form into a CI step.
    print(cargo_ci_snippet(base, setup) if args.ci else cargo_config_snippet(base, setup), end="")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cratemirror", description="A pull-through caching mirror for crates.io."
    )
    parser.add_argument("--version", action="version", version=f"cratemirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the mirror",
        description="Run the mirror: load the config (--config, $CRATEMIRROR_CONFIG, ./mirror.yaml, else the "
        "built-in defaults), then serve the sparse index, the downloads, /metrics and the status page with "
        "server.workers processes. The flags override the config. SIGTERM stops it gracefully.",
    )
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
        "client-config",
        help="print the cargo config that points at a mirror",
        description="Print the cargo config (TOML only) that replaces crates.io with the mirror at --url: "
        "as is for ~/.cargo/config.toml, as a CI shell step (--ci), or merged into an existing cargo "
        "config file in place (--merge). With auth.required it names the token variables cargo reads.",
    )
    client_config.add_argument(
        "--url", help=f"the mirror's base URL (default {DEFAULT_URL}; the status page shows yours)"
    )
    form = client_config.add_mutually_exclusive_group()
    form.add_argument(
        "--ci",
        action="store_true",
        help="print shell for a CI step: (over)write $CARGO_HOME/config.toml, or cargo --config flags",
    )
    form.add_argument(
        "--merge",
        metavar="PATH",
        help="update this cargo config in place (e.g. ~/.cargo/config.toml): only the mirror's tables "
        "change, comments and other tables stay; created if missing",
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
    _usage_on_error(parser)
    return parser


def _usage_on_error(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command remembers its own usage line, for errors found after parsing (a bad --expires)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(usage_of=sub.format_usage, prog_of=sub.prog)
                _usage_on_error(sub)


def _about_the_command_line(message: str) -> bool:
    """A ConfigError about a flag or argument ("--expires: ...", "client-config: --url: ...",
    "refresh: ..."), not about a config file. A flag that sets a config key ("--port: server.port: ...")
    is reported as the config layer it is: one line naming the key, like a bad file or variable."""
    if _CONFIG_LAYER.match(message):
        return False
    head = message.split(": ", 2)
    return (
        message.startswith("--")
        or (len(head) > 1 and head[1].startswith("--"))
        or (head[0] in ("refresh", "warm", "export"))
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except ConfigError as exc:
        usage = getattr(args, "usage_of", None)
        if usage is not None and _about_the_command_line(str(exc)):
            text = str(exc).removeprefix(f"{args.prog_of.split()[-1]}: ")
            print(f"{usage()}{args.prog_of}: error: {text}", file=sys.stderr)  # as argparse's own errors
        else:
            print(f"cratemirror: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
