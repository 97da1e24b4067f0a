"""Reading the config layers into the config schema, and pydantic's errors into one line.

The layers are pydantic-settings sources: the YAML file, the CRATEMIRROR_* environment, and the command-line
flags as keyword arguments. Each layer is validated alone first, so a bad value is blamed on the file,
variable or flag it came from (and a broken file stays broken while a variable happens to override it);
then pydantic-settings merges them and the checks across keys run on the whole.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Protocol, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, YamlConfigSettingsSource

from cratemirror.config.schema import (
    DEFAULTS_SOURCE,
    ENV_CONFIG,
    ENV_PREFIX,
    LOADING,
    Config,
    ConfigError,
    Expected,
    MirrorSchema,
    Size,
    with_source,
)
from cratemirror.redact import redact

# Overrides usually come from these flags; naming the flag tells the user which input was wrong.
FLAGS = {
    "server.host": "--host",
    "server.port": "--port",
    "server.workers": "--workers",
    "cache.dir": "--cache-dir",
    "cache.max_size": "--max-size",
    "upstream.index_url": "--upstream",
    "offline": "--offline",
}
REGISTRY_NAME_FORM = "a registry name of lowercase letters, digits, - and _ (crates-io is reserved)"


# --- walking the schema ----------------------------------------------------------------------------------


def _section_model(info: FieldInfo | None) -> type[BaseModel] | None:
    annotation = None if info is None else info.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _entry_model(info: FieldInfo | None) -> type[BaseModel] | None:
    """For a mapping of names to settings (registries): the settings model."""
    if info is None or get_origin(info.annotation) is not dict:
        return None
    value = get_args(info.annotation)[1]
    return value if isinstance(value, type) and issubclass(value, BaseModel) else None


def _nullable(info: FieldInfo) -> bool:
    return get_origin(info.annotation) in (Union, UnionType) and NoneType in get_args(info.annotation)


def _mentions(annotation: object, kind: type) -> bool:
    return annotation is kind or any(_mentions(arg, kind) for arg in get_args(annotation))


def schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every settable key, dotted, in schema order; a mapping of named entries (registries) is one key."""
    for name, info in model.model_fields.items():
        section = _section_model(info)
        if section is not None:
            yield from schema_keys(section, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def _leaves(data: Mapping[Any, Any], model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """The dotted keys a layer sets (registry entries down to their keys)."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        info = model.model_fields.get(key) if isinstance(key, str) else None
        section, entries = _section_model(info), _entry_model(info)
        if section is not None and isinstance(value, dict):
            yield from _leaves(value, section, dotted + ".")
        elif entries is not None and isinstance(value, dict) and value:
            for name, entry in value.items():
                if isinstance(entry, dict) and entry:
                    yield from _leaves(entry, entries, f"{dotted}.{name}.")
                else:
                    yield f"{dotted}.{name}"
        else:
            yield dotted


def _nest(flat: Mapping[str, object]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *sections, key = dotted.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return nested


# --- the layers ------------------------------------------------------------------------------------------


class _Layer(Protocol):
    values: dict[str, Any]  # nested raw values, as the schema reads them
    origins: dict[str, str]  # dotted key -> the file, variable or flag that set it


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


def parse_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_reason(error)}") from None


class _YamlFile(YamlConfigSettingsSource):
    """mirror.yaml: pydantic-settings' YAML source, read strictly and failing in one line."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self.path = path
        super().__init__(settings_cls, yaml_file=path)
        self.values: dict[str, Any] = self.yaml_data
        self.origins = dict.fromkeys(_leaves(self.values, Config), str(path))

    def _read_files(self, files: object, deep_merge: bool = False) -> dict[str, Any]:
        # The base class skips a path that is not a file; a config named on purpose is read or fails.
        return self._read_file(self.path)

    def _read_file(self, file_path: object) -> dict[str, Any]:
        source = str(self.path)
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None
        try:
            text = data.decode("utf-8-sig")  # tolerate a BOM from Windows editors
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source}: not valid YAML: not UTF-8 text (byte {error.start})") from None
        document = parse_yaml(text, source)
        if document is None:  # empty or all-comments file
            return {}
        if not isinstance(document, dict):
            keys = ", ".join(Config.model_fields)
            raise ConfigError(
                f"{source}: expected a mapping with keys {keys} at the top level, got {show(document)}"
            )
        return document


def env_names() -> dict[str, tuple[str, FieldInfo]]:
    """CRATEMIRROR_<SECTION>_<KEY> -> (dotted key, field), for every key in the schema."""
    return {ENV_PREFIX + dotted.replace(".", "_").upper(): (dotted, info) for dotted, info in schema_keys()}


class _Environment(PydanticBaseSettingsSource):
    """CRATEMIRROR_* variables; an unknown one is an error (a typo would otherwise be silently ignored)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        known = env_names()
        flat: dict[str, object] = {}
        self.origins: dict[str, str] = {}
        for name in sorted(environ):
            if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
                continue
            if name not in known:
                hint = difflib.get_close_matches(name, list(known), n=1)
                did_you_mean = f" (did you mean {hint[0]}?)" if hint else ""
                names = ", ".join([*known, ENV_CONFIG])
                raise ConfigError(f"environment {name}: unknown variable{did_you_mean}; known: {names}")
            dotted, info = known[name]
            flat[dotted] = self._value(info, environ[name], f"environment {name}")
            self.origins[dotted] = f"environment {name}"
        self.values = _nest(flat)
        # Registries given as one mapping: each of their keys comes from that variable.
        for dotted in list(_leaves(self.values, Config)):
            top = dotted.split(".")[0]
            self.origins.setdefault(dotted, self.origins.get(top, ""))

    @staticmethod
    def _value(info: FieldInfo, text: str, source: str) -> object:
        # A variable cannot be null; an empty one is the way to unset an optional key.
        if _nullable(info) and not text.strip():
            return None
        kind = get_origin(info.annotation)
        if kind is tuple:  # "a, b" or a YAML flow list "[a, b]"
            if text.lstrip().startswith("["):
                return parse_yaml(text, source)
            return [item.strip() for item in text.split(",") if item.strip()]
        if kind is dict:  # a YAML flow mapping, e.g. {internal: {index_url: https://...}}
            return parse_yaml(text, source) or {}
        return text

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.values


@dataclass
class _Flags:
    """Command-line overrides, handed to the settings as keyword arguments (the highest layer)."""

    values: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, overrides: Mapping[str, object]) -> _Flags:
        given = {dotted: value for dotted, value in overrides.items() if value is not None}
        return cls(_nest(given), {dotted: FLAGS.get(dotted, "command line") for dotted in given})


# --- errors ----------------------------------------------------------------------------------------------


def show(value: object) -> str:
    """A value for a one-line message: repr, bounded, with a URL's userinfo (a token is often all of
    it: https://TOKEN@host) and other secret-looking parts masked."""
    text = redact(repr(value))
    # One line, bounded: a whole nested mapping pasted into an error would bury the point.
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class _Spot:
    """Where in the schema a pydantic error location points."""

    parts: list[str] = field(default_factory=list)  # the dotted key
    info: FieldInfo | None = None  # its field (for a registry entry: the registries field)
    inner: type[BaseModel] | None = Config  # the model whose keys would come next
    item: int | None = None  # a list item
    bad_name: bool = False  # the name of an entry (a registry name) is what is wrong


def _locate(loc: Sequence[int | str]) -> _Spot:
    spot = _Spot()
    entries: type[BaseModel] | None = None
    for part in loc:
        if entries is not None and isinstance(part, str) and part != "[key]":  # a registry name
            spot.parts.append(part)
            spot.inner, entries = entries, None
        elif spot.inner is not None and isinstance(part, str) and part in spot.inner.model_fields:
            spot.parts.append(part)
            spot.info = spot.inner.model_fields[part]
            spot.inner, entries = _section_model(spot.info), _entry_model(spot.info)
        elif part == "[key]":
            spot.bad_name = True
            break
        elif isinstance(part, int) and spot.inner is None and entries is None and spot.item is None:
            spot.item = part
        else:
            break
    return spot


def _lookup(values: object, parts: Sequence[str | int]) -> tuple[bool, object]:
    for part in parts:
        if isinstance(values, list | tuple) and isinstance(part, int) and 0 <= part < len(values):
            values = values[part]
        elif not isinstance(values, dict) or part not in values:
            return False, None
        else:
            values = values[part]
    return True, values


def _origin(layers: Sequence[_Layer], parts: Sequence[str]) -> str:
    """The highest layer that set this key (or, for a key nobody set, the nearest section around it)."""
    for length in range(len(parts), 0, -1):
        prefix = ".".join(parts[:length])
        for layer in layers:
            for dotted, origin in layer.origins.items():
                if dotted == prefix or dotted.startswith(prefix + "."):
                    return origin
    return DEFAULTS_SOURCE


def _expected(info: FieldInfo | None, dotted: str) -> str:
    forms = [item.text for item in (info.metadata if info else []) if isinstance(item, Expected)]
    if forms:
        return forms[-1]
    return f"a mapping of {dotted} settings" if _section_model(info) else "a valid value"


def _to_config_error(exc: ValidationError, layers: Sequence[_Layer]) -> ConfigError:
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    spot = _locate(loc)
    context = error.get("ctx") or {}
    if error["type"] == "config":  # a check across keys names the key it is about
        spot.parts += str(context["key"]).split(".")
        expected = str(context["expected"])
    elif spot.bad_name:
        expected = REGISTRY_NAME_FORM
    else:
        expected = _expected(spot.info, ".".join(spot.parts))
    origin = _origin(layers, spot.parts)
    dotted = ".".join(spot.parts)

    if error["type"] in ("extra_forbidden", "invalid_key"):
        name = str(loc[len(spot.parts)] if len(loc) > len(spot.parts) else loc[-1])
        allowed = list(spot.inner.model_fields) if spot.inner is not None else []
        hint = difflib.get_close_matches(name, allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        key = ".".join([*spot.parts, name])
        return ConfigError(
            f"{_origin(layers, [*spot.parts, name])}: {key}: unknown key{did_you_mean}; "
            f"allowed keys: {', '.join(allowed)}"
        )
    if error["type"] == "missing":
        return ConfigError(f"{origin}: {dotted}: expected {expected}, got nothing")

    path: list[str | int] = [*spot.parts]
    if spot.item is not None:
        path.append(spot.item)
        dotted += f"[{spot.item}]"
    found, raw = False, None
    for layer in layers:
        found, raw = _lookup(layer.values, path)
        if found:
            break
    if spot.bad_name:
        raw = spot.parts[-1]
    secret = spot.info is not None and _mentions(spot.info.annotation, SecretStr)
    got = "'<hidden>'" if secret and raw is not None else show(raw)
    return ConfigError(f"{origin}: {dotted}: expected {expected}, got {got}")


def _check_alone(layer: _Layer) -> None:
    try:
        # The plain schema model: Config's settings __init__ would drop the validation context.
        MirrorSchema.model_validate(layer.values, context={"partial": True})
    except ValidationError as exc:
        raise _to_config_error(exc, [layer]) from None


# --- entry points ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    config: Config
    origins: Mapping[str, str]  # dotted key -> the file, variable or flag that set it; absent = default
    # dotted key -> the value as that file, variable or flag wrote it (`20GiB`, `auto`), for `config show`
    written: Mapping[str, object] = field(default_factory=dict)


def load(path: Path | None, env: Mapping[str, str] | None, overrides: Mapping[str, object] | None) -> Loaded:
    file = None if path is None else _YamlFile(Config, path)
    environment = _Environment(Config, os.environ if env is None else env)
    flags = _Flags.of(overrides or {})
    layers: list[_Layer] = [flags, environment, *([file] if file else [])]  # highest priority first
    for layer in reversed(layers):  # every layer in full, even keys a later layer overrides
        _check_alone(layer)
    token = LOADING.set((environment, *([file] if file else [])))
    try:
        config = Config(**flags.values)
    except ValidationError as exc:
        raise _to_config_error(exc, layers) from None
    finally:
        LOADING.reset(token)
    origins: dict[str, str] = {}
    written: dict[str, object] = {}
    for layer in reversed(layers):
        origins.update(layer.origins)
        written.update((dotted, _written(layer.values, dotted)) for dotted in layer.origins)
    source = DEFAULTS_SOURCE if path is None else str(path)
    return Loaded(with_source(config, source), origins, written)


def _written(values: Mapping[str, Any], dotted: str) -> object:
    value: object = values
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


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
        raise ConfigError(f"{source}: expected a path to an existing config file, got {show(text)}")
    return _as_given(path, cwd)


def find_config(cli_path: str | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    if cli_path is not None:
        return _existing_config(cli_path, "--config", cwd)
    # An empty variable is treated as unset, as shells make it easy to export one by accident.
    env_path = env.get(ENV_CONFIG)
    if env_path:
        return _existing_config(env_path, f"environment {ENV_CONFIG}", cwd)
    if (cwd / "mirror.yaml").is_file():
        return _as_given(Path("mirror.yaml"), cwd)
    return None


# --- `config show` ---------------------------------------------------------------------------------------


def plain(value: object) -> str:
    """A value as mirror.yaml would spell it; secrets masked."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "forever"
    if isinstance(value, float):  # every float in the schema is a duration in seconds
        for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= seconds and value % seconds == 0:
                return f"{value / seconds:g}{unit}"
        return f"{value:g}s"
    if value == "":
        return "''"
    if isinstance(value, SecretStr):
        return "'**********'"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(plain(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {plain(item)}" for key, item in value.items()) + "}"
    return redact(str(value))


def effective_values(loaded: Loaded, defaults: Config | None = None) -> Iterator[tuple[str, str, str]]:
    """(dotted key, value, where it came from) for every key, in schema order. Sizes and durations are
    shown as they were written (`20GiB`, `30s`; a default as its usual spelling), `workers: auto` as
    `auto (2)`; a value set to what the default is anyway says so (`mirror.yaml, = default`)."""
    default_config = defaults if defaults is not None else load(None, {}, {}).config

    def origin(dotted: str) -> str:
        parts = dotted.split(".")
        for length in range(len(parts), 0, -1):
            found = loaded.origins.get(".".join(parts[:length]))
            if found:
                return found
        return "default"

    for dotted, info in schema_keys():
        value = _setting(loaded.config, dotted)
        if isinstance(value, dict) and value:  # registries: each entry's keys
            for name, entry in value.items():
                for key, entry_info in type(entry).model_fields.items():
                    full = f"{dotted}.{name}.{key}"
                    yield full, _shown(full, entry_info, getattr(entry, key), loaded), origin(full)
            continue
        where = origin(dotted)
        if where != "default" and plain(value) == plain(_setting(default_config, dotted)):
            where += ", = default"
        yield dotted, _shown(dotted, info, value, loaded), where


def _setting(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


_SIZE_MARK = get_args(Size)[1]  # the validator every size field carries
_BINARY = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_DECIMAL = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000))


def _shown(dotted: str, info: FieldInfo, value: object, loaded: Loaded) -> str:
    written = loaded.written.get(dotted)
    if dotted == "server.workers" and (
        dotted not in loaded.origins or (isinstance(written, str) and written.strip().lower() == "auto")
    ):
        return f"auto ({value})"
    is_size = _SIZE_MARK in info.metadata
    if (is_size or _mentions(info.annotation, float)) and isinstance(written, str) and written.strip():
        return written.strip()  # as the file, variable or flag spelled it: 20GiB, 30s, forever
    if is_size and isinstance(value, int):
        return size_text(value)
    return plain(value)


def size_text(size: int) -> str:
    """Bytes in the largest unit that divides them exactly (20GiB, 1TB), else plain bytes."""
    for unit, factor in (*_BINARY, *_DECIMAL):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the Config from defaults < the YAML file at path < CRATEMIRROR_* variables < overrides.

    overrides maps dotted keys ("server.port", "offline", ...) to raw values; None values are skipped so
    argparse results can be passed straight through. env=None means os.environ.
    """
    return load(path, env, overrides).config


def find_config_path(cli_path: str | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    """--config, else $CRATEMIRROR_CONFIG, else ./mirror.yaml if present, else None (built-in defaults)."""
    return find_config(cli_path, env, cwd)
