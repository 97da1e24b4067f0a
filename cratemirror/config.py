"""Configuration: built-in defaults < mirror.yaml < CRATEMIRROR_* environment < command-line flags.

Key names, defaults and accepted forms are part of the external contract (docs/contract.md, "mirror.yaml").
Every problem is raised as a ConfigError whose message is one line naming the source, the dotted key and the
expected form, so the CLI can print it as-is and exit 2.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

__all__ = [
    "CacheConfig",
    "Config",
    "ConfigError",
    "LoggingConfig",
    "ServerConfig",
    "UpstreamConfig",
    "find_config_path",
    "load_config",
    "parse_duration",
    "parse_size",
]

GiB = 1024**3
DAY = 86400.0
DEFAULTS_SOURCE = "built-in defaults"
ENV_PREFIX = "CRATEMIRROR_"
# Names the config file, so it is not itself a setting (and must not be rejected as an unknown one).
ENV_CONFIG = "CRATEMIRROR_CONFIG"


class ConfigError(Exception):
    """A bad config file, environment variable or flag.

    str(e) is one line, "<source>: <dotted.key>: expected <form>, got <value>", fit to print before exit 2.
    """


# --- sizes and durations ---------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(b|[kmgt](?:i?b)?)?\s*", re.IGNORECASE)
# A bare letter and "KB" are decimal (SI); only the "iB" forms are binary.
_SIZE_UNITS: dict[str, int] = {"b": 1} | {
    letter + suffix: (1024 if suffix == "ib" else 1000) ** power
    for power, letter in enumerate("kmgt", start=1)
    for suffix in ("", "b", "ib")
}


def parse_size(text: str | int) -> int:
    """Bytes from an int or a string like "512", "512KiB", "1.5GiB", "1TB" (KB = 1000, KiB = 1024)."""
    # bool is an int subclass; "max_size: true" is a mistake, not 1 byte.
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text!r}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"not a size: {text!r}")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    unit = (match.group(2) or "b").lower()
    # Decimal, not float, so "0.1TB" is exactly 100000000000 bytes.
    value = Decimal(match.group(1)) * _SIZE_UNITS[unit]
    if unit == "b" and value != value.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r}")
    # With a unit, a fraction of a byte is noise ("1.1KiB" = 1126.4): drop it.
    return int(value)


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
_DURATION_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}


def parse_duration(text: str | int | float) -> float:
    """Seconds from a number or a string like "500ms", "30s", "5m", "2h", "7d"; "forever" is math.inf."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        try:
            seconds = float(text)
        except OverflowError:
            raise ValueError(f"duration out of range: {text!r}") from None
    elif isinstance(text, str):
        if text.strip().lower() == "forever":
            return math.inf
        match = _DURATION_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a duration: {text!r}")
        unit = (match.group(2) or "s").lower()
        seconds = float(Decimal(match.group(1)) * _DURATION_UNITS[unit])
    else:
        raise ValueError(f"not a duration: {text!r}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"duration must be a non-negative number: {text!r}")
    return seconds


# --- the config objects ----------------------------------------------------------------------------------


def _default_workers() -> int:
    # cpu_count() may return None on exotic platforms; one worker always works.
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = field(default_factory=_default_workers)
    public_url: str | None = None
    max_connections: int = 4096
    idle_timeout: float = 30.0

    def __post_init__(self) -> None:
        # Normalised here too (not only in the loader) so directly built configs join paths the same way.
        if self.public_url is not None:
            object.__setattr__(self, "public_url", self.public_url.rstrip("/"))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    index_url: str = "https://index.crates.io/"
    timeout: float = 30.0
    retries: int = 3
    max_connections: int = 32
    user_agent: str | None = None
    proxy: str | None = None
    ca_bundle: Path | None = None
    max_index_size: int = 64 * 1024**2
    max_crate_size: int = GiB

    def __post_init__(self) -> None:
        # Exactly one trailing "/" so index_url + "<prefix>/<name>" is always right.
        object.__setattr__(self, "index_url", self.index_url.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    dir: Path = Path("./cache")
    max_size: int = 20 * GiB
    index_ttl: float = 300.0
    negative_ttl: float = 60.0
    stale_if_error: float = 7 * DAY


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    offline: bool = False
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = DEFAULTS_SOURCE


# --- per-key parsers: a raw YAML/env/flag value in, the typed value out, or ValueError


def _as_int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    # Environment values are always strings; accept the same digits a YAML int would have.
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(value)


def _int_at_least(low: int, high: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        number = _as_int(value)
        if number < low or (high is not None and number > high):
            raise ValueError(value)
        return number

    return parse


def _workers(value: object) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return _default_workers()
    return _int_at_least(1)(value)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError(value)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(value)
    return value.strip()


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        word = _text(value).lower()
        if word not in allowed:
            raise ValueError(value)
        return word

    return parse


def _http_url(value: object) -> str:
    text = _text(value)
    parts = urlsplit(text)  # raises ValueError itself for e.g. a broken IPv6 literal
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(value)
    _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    return text


def _base_url(value: object) -> str:
    # Paths are appended to it, so a query or fragment could only produce wrong URLs.
    text = _http_url(value)
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ValueError(value)
    return text


def _public_url(value: object) -> str:
    return _base_url(value).rstrip("/")


def _index_url(value: object) -> str:
    return _base_url(value).rstrip("/") + "/"


def _path(value: object) -> Path:
    # os.PathLike too, so CLI code can pass Path objects straight through.
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    # Kept as given (relative = relative to the working directory); resolving is the caller's business.
    return Path(_text(value))


def _existing_file(value: object) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ValueError(value)
    return path


def _size(value: object) -> int:
    if not isinstance(value, str | int):
        raise ValueError(value)
    return parse_size(value)


def _duration(*, positive: bool = False, forever: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if not isinstance(value, str | int | float):
            raise ValueError(value)
        seconds = parse_duration(value)
        if (positive and seconds == 0) or (not forever and math.isinf(seconds)):
            raise ValueError(value)
        return seconds

    return parse


@dataclass(frozen=True, slots=True)
class _Key:
    parse: Callable[[object], object]
    expected: str  # finishes "expected ..." in error messages
    nullable: bool = False  # null (YAML) / empty string (environment) means "not set": the field is None


# Every accepted key, dotted. A test checks this against the dataclass fields so the two cannot drift apart.
_KEYS: dict[str, _Key] = {
    "server.host": _Key(_text, "a host name or IP address"),
    "server.port": _Key(_int_at_least(1, 65535), "an integer port 1..65535"),
    "server.workers": _Key(_workers, "a positive integer or auto"),
    "server.public_url": _Key(
        _public_url, "an http(s) URL like https://crates.example.com, or null", nullable=True
    ),
    "server.max_connections": _Key(_int_at_least(1), "a whole number >= 1"),
    "server.idle_timeout": _Key(_duration(positive=True), "a positive duration like 30s"),
    "upstream.index_url": _Key(_index_url, "an http(s) URL like https://index.crates.io/"),
    "upstream.timeout": _Key(_duration(positive=True), "a positive duration like 30s"),
    "upstream.retries": _Key(_int_at_least(0), "a whole number >= 0"),
    "upstream.max_connections": _Key(_int_at_least(1), "a whole number >= 1"),
    "upstream.user_agent": _Key(_text, "a non-empty string, or null", nullable=True),
    "upstream.proxy": _Key(_http_url, "an http(s) proxy URL like http://proxy:3128, or null", nullable=True),
    "upstream.ca_bundle": _Key(_existing_file, "a path to an existing PEM file, or null", nullable=True),
    "upstream.max_index_size": _Key(_size, "a size like 64MiB"),
    "upstream.max_crate_size": _Key(_size, "a size like 1GiB"),
    "cache.dir": _Key(_path, "a directory path like ./cache"),
    "cache.max_size": _Key(_size, "a size like 20GiB"),
    "cache.index_ttl": _Key(_duration(), "a duration like 5m"),
    "cache.negative_ttl": _Key(_duration(), "a duration like 1m"),
    "cache.stale_if_error": _Key(_duration(forever=True), "a duration like 7d, forever, or 0"),
    "offline": _Key(_bool, "true or false"),
    "logging.level": _Key(
        _choice("debug", "info", "warning", "error", "critical"),
        "one of debug, info, warning, error, critical",
    ),
    "logging.format": _Key(_choice("text", "json"), "one of text, json"),
}

_SECTIONS = ("server", "upstream", "cache", "logging")
# Top-level keys in the order they appear in the contract, for "allowed keys" lists.
_TOP_LEVEL = list(dict.fromkeys(dotted.partition(".")[0] for dotted in _KEYS))
_ENV_NAMES = {ENV_PREFIX + dotted.replace(".", "_").upper(): dotted for dotted in _KEYS}
# Overrides usually come from these flags; naming the flag tells the user which input was wrong.
_FLAGS = {
    "server.host": "--host",
    "server.port": "--port",
    "server.workers": "--workers",
    "cache.dir": "--cache-dir",
    "cache.max_size": "--max-size",
    "upstream.index_url": "--upstream",
    "offline": "--offline",
}


def _show(value: object) -> str:
    # One line, bounded: a whole nested mapping pasted into an error would bury the point.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown(source: str, name: str, allowed: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(name.rpartition(".")[2], allowed, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"{source}: {name}: unknown key{did_you_mean}; allowed keys: {', '.join(allowed)}")


def _convert(source: str, dotted: str, raw: object, *, from_env: bool = False) -> object:
    key = _KEYS[dotted]
    # An environment variable cannot be null; an empty one is the way to unset an optional key.
    if key.nullable and (raw is None or (from_env and isinstance(raw, str) and not raw.strip())):
        return None
    try:
        return key.parse(raw)
    except ValueError:
        raise ConfigError(f"{source}: {dotted}: expected {key.expected}, got {_show(raw)}") from None


# --- reading the file ------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: plain PyYAML lets the last one silently win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges are allowed to be overridden
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_reason(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        problem = error.problem or error.context or "syntax error"
        if error.context and problem.startswith("but "):
            # e.g. "expected a single document in the stream" + "but found another document"
            problem = f"{error.context} {problem}"
        mark = error.problem_mark or error.context_mark
        if mark is not None:
            problem += f" at line {mark.line + 1}, column {mark.column + 1}"
    else:
        problem = str(error)
    return " ".join(problem.split())  # the message must stay on one line


def _read_yaml(path: Path) -> object:
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not valid YAML: not UTF-8 text (byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_reason(error)}") from None


def _file_values(document: object, source: str) -> list[tuple[str, object]]:
    """The (dotted key, raw value) pairs of a parsed file, rejecting unknown keys and malformed sections."""
    if document is None:  # empty or all-comments file
        return []
    if not isinstance(document, dict):
        raise ConfigError(
            f"{source}: expected a mapping with keys {', '.join(_TOP_LEVEL)} at the top level, "
            f"got {_show(document)}"
        )
    pairs: list[tuple[str, object]] = []
    for name, value in document.items():
        name = str(name)
        if name in _SECTIONS:
            if value is None:  # "server:" with every key commented out
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: {name}: expected a mapping of {name} settings, got {_show(value)}"
                )
            allowed = [dotted.partition(".")[2] for dotted in _KEYS if dotted.startswith(name + ".")]
            for key, raw in value.items():
                dotted = f"{name}.{key}"
                if dotted not in _KEYS:
                    raise _unknown(source, dotted, allowed)
                pairs.append((dotted, raw))
        elif name in _KEYS:
            pairs.append((name, value))
        else:
            raise _unknown(source, name, _TOP_LEVEL)
    return pairs


# --- public entry points ---------------------------------------------------------------------------------


def _is_process_cwd(cwd: Path) -> bool:
    try:
        return os.path.samefile(cwd, os.getcwd())
    except OSError:
        return False


def _as_given(path: Path, cwd: Path) -> Path:
    # Keep a relative path as typed when it already resolves against the process cwd, so messages read
    # "mirror.yaml: ..." rather than an absolute path; otherwise anchor it to the cwd we were given.
    if path.is_absolute() or _is_process_cwd(cwd):
        return path
    return cwd / path


def _existing_config(text: str, source: str, cwd: Path) -> Path:
    path = Path(text)
    if not text or not (path if path.is_absolute() else cwd / path).is_file():
        raise ConfigError(f"{source}: expected a path to an existing config file, got {_show(text)}")
    return _as_given(path, cwd)


def find_config_path(cli_path: str | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    """--config, else $CRATEMIRROR_CONFIG, else ./mirror.yaml if present, else None (built-in defaults)."""
    if cli_path is not None:
        return _existing_config(cli_path, "--config", cwd)
    # An empty variable is treated as unset, as shells make it easy to export one by accident.
    env_path = env.get(ENV_CONFIG)
    if env_path:
        return _existing_config(env_path, f"environment {ENV_CONFIG}", cwd)
    if (cwd / "mirror.yaml").is_file():
        return _as_given(Path("mirror.yaml"), cwd)
    return None


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the Config from defaults < the YAML file at path < CRATEMIRROR_* variables < overrides.

    overrides maps dotted keys ("server.port", "offline", ...) to raw values; None values are skipped so
    argparse results can be passed straight through. env=None means os.environ.
    """
    values: dict[str, object] = {}

    # Every layer is validated in full, even keys a later layer overrides: a broken file stays an error.
    if path is not None:
        source = str(path)
        for dotted, raw in _file_values(_read_yaml(path), source):
            values[dotted] = _convert(source, dotted, raw)

    environment = os.environ if env is None else env
    for name in sorted(environment):
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        dotted_key = _ENV_NAMES.get(name)
        if dotted_key is None:
            hint = difflib.get_close_matches(name, list(_ENV_NAMES), n=1)
            did_you_mean = f" (did you mean {hint[0]}?)" if hint else ""
            known = ", ".join([*_ENV_NAMES, ENV_CONFIG])
            raise ConfigError(f"environment {name}: unknown variable{did_you_mean}; known: {known}")
        values[dotted_key] = _convert(f"environment {name}", dotted_key, environment[name], from_env=True)

    for dotted, raw in (overrides or {}).items():
        if raw is None:
            continue
        if dotted not in _KEYS:
            raise _unknown("command line", dotted, list(_KEYS))
        values[dotted] = _convert(_FLAGS.get(dotted, "command line"), dotted, raw)

    # Only keys that were set are passed on; the dataclass defaults supply the rest.
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    top: dict[str, Any] = {}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        if key:
            sections[section][key] = value
        else:
            top[section] = value
    return Config(
        server=ServerConfig(**sections["server"]),
        upstream=UpstreamConfig(**sections["upstream"]),
        cache=CacheConfig(**sections["cache"]),
        logging=LoggingConfig(**sections["logging"]),
        source=DEFAULTS_SOURCE if path is None else str(path),
        **top,
    )
