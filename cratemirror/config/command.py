"""`cratemirror config check | show | schema`: validate the config, print its effective values with where
each came from, or write the JSON Schema editors use for mirror.yaml (committed as mirror.schema.json)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cratemirror.config.load import Loaded, effective_values, find_config_path, load
from cratemirror.config.paths import missing_paths
from cratemirror.config.schema import ConfigError, MirrorSchema

ACTIONS = ("check", "show", "schema")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    return {"$schema": JSON_SCHEMA_DIALECT, **MirrorSchema.model_json_schema()}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def _load(args: argparse.Namespace) -> Loaded:
    # The same lookup as `serve`: --config, $CRATEMIRROR_CONFIG, ./mirror.yaml, built-in defaults.
    path = find_config_path(args.config, os.environ, Path.cwd())
    return load(path, os.environ, {})


def run_config(args: argparse.Namespace) -> int:
    """A bad config raises ConfigError, which the main entry point prints as one line with exit 2."""
    if args.action == "schema":
        print(schema_text(), end="")
        return 0
    loaded = _load(args)
    if args.action == "check":
        missing = missing_paths(loaded.config)
        if missing:  # a check that names a path must find it
            raise ConfigError("\n".join(missing))
        set_here = sum(1 for origin in loaded.origins.values() if origin)
        print(f"{loaded.config.source}: ok ({set_here} key(s) set, the rest default)")
        return 0
    rows = list(effective_values(loaded))
    width = max(len(f"{key} = {value}") for key, value, _ in rows)
    print(f"# config: {loaded.config.source}")
    for key, value, origin in rows:
        print(f"{f'{key} = {value}':<{width}}  # {origin}")
    return 0


ACTION_HELP = {
    "check": (
        "validate the config and the paths it names",
        "Validate the config: exit 0 with one line, or 2 with one line per problem naming the file, the "
        "key and the expected form. Paths the config names (policy.advisory_db, auth.tokens_file when "
        "auth.required) must exist.",
    ),
    "show": (
        "every effective value and where it came from",
        "Print every effective value (sizes and durations as written, workers auto as `auto (N)`) and "
        "where it came from: default, the file, an environment variable or a flag; `= default` marks a "
        "value set to what the default is anyway. Secrets are masked.",
    ),
    "schema": (
        "print the JSON Schema of mirror.yaml",
        "Print the JSON Schema of mirror.yaml, for editors (committed as mirror.schema.json).",
    ),
}


def add_config_command(commands: argparse._SubParsersAction[Any]) -> None:
    config = commands.add_parser(
        "config",
        help="check the config, show its effective values, or print its JSON Schema",
        description="check: validate the config (exit 0, or 2 with one line naming file, key and expected "
        "form); show: every effective value and where it came from (default, the file, an environment "
        "variable), secrets masked; schema: the JSON Schema of mirror.yaml for editors.",
    )
    config_help = "config file (default: $CRATEMIRROR_CONFIG, ./mirror.yaml)"
    config.add_argument("--config", metavar="PATH", help=config_help)
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ACTIONS:
        summary, description = ACTION_HELP[action]
        sub = actions.add_parser(action, help=summary, description=description)
        # SUPPRESS: `config --config X check` keeps X (a subcommand's default would overwrite it)
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    config.set_defaults(run=run_config)
