"""`cratemirror client-config --merge PATH`: put the mirror's tables into an existing cargo config in
place, keeping everything else in it (comments, formatting, other tables and keys) as it was.

tomlkit reads and writes TOML preserving comments and layout, which a load-and-dump with tomllib/tomli_w
would lose. Only the keys client-config prints are set; the one other form of a target client-config
owns (`source.mirror` vs `registries.mirror`, which flips with auth.required) is removed so cargo never
sees both. The file is replaced atomically (a temp file renamed over it), so a crash leaves the old one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Table

from cratemirror.config.client import ClientSetup, cargo_config_snippet, cargo_tables
from cratemirror.config.schema import ConfigError

MAX_CONFIG_BYTES = 1024 * 1024  # a cargo config is a few lines; a bigger file is not one


def merge_cargo_config(text: str, base: str, setup: ClientSetup, source: str) -> str:
    """`text` (a cargo config, maybe empty) with the mirror's tables set; ConfigError if it is not TOML."""
    if not text.strip():  # nothing to keep: the file client-config prints, comments and all
        return cargo_config_snippet(base, setup)
    try:
        document = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError(
            f"{source}: expected a cargo config in TOML, but it does not parse: {exc}"
        ) from None
    for dotted, entries in cargo_tables(base, setup):
        kind, name = dotted.split(".", 1)
        other = "registries" if kind == "source" else "source"
        if name != "crates-io" and (name == "mirror" or name.endswith("-mirror")):
            _remove(document, other, name)  # client-config's target in its other form
        table = _table(_table(document, kind, source), name, source)
        for key, value in entries:
            table[key] = value
    return tomlkit.dumps(document)


def _table(parent: tomlkit.TOMLDocument | Table, key: str, source: str) -> Table:
    existing = parent.get(key)
    if existing is None:
        created = tomlkit.table(is_super_table=key in ("source", "registries"))
        parent[key] = created
        return created
    if not isinstance(existing, Table):
        raise ConfigError(f"{source}: {key}: expected a table, got {type(existing).__name__}")
    return existing


def _remove(document: tomlkit.TOMLDocument, kind: str, name: str) -> None:
    section = document.get(kind)
    if isinstance(section, Table) and name in section:
        del section[name]


def merge_into_file(path: Path, base: str, setup: ClientSetup) -> None:
    """Merge into `path` (created with its directory when missing), replacing it atomically."""
    try:
        size = path.stat().st_size if path.exists() else 0
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"--merge: expected a cargo config file, got {str(path)!r} ({size} bytes)")
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--merge: cannot read {str(path)!r}: {exc}") from None
    merged = merge_cargo_config(text, base, setup, str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".config.toml.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(merged)
            if path.exists():
                os.chmod(temp, path.stat().st_mode & 0o7777)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(f"--merge: cannot write {str(path)!r}: {exc.strerror or exc}") from None
