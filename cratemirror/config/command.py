"""`cratemirror config check | show | schema`: validate the config, print its effective values with where
each came from, or write the JSON Schema editors use for mirror.yaml (committed as mirror.schema.json)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from cratemirror.config.load import Loaded, effective_values, find_config_path, load
from cratemirror.config.schema import MirrorSchema

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
        set_here = sum(1 for origin in loaded.origins.values() if origin)
        print(f"{loaded.config.source}: ok ({set_here} key(s) set, the rest default)")
        return 0
    rows = list(effective_values(loaded))
    width = max(len(f"{key} = {value}") for key, value, _ in rows)
    print(f"# config: {loaded.config.source}")
    for key, value, origin in rows:
        print(f"{f'{key} = {value}':<{width}}  # {origin}")
    return 0


def add_config_command(commands: argparse._SubParsersAction[Any]) -> None:
    config = commands.add_parser(
        "config",
        help="check the config, show its effective values, or print its JSON Schema",
        description="check: validate the config (exit 0, or 2 with one line naming file, key and expected "
        "form); show: every effective value and where it came from (default, the file, an environment "
        "variable), secrets masked; schema: the JSON Schema of mirror.yaml for editors.",
    )
    config.add_argument("action", choices=ACTIONS, help="check | show | schema")
    config.add_argument(
        "--config", metavar="PATH", help="config file (default: $CRATEMIRROR_CONFIG, ./mirror.yaml)"
    )
    config.set_defaults(run=run_config)
