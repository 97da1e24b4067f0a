"""Configuration: built-in defaults < mirror.yaml < CRATEMIRROR_* environment < command-line flags.

One typed schema (pydantic models, loaded through pydantic-settings) gives the defaults, the accepted forms,
the JSON Schema for editors (`cratemirror config schema`, committed as mirror.schema.json) and the errors.
Key names, defaults and accepted forms are part of the external contract (docs/contract.md, "mirror.yaml").
Every problem is raised as a ConfigError whose message is one line naming the source, the dotted key and the
expected form, so the CLI can print it as-is and exit 2. How the layers are read and how pydantic's errors
become those lines lives in cratemirror.config.load; this module is the schema.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cratemirror.names import DEFAULT_REGISTRY

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "CoordinationConfig",
    "Expected",
    "LoggingConfig",
    "MirrorSchema",
    "PolicyConfig",
    "RegistryConfig",
    "S3Config",
    "ServerConfig",
    "StorageConfig",
    "UpstreamConfig",
    "parse_duration",
    "parse_size",
    "with_source",
]

MiB = 1024**2
GiB = 1024**3
DAY = 86400.0
DEFAULTS_SOURCE = "built-in defaults"
# config.load.load() hands the file and environment layers to Config.settings_customise_sources here.
LOADING: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar(
    "cratemirror_config_layers", default=()
)
ENV_PREFIX = "CRATEMIRROR_"
# Names the config file, so it is not itself a setting (and must not be rejected as an unknown one).
ENV_CONFIG = "CRATEMIRROR_CONFIG"
# The name the default registry has wherever registries are named (URLs, metric labels).
FLEET_EXTRA = "cratemirror[fleet]"


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


# --- the accepted forms: small before-validators shared by the fields ---------------------------------------


@dataclass(frozen=True, slots=True)
class Expected:
    """Field metadata: finishes "expected ..." in the one-line error for a bad value of this key."""

    text: str


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("not a non-empty string")
    return value.strip()


def _whole(value: object) -> object:
    # pydantic's lax int would take True as 1 and 80.0 as 80; a config value means what it says.
    if isinstance(value, bool | float):
        raise ValueError("not a whole number")
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)  # environment variables are always strings
    return value


def _default_workers() -> int:
    # cpu_count() may return None on exotic platforms; one worker always works.
    return os.cpu_count() or 1


def _workers(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return _default_workers()
    return _whole(value)


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _policy_mode(value: object) -> object:
    # YAML 1.1 reads a bare `off` as false; the contract spells the default `mode: off`.
    return "off" if value is False else _lower(value)


def _size(value: object) -> int:
    if not isinstance(value, str | int):
        raise ValueError("not a size")
    return parse_size(value)


def _duration(*, positive: bool = False, forever: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if not isinstance(value, str | int | float):
            raise ValueError("not a duration")
        seconds = parse_duration(value)
        if (positive and seconds == 0) or (not forever and math.isinf(seconds)):
            raise ValueError("duration out of range")
        return seconds

    return parse


def _http_url(value: object) -> str:
    text = _text(value)
    parts = urlsplit(text)  # raises ValueError itself for e.g. a broken IPv6 literal
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    return text


def _base_url(value: object) -> str:
    # Paths are appended to it, so a query or fragment could only produce wrong URLs.
    text = _http_url(value)
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ValueError("a base URL takes no query or fragment")
    return text


def _public_url(value: object) -> str:
    return _base_url(value).rstrip("/")


def _index_url(value: object) -> str:
    # Exactly one trailing "/" so index_url + "<prefix>/<name>" is always right.
    return _base_url(value).rstrip("/") + "/"


def _redis_url(value: object) -> str:
    text = _text(value)
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError("not a redis URL")
    _ = parts.port
    return text


def _path(value: object) -> Path:
    # os.PathLike too, so CLI code can pass Path objects straight through.
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    # Kept as given (relative = relative to the working directory); resolving is the caller's business.
    return Path(_text(value))


def _s3_prefix(value: object) -> object:
    if not isinstance(value, str) or value == "":
        return value
    if value.startswith("/") or any(part in (".", "..") for part in value.split("/")):
        raise ValueError("not a key prefix")
    return value


def _not_reserved(name: str) -> str:
    if name == DEFAULT_REGISTRY:
        raise ValueError("reserved")
    return name


def _network(text: object) -> object:
    """A CIDR (or a lone address) as ipaddress reads it; the text is kept as written."""
    if isinstance(text, str):
        ipaddress.ip_network(text.strip(), strict=False)  # ValueError: not a network
        return text.strip()
    return text


def _matching(regex: str) -> StringConstraints:
    return StringConstraints(strip_whitespace=True, pattern=f"^{regex}$")


# Registry names become URL path segments (/registries/<name>/) and directory names: a short safe slug.
_REGISTRY_NAME = r"[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?"
_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
# S3 bucket naming rules (lowercase, 3..63, no leading/trailing dot or dash).
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
# A key prefix inside the bucket: S3's "safe characters" (and not starting with "/", no "." or ".." part).
_S3_PREFIX = r"[A-Za-z0-9!_.*'()/-]{0,512}"
_ADVISORY_ID = r"RUSTSEC-\d{4}-\d{4}"
# An SPDX licence id (MIT, Apache-2.0, GPL-2.0+, LicenseRef-foo).
_SPDX_ID = r"[A-Za-z0-9][A-Za-z0-9.-]{0,99}\+?"
# "name" or "name@<semver requirement>"; the requirement itself is checked by the policy module.
_CRATE_RULE = r"[A-Za-z][A-Za-z0-9_-]{0,63}(?:@[0-9A-Za-z.,<>=~^* +-]{1,100})?"
# A glob over crate names ("acme-*", "acme_?", "corp-[ab]*"): name characters and fnmatch's * ? [ ] !.
_NAME_GLOB = r"[A-Za-z0-9_*?\[\]!-]{1,64}"

# JSON Schema forms for the values YAML writes as strings (sizes, durations), so editors accept them too.
_SIZE_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*([bB]|[kKmMgGtT]([iI]?[bB])?)?\s*$"},
    ]
}
_DURATION_PATTERN = r"^\s*(\d+(\.\d*)?|\.\d+)\s*([mM][sS]|[sSmMhHdD])?\s*$"
_DURATION_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION_PATTERN}]
}
_FOREVER_SCHEMA = {"anyOf": [*_DURATION_SCHEMA["anyOf"], {"const": "forever"}]}

Text = Annotated[str, BeforeValidator(_text), StringConstraints(min_length=1)]
# Constraints come before the before-validator so the JSON Schema shows them as minimum/maximum.
Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(_whole)]
Count0 = Annotated[int, Field(ge=0), BeforeValidator(_whole)]
Count1 = Annotated[int, Field(ge=1), BeforeValidator(_whole)]


def _yaml_off(value: object) -> object:
    # YAML 1.1 reads a bare `off` as false: `prefetch: off` means the word.
    return "off" if value is False else value


PrefetchSetting = Annotated[Literal["off", "index", "crates"], BeforeValidator(_yaml_off)]
Size = Annotated[int, BeforeValidator(_size), WithJsonSchema(_SIZE_SCHEMA)]
Duration = Annotated[float, BeforeValidator(_duration()), WithJsonSchema(_DURATION_SCHEMA)]
PositiveDuration = Annotated[
    float, BeforeValidator(_duration(positive=True)), WithJsonSchema(_DURATION_SCHEMA)
]
ForeverDuration = Annotated[float, BeforeValidator(_duration(forever=True)), WithJsonSchema(_FOREVER_SCHEMA)]
IndexUrl = Annotated[str, BeforeValidator(_index_url), WithJsonSchema({"type": "string", "format": "uri"})]
HttpUrl = Annotated[str, BeforeValidator(_http_url), WithJsonSchema({"type": "string", "format": "uri"})]
AnyPath = Annotated[Path, BeforeValidator(_path)]
ExistingFile = Annotated[FilePath, BeforeValidator(_path)]
Secret = Annotated[SecretStr, BeforeValidator(_text)]
MIN_INTEGRITY_KEY = 32  # characters: a short secret is a guessable one
MAKE_INTEGRITY_KEY = "python3 -c 'import secrets; print(secrets.token_hex(32))'"


def _long_secret(value: SecretStr) -> SecretStr:
    if len(value.get_secret_value()) < MIN_INTEGRITY_KEY:
        raise ValueError("too short")
    return value


AdvisoryId = Annotated[str, _matching(_ADVISORY_ID)]
LicenseId = Annotated[str, _matching(_SPDX_ID)]
CrateRule = Annotated[str, _matching(_CRATE_RULE)]
NameGlob = Annotated[str, _matching(_NAME_GLOB)]
Network = Annotated[str, BeforeValidator(_network)]
RegistryName = Annotated[str, _matching(_REGISTRY_NAME), AfterValidator(_not_reserved)]


def _cross_field(key: str, expected: str) -> PydanticCustomError:
    """A check across keys: `key` (relative to the model that raises it) is the one the message names."""
    return PydanticCustomError("config", "{key}: expected {expected}", {"key": key, "expected": expected})


def _whole_config(info: ValidationInfo) -> bool:
    # One layer (the file, the environment, the flags) is validated alone first, so that the bad value is
    # blamed on where it came from; checks across keys wait for the merged whole.
    return not (isinstance(info.context, dict) and info.context.get("partial"))


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=True, hide_input_in_errors=True
    )


# --- the schema ------------------------------------------------------------------------------------------


class ServerConfig(_Section):
    host: Annotated[Text, Expected("a host name or IP address")] = "127.0.0.1"
    """Address to listen on."""
    port: Annotated[Port, Expected("an integer port 1..65535")] = 8080
    """TCP port to listen on."""
    workers: Annotated[
        int,
        BeforeValidator(_workers),
        Field(ge=1),
        WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}),
        Expected("a positive integer or auto"),
    ] = Field(default_factory=_default_workers)
    """Processes sharing the port (SO_REUSEPORT); auto = number of CPUs."""
    public_url: Annotated[
        Annotated[str, BeforeValidator(_public_url)] | None,
        Expected("an http(s) URL like https://crates.example.com, or null"),
    ] = None
    """Base URL clients use; null = from the request (Host, X-Forwarded-Proto, X-Forwarded-Host)."""
    max_connections: Annotated[Count1, Expected("a whole number >= 1")] = 4096
    """Open client connections per worker; beyond it the oldest idle ones are closed first."""
    idle_timeout: Annotated[PositiveDuration, Expected("a positive duration like 30s")] = 30.0
    """Idle this long (no complete request head, or nothing of its answer read): closed."""
    tls_cert: Annotated[
        ExistingFile | None, Expected("a path to an existing PEM certificate file, or null")
    ] = None
    """PEM certificate (chain) to serve https directly; a fleet terminates TLS in its front instead."""
    tls_key: Annotated[ExistingFile | None, Expected("a path to an existing PEM key file, or null")] = None
    """PEM private key for tls_cert."""
    trusted_proxies: Annotated[
        tuple[Network, ...], Expected("a list of CIDRs like 10.0.0.0/8 or addresses like ::1")
    ] = ("127.0.0.1/8", "::1/128")
    """Only from these are X-Forwarded-* honoured; the client is the right-most untrusted X-Forwarded-For."""
    shutdown_timeout: Annotated[Duration, Expected("a duration like 10s")] = 10.0
    """On SIGTERM: stop accepting, finish answers in flight within this long, then exit."""

    @model_validator(mode="after")
    def _tls_pair(self, info: ValidationInfo) -> ServerConfig:
        if _whole_config(info) and (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise _cross_field(missing, "a path to a PEM file when the other of tls_cert and tls_key is set")
        return self


class UpstreamConfig(_Section):
    index_url: Annotated[IndexUrl, Expected("an http(s) URL like https://index.crates.io/")] = (
        "https://index.crates.io/"
    )
    """Sparse index root; its config.json gives the download template."""
    timeout: Annotated[PositiveDuration, Expected("a positive duration like 30s")] = 30.0
    """Per attempt: connect, first byte, or a stall mid-body."""
    retries: Annotated[Count0, Expected("a whole number >= 0")] = 3
    """On connect errors, timeouts, 5xx and 429 (Retry-After honoured); only before a byte is sent."""
    max_connections: Annotated[Count1, Expected("a whole number >= 1")] = 32
    """Concurrent upstream connections, per worker."""
    user_agent: Annotated[Text | None, Expected("a non-empty string, or null")] = None
    """Default "cratemirror/<version> (+<project url>)"."""
    proxy: Annotated[HttpUrl | None, Expected("an http(s) proxy URL like http://proxy:3128, or null")] = None
    """Outbound HTTP proxy; HTTPS_PROXY / HTTP_PROXY / NO_PROXY are honoured too."""
    ca_bundle: Annotated[ExistingFile | None, Expected("a path to an existing PEM file, or null")] = None
    """Extra PEM CA file to trust."""
    max_index_size: Annotated[Size, Field(ge=1), Expected("a positive size like 64MiB")] = 64 * MiB
    """A larger index file is refused (502) and not stored."""
    max_crate_size: Annotated[Size, Field(ge=1), Expected("a positive size like 1GiB")] = GiB
    """A larger .crate is refused (502) and not stored."""
    prefetch: Annotated[PrefetchSetting, Expected("off, index or crates")] = "index"
    """When an index file first arrives, fetch what cargo will ask for next: index = the index files of
    its newest release's dependencies; crates = also the .crate of the version cargo's resolver picks
    for each (a lockfile pinning an older one makes that download a waste); off = nothing."""
    api_url: Annotated[HttpUrl | None, Expected("an http(s) URL like https://crates.io, or null")] = (
        "https://crates.io"
    )
    """The registry's web API, for `cargo search` through the mirror (cached a minute); null = not proxied."""


class CacheConfig(_Section):
    dir: Annotated[AnyPath, Expected("a directory path like ./cache")] = Path("./cache")
    """Where crates, index files and their metadata are kept."""
    max_size: Annotated[Size, Expected("a size like 20GiB")] = 20 * GiB
    """Crates are evicted least-recently-used beyond this."""
    index_ttl: Annotated[Duration, Expected("a duration like 5m")] = 30.0
    """An index file younger than this is served without asking upstream."""
    stale_while_revalidate: Annotated[Duration, Expected("a duration like 5m")] = 300.0
    """Past index_ttl but within this: answer from cache, revalidate behind the answer (RFC 5861)."""
    negative_ttl: Annotated[Duration, Expected("a duration like 1m")] = 60.0
    """How long an upstream 404 is remembered."""
    stale_if_error: Annotated[ForeverDuration, Expected("a duration like 7d, forever, or 0")] = 7 * DAY
    """How long past its TTL an index file may still be served while upstream fails (forever, 0 disables)."""
    memory_size: Annotated[Size, Expected("a size like 64MiB, or 0")] = 64 * MiB
    """Per worker: hot index files kept in memory as prepared answers (0 = none)."""


class LoggingConfig(_Section):
    level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"],
        BeforeValidator(_lower),
        Expected("one of debug, info, warning, error, critical"),
    ] = "info"
    """Log level."""
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower), Expected("one of text, json")] = (
        "text"
    )
    """text | json (one object per line)."""


class S3Config(_Section):
    bucket: Annotated[
        Annotated[str, _matching(_BUCKET)] | None,
        Expected("an S3 bucket name like crates-cache, or null"),
    ] = None
    """Required with backend s3."""
    prefix: Annotated[
        str,
        Field(pattern=f"^{_S3_PREFIX}$"),
        BeforeValidator(_s3_prefix),
        Expected("a key prefix like mirror/ (S3-safe characters, no leading /, no . or .. parts)"),
    ] = ""
    """Key prefix inside the bucket."""
    endpoint_url: Annotated[HttpUrl | None, Expected("an http(s) URL like http://minio:9000, or null")] = None
    """An S3-compatible endpoint (MinIO, Ceph RGW, R2, ...); null = AWS."""
    region: Annotated[Text | None, Expected("a region name like eu-west-1, or null")] = None
    """Region of the bucket."""
    access_key_id: Annotated[Text | None, Expected("an access key id, or null")] = None
    """null = the standard AWS credential chain (AWS_* variables, profile, instance role)."""
    secret_access_key: Annotated[Secret | None, Expected("a secret access key, or null")] = None
    """Secret for access_key_id; never printed."""
    serve: Annotated[
        Literal["proxy", "redirect"], BeforeValidator(_lower), Expected("one of proxy, redirect")
    ] = "proxy"
    """proxy: the mirror streams the bytes | redirect: 302 to a short-lived presigned URL."""
    integrity_key: Annotated[
        Annotated[Secret, AfterValidator(_long_secret)] | None,
        Expected(f"a secret of at least {MIN_INTEGRITY_KEY} characters, or null"),
    ] = None
    """Required with backend s3: a secret shared by the replicas, never stored in the bucket; what a
    replica reads from the bucket is authenticated with it (HMAC-SHA256)."""
    timeout: Annotated[PositiveDuration, Expected("a positive duration like 3s")] = 3.0
    """Per bucket call: connect, an answer, or a stall mid-body; past it the bucket is degraded."""

    def secret_key(self) -> str | None:
        """The secret access key in plain text, for the S3 client only."""
        return None if self.secret_access_key is None else self.secret_access_key.get_secret_value()

    def integrity_secret(self) -> bytes | None:
        """The integrity key's bytes, for the object MACs only."""
        return None if self.integrity_key is None else self.integrity_key.get_secret_value().encode()


class StorageConfig(_Section):
    backend: Annotated[Literal["local", "s3"], BeforeValidator(_lower), Expected("one of local, s3")] = (
        "local"
    )
    """local | s3: where crates, index files and their metadata are kept."""
    s3: S3Config = Field(default_factory=S3Config)
    """The bucket used with backend s3."""

    @model_validator(mode="after")
    def _bucket_for_s3(self, info: ValidationInfo) -> StorageConfig:
        if _whole_config(info) and self.backend == "s3" and self.s3.bucket is None:
            raise _cross_field("s3.bucket", "an S3 bucket name when storage.backend is s3")
        return self


class CoordinationConfig(_Section):
    redis_url: Annotated[
        Annotated[str, BeforeValidator(_redis_url)] | None,
        Expected("a redis URL like redis://host:6379/0, or null"),
    ] = None
    """redis://host:6379/0: one upstream fetch per key across all replicas."""
    timeout: Annotated[PositiveDuration, Expected("a positive duration like 1s")] = 1.0
    """Per Redis call (connect or answer); past it the replica coalesces on its own until Redis answers."""


class AuthConfig(_Section):
    required: Annotated[bool, Expected("true or false")] = False
    """true: config.json, index files and downloads need a token (cargo RFC 3139)."""
    tokens_file: Annotated[AnyPath, Expected("a file path like ./tokens.yaml")] = Path("./tokens.yaml")
    """Written by `cratemirror token`; holds hashes, never the tokens themselves."""
    protect_status: Annotated[bool, Expected("true or false")] = False
    """true: / and /metrics need a token as well (/healthz and /readyz never do)."""


class RegistryConfig(_Section):
    """One more upstream registry, served under /registries/<name>/."""

    index_url: Annotated[
        IndexUrl, Expected("an http(s) URL like https://kellnr.example/api/v1/crates/index/")
    ]
    """Sparse index root of the registry (required)."""
    token: Annotated[Secret | None, Expected("a token string, or null")] = None
    """Sent upstream as Authorization; never printed."""
    token_env: Annotated[
        Annotated[str, _matching(_ENV_NAME)] | None,
        Expected("an environment variable name like KELLNR_TOKEN, or null"),
    ] = None
    """Name of the environment variable holding the token."""
    index_ttl: Annotated[Duration | None, Expected("a duration like 30s, or null")] = None
    """Overrides cache.index_ttl."""
    negative_ttl: Annotated[Duration | None, Expected("a duration like 1m, or null")] = None
    """Overrides cache.negative_ttl."""
    stale_if_error: Annotated[ForeverDuration | None, Expected("a duration like 7d, forever, 0, or null")] = (
        None
    )
    """Overrides cache.stale_if_error."""

    @model_validator(mode="after")
    def _one_token(self) -> RegistryConfig:
        if self.token is not None and self.token_env is not None:
            raise _cross_field("token_env", "null when token is set (give token or token_env, not both)")
        return self

    def secret_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The token to send upstream in plain text: `token`, else the value of the `token_env` variable."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_env is not None:
            return (os.environ if environ is None else environ).get(self.token_env) or None
        return None


class PolicyConfig(_Section):
    mode: Annotated[
        Literal["off", "report", "enforce"],
        BeforeValidator(_policy_mode),
        Expected("one of off, report, enforce"),
    ] = "off"
    """off | report (log and count what would be blocked) | enforce."""
    advisory_db: Annotated[AnyPath | None, Expected("a path to a RustSec advisory-db checkout, or null")] = (
        None
    )
    """A RustSec advisory-db checkout (crates/<name>/RUSTSEC-*.md); re-read when it changes."""
    advisories: Annotated[Literal["deny", "warn"], BeforeValidator(_lower), Expected("one of deny, warn")] = (
        "deny"
    )
    """A version affected by an advisory that is not withdrawn: deny | warn."""
    informational: Annotated[
        tuple[Annotated[Literal["unmaintained", "unsound", "notice"], BeforeValidator(_lower)], ...],
        Expected("a list of unmaintained, unsound, notice"),
    ] = ()
    """Also act on these informational advisories."""
    ignore: Annotated[tuple[AdvisoryId, ...], Expected("a list of advisory ids like RUSTSEC-2019-0001")] = ()
    """Advisory ids never acted on."""
    licenses: Annotated[tuple[LicenseId, ...], Expected("a list of SPDX licence ids like MIT")] = ()
    """Allowed SPDX ids; empty = no licence rule; checked from the crate's Cargo.toml."""
    deny: Annotated[tuple[CrateRule, ...], Expected('a list of "name" or "name@<semver requirement>"')] = ()
    """Crates refused: "name" or "name@<semver requirement>"."""
    allow: Annotated[tuple[CrateRule, ...], Expected('a list of "name" or "name@<semver requirement>"')] = ()
    """Crates that pass whatever else says: "name" or "name@<semver requirement>"."""
    min_release_age: Annotated[Duration, Expected("a duration like 3d, or 0")] = 0.0
    """A version younger than this is held back like a blocked one (pubtime, else first seen); 0 = off."""
    cooldown_exempts_fixes: Annotated[bool, Expected("true or false")] = True
    """The patched release of an advisory against the previous version is never held back."""
    internal_names: Annotated[tuple[NameGlob, ...], Expected('a list of crate-name globs like "acme-*"')] = ()
    """Globs, e.g. "acme-*": on crates.io these answer 404 without asking upstream (- and _ alike)."""


class AuditConfig(_Section):
    retention: Annotated[Duration, Expected("a duration like 90d, or 0")] = 90 * DAY
    """Every download and refusal is recorded (who, what, when, result) and kept this long; 0 = off."""


class ToolchainsConfig(_Section):
    upstream: Annotated[
        Annotated[str, BeforeValidator(_public_url)] | None,
        Expected("an http(s) URL like https://static.rust-lang.org, or null"),
    ] = "https://static.rust-lang.org"
    """rustup's dist server the /toolchains routes pull through; null turns the routes off."""
    manifest_ttl: Annotated[Duration, Expected("a duration like 10m")] = 600.0
    """Moving names (channel-rust-{stable,beta,nightly,X.Y}.toml, release-stable.toml, rustup/dist/*) are
    revalidated after this; dated files are immutable."""
    signing_key: Annotated[
        ExistingFile | None, Expected("a path to an existing OpenPGP public key file, or null")
    ] = None
    """The OpenPGP public key that must have signed every channel manifest (.asc); null = the Rust release
    key shipped with cratemirror (108F 6620 5EAE B0AA A8DD 5E1C 85AB 96E6 FA1B E5FE)."""
    max_size: Annotated[Size, Expected("a size like 50GiB")] = 50 * GiB
    """Toolchain files are evicted least-recently-used beyond this."""


# Which optional modules a setting needs; without them start-up stops naming the extra that brings them.
FLEET_MODULES: dict[str, str] = {"storage.backend": "aiobotocore", "coordination.redis_url": "redis"}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


_WHOLE = ConfigDict(
    frozen=True,
    extra="forbid",
    use_attribute_docstrings=True,
    hide_input_in_errors=True,
    title="cratemirror mirror.yaml",
)


class MirrorSchema(BaseModel):
    """The whole mirror.yaml (contract.md), as one model. Config adds loading it (pydantic-settings)."""

    model_config = _WHOLE

    server: ServerConfig = Field(default_factory=ServerConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    offline: Annotated[bool, Expected("true or false")] = False
    """Never contact upstream; serve only what is cached."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    coordination: CoordinationConfig = Field(default_factory=CoordinationConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    registries: Annotated[
        dict[RegistryName, RegistryConfig],
        Expected("a mapping of registry names to registry settings"),
    ] = Field(
        default_factory=dict,
        json_schema_extra={
            "propertyNames": {"pattern": f"^{_REGISTRY_NAME}$", "not": {"const": DEFAULT_REGISTRY}}
        },
    )
    """More upstream registries, each under /registries/<name>/ (name: lowercase letters, digits, - and _)."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    toolchains: ToolchainsConfig = Field(default_factory=ToolchainsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator(
        "server",
        "upstream",
        "cache",
        "logging",
        "storage",
        "coordination",
        "auth",
        "policy",
        "audit",
        "registries",
        "toolchains",
        mode="before",
    )
    @classmethod
    def _empty_section(cls, value: object) -> object:
        # "server:" with every key commented out is an empty section, not an error.
        return {} if value is None else value

    @model_validator(mode="after")
    def _fleet_extra(self, info: ValidationInfo) -> MirrorSchema:
        if not _whole_config(info):
            return self
        needed = {
            "storage.backend": self.storage.backend == "s3",
            "coordination.redis_url": self.coordination.redis_url is not None,
        }
        for key, used in needed.items():
            if used and not _installed(FLEET_MODULES[key]):
                raise _cross_field(
                    key,
                    f"the extra {FLEET_EXTRA} to be installed (pip install '{FLEET_EXTRA}') for this value",
                )
        return self

    @model_validator(mode="after")
    def _integrity_key(self, info: ValidationInfo) -> MirrorSchema:
        # After _fleet_extra: without the extra, naming it is the first thing to say.
        if _whole_config(info) and self.storage.backend == "s3" and self.storage.s3.integrity_key is None:
            expected = "a secret shared by the replicas when storage.backend is s3"
            raise _cross_field("storage.s3.integrity_key", f"{expected} (make one: {MAKE_INTEGRITY_KEY})")
        return self


class Config(MirrorSchema, BaseSettings):
    """The mirror's configuration. Built directly it is the defaults plus its keyword arguments;
    load_config reads the file and the environment too. `source` names the file it was read from."""

    # BaseSettings would reset these; the schema's own settings are restated last so they win.
    model_config = SettingsConfigDict(**_WHOLE, case_sensitive=True)  # type: ignore[typeddict-item]

    _source: str = PrivateAttr(DEFAULTS_SOURCE)

    @property
    def source(self) -> str:
        """The config file read, or "built-in defaults"."""
        return self._source

    def __hash__(self) -> int:
        # registries is a dict; everything else is hashable already.
        values = tuple(
            tuple(sorted(value.items())) if isinstance(value, dict) else value
            for value in self.__dict__.values()
        )
        return hash((values, self._source))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Built directly, a Config is the defaults plus its keyword arguments: never os.environ by surprise.
        # load_config hands in the file and environment layers (highest priority first after the flags).
        return (init_settings, *(LOADING.get() if settings_cls is Config else ()))


def with_source(config: Config, source: str) -> Config:
    """The same values, read from `source`."""
    copy = config.model_copy()
    copy._source = source
    return copy
