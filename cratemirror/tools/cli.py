"""Registers the operator commands on the main parser."""

from __future__ import annotations

import argparse
from typing import Any


def add_tool_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Filled in by the operator-tools work; the serving path does not depend on it."""
