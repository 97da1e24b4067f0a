"""Tests for the config schema: parsing, layering (defaults < file < env < flags) and error messages."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from cratemirror.config import schema as config_module
from cratemirror.config.load import effective_values, find_config_path, load, load_config, schema_keys
from cratemirror.config.schema import (
    AuthConfig,
    CacheConfig,
    Config,
    ConfigError,
    LoggingConfig,
    PolicyConfig,
    RegistryConfig,
    S3Config,
    ServerConfig,
    StorageConfig,
    UpstreamConfig,
    parse_duration,
    parse_size,
    with_source,
)

INTEGRITY_KEY = "a-fleet-secret-of-at-least-32-characters"
REPO_MIRROR_YAML = Path(__file__).resolve().parents[2] / "mirror.yaml"
GiB = 1024**3
NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "mirror.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text), env=NO_ENV)


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=NO_ENV)
    return str(info.value)


# --- parse_size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (512, 512),
        ("512", 512),
        ("0", 0),
        ("100B", 100),
        ("100b", 100),
        ("512KiB", 512 * 1024),
        ("512kib", 512 * 1024),
        ("512KIB", 512 * 1024),
        ("1K", 1000),
        ("1KB", 1000),
        ("1kb", 1000),
        ("10MB", 10_000_000),
        ("10M", 10_000_000),
        ("10MiB", 10 * 1024**2),
        ("20GiB", 20 * GiB),
        ("20gib", 20 * GiB),
        ("1GB", 10**9),
        ("1.5GiB", 3 * GiB // 2),
        ("0.1TB", 10**11),
        ("1TB", 10**12),
        ("1T", 10**12),
        ("1TiB", 1024**4),
        (" 20 GiB ", 20 * GiB),
        (".5KiB", 512),
        ("1.1KiB", 1126),  # a fraction of a byte is dropped
    ],
)
def test_parse_size_good(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "lots",
        "GiB",
        "-1",
        "-1GiB",
        "1.5",
        "0.5B",
        "1 XB",
        "1Ki",
        "1iB",
        "1GiBs",
        "1e3",
        "nan",
        "inf",
        "1,5GiB",
    ],
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("value", [-1, True, False, 1.5, None, [1]])
def test_parse_size_bad_types(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)  # type: ignore[arg-type]


# --- parse_duration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("500ms", 0.5),
        ("100ms", 0.1),
        ("30s", 30.0),
        ("30S", 30.0),
        ("5m", 300.0),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        ("7d", 7 * 86400.0),
        (" 7 d ", 7 * 86400.0),
        ("forever", math.inf),
        ("Forever", math.inf),
    ],
)
def test_parse_duration_good(text: str | int | float, expected: float) -> None:
    result = parse_duration(text)
    assert isinstance(result, float)
    assert result == expected


@pytest.mark.parametrize(
    "text", ["", "soon", "-5s", "-1", "5 minutes", "5w", "1h30m", "nan", "inf", "s", "5ms5"]
)
def test_parse_duration_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5, math.nan, True, None, 10**400])
def test_parse_duration_bad_values(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)  # type: ignore[arg-type]


# --- defaults and the repo's mirror.yaml -----------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(None, env=NO_ENV)
    assert config == Config()
    assert config.source == "built-in defaults"
    assert config.server == ServerConfig(
        host="127.0.0.1", port=8080, workers=os.cpu_count() or 1, public_url=None
    )
    assert config.upstream == UpstreamConfig(
        index_url="https://index.crates.io/",
        timeout=30.0,
        retries=3,
        max_connections=32,
        user_agent=None,
        proxy=None,
        ca_bundle=None,
    )
    assert config.cache == CacheConfig(
        dir=Path("./cache"), max_size=20 * GiB, index_ttl=30.0, negative_ttl=60.0, stale_if_error=7 * 86400.0
    )
    assert config.offline is False
    assert config.logging == LoggingConfig(level="info", format="text")


def test_repo_mirror_yaml_equals_defaults() -> None:
    config = load_config(REPO_MIRROR_YAML, env=NO_ENV)
    assert config.source == str(REPO_MIRROR_YAML)
    assert with_source(config, "built-in defaults") == load_config(None, env=NO_ENV)


def test_repo_mirror_yaml_lists_every_key() -> None:
    # Every key is spelled out (and commented) so the file doubles as documentation.
    lines = REPO_MIRROR_YAML.read_text(encoding="utf-8").splitlines()
    sections: list[tuple[int, str]] = []  # (indent, name) of the enclosing sections
    seen = set()
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key = line.split(":", 1)[0].strip()
        while sections and sections[-1][0] >= indent:
            sections.pop()
        dotted = ".".join([name for _, name in sections] + [key])
        if line.split("#", 1)[0].rstrip().endswith(":"):
            sections.append((indent, key))
        else:
            seen.add(dotted)
            assert "#" in line, f"key {dotted} has no comment"
    assert seen == {dotted for dotted, _ in schema_keys()}


# Every key of contract.md's mirror.yaml block: the schema must have exactly these.
CONTRACT_KEYS = {
    *(
        f"server.{k}"
        for k in [
            "host",
            "port",
            "workers",
            "public_url",
            "max_connections",
            "idle_timeout",
            "tls_cert",
            "tls_key",
            "trusted_proxies",
            "shutdown_timeout",
        ]
    ),
    *(
        f"upstream.{k}"
        for k in [
            "index_url",
            "timeout",
            "retries",
            "max_connections",
            "user_agent",
            "proxy",
            "ca_bundle",
            "max_index_size",
            "max_crate_size",
            "prefetch",  # an addition this round (README); contract.md is read-only here
            "api_url",
        ]
    ),
    *(
        f"cache.{k}"
        for k in [
            "dir",
            "max_size",
            "index_ttl",
            "stale_while_revalidate",
            "negative_ttl",
            "stale_if_error",
            "memory_size",
        ]
    ),
    "offline",
    "logging.level",
    "logging.format",
    "storage.backend",
    *(
        f"storage.s3.{k}"
        for k in [
            "bucket",
            "prefix",
            "endpoint_url",
            "region",
            "access_key_id",
            "secret_access_key",
            "serve",
            "integrity_key",
        ]
    ),
    "storage.s3.timeout",  # issue 22: every bucket call bounded
    "coordination.redis_url",
    "coordination.timeout",  # issue 22: every Redis call bounded
    "auth.required",
    "auth.tokens_file",
    "auth.protect_status",
    "registries",
    *(
        f"policy.{k}"
        for k in [
            "mode",
            "advisory_db",
            "advisories",
            "informational",
            "ignore",
            "licenses",
            "deny",
            "allow",
            "min_release_age",
            "cooldown_exempts_fixes",
            "internal_names",
        ]
    ),
    *(f"toolchains.{k}" for k in ["upstream", "manifest_ttl", "signing_key", "max_size"]),
    "audit.retention",
}


def test_schema_has_every_contract_key() -> None:
    assert {dotted for dotted, _ in schema_keys()} == CONTRACT_KEYS
    assert set(RegistryConfig.model_fields) == {
        "index_url",
        "token",
        "token_env",
        "index_ttl",
        "negative_ttl",
        "stale_if_error",
    }


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert with_source(load_text(tmp_path, ""), "built-in defaults") == Config()


def test_comment_only_file_and_empty_sections_are_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "# nothing\nserver:\n  # port: 1\ncache:\n")
    assert with_source(config, "built-in defaults") == Config()


# --- every key, good values ------------------------------------------------------------------------------


def test_all_keys_from_file(tmp_path: Path) -> None:
    ca = write(tmp_path, "-----BEGIN CERTIFICATE-----\n", name="ca.pem")
    config = load_text(
        tmp_path,
        f"""
server:
  host: 0.0.0.0
  port: 9000
  workers: 4
  public_url: https://crates.example.com/
upstream:
  index_url: http://localhost:8000/index
  timeout: 2.5
  retries: 0
  max_connections: 1
  user_agent: my-agent/1.0
  proxy: http://proxy:3128
  ca_bundle: {ca}
cache:
  dir: relative/cache
  max_size: 1.5GiB
  index_ttl: 0
  negative_ttl: 500ms
  stale_if_error: forever
offline: true
logging:
  level: DEBUG
  format: JSON
""",
    )
    assert config.server == ServerConfig(
        host="0.0.0.0", port=9000, workers=4, public_url="https://crates.example.com"
    )
    assert config.upstream == UpstreamConfig(
        index_url="http://localhost:8000/index/",
        timeout=2.5,
        retries=0,
        max_connections=1,
        user_agent="my-agent/1.0",
        proxy="http://proxy:3128",
        ca_bundle=ca,
    )
    assert config.cache == CacheConfig(
        dir=Path("relative/cache"),
        max_size=3 * GiB // 2,
        index_ttl=0.0,
        negative_ttl=0.5,
        stale_if_error=math.inf,
    )
    assert not config.cache.dir.is_absolute()  # kept as given, not resolved
    assert config.offline is True
    assert config.logging == LoggingConfig(level="debug", format="json")


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("auto", os.cpu_count() or 1),
        ("AUTO", os.cpu_count() or 1),
        ("1", 1),
        ("'3'", 3),
    ],
)
def test_workers(tmp_path: Path, yaml_value: str, expected: int) -> None:
    assert load_text(tmp_path, f"server:\n  workers: {yaml_value}\n").server.workers == expected


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("https://index.crates.io", "https://index.crates.io/"),
        ("https://index.crates.io/", "https://index.crates.io/"),
        ("https://index.crates.io///", "https://index.crates.io/"),
        ("http://mirror.local:8080/sub/dir", "http://mirror.local:8080/sub/dir/"),
    ],
)
def test_index_url_normalised(tmp_path: Path, yaml_value: str, expected: str) -> None:
    assert load_text(tmp_path, f"upstream:\n  index_url: {yaml_value}\n").upstream.index_url == expected


def test_dataclasses_normalise_urls_when_built_directly() -> None:
    assert UpstreamConfig(index_url="https://x.example").index_url == "https://x.example/"
    assert ServerConfig(public_url="https://x.example/m/").public_url == "https://x.example/m"


@pytest.mark.parametrize("value", ["false", "no", "off", "0", "False"])
def test_offline_false_forms(tmp_path: Path, value: str) -> None:
    assert load_text(tmp_path, f"offline: {value}\n").offline is False


@pytest.mark.parametrize("value", ["true", "yes", "on", "1", "True", "'yes'"])
def test_offline_true_forms(tmp_path: Path, value: str) -> None:
    assert load_text(tmp_path, f"offline: {value}\n").offline is True


def test_stale_if_error_zero_disables(tmp_path: Path) -> None:
    assert load_text(tmp_path, "cache:\n  stale_if_error: 0\n").cache.stale_if_error == 0.0


def test_nullable_keys_accept_null(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "server:\n  public_url: null\nupstream:\n  user_agent: ~\n  proxy: null\n  ca_bundle: null\n",
    )
    assert config.server.public_url is None
    assert (config.upstream.user_agent, config.upstream.proxy, config.upstream.ca_bundle) == (
        None,
        None,
        None,
    )


def test_duplicate_key_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, "server:\n  port: 1\n  port: 2\n")
    assert message.startswith(f"{tmp_path / 'mirror.yaml'}: not valid YAML: found duplicate key 'port'")
    assert "line 3" in message


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    # A key given next to a "<<" merge is an override, not a duplicate.
    config = load_text(tmp_path, "server:\n  <<: {port: 9001, host: a.example}\n  port: 9002\n")
    assert (config.server.host, config.server.port) == ("a.example", 9002)


# --- every key, bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected", "got"),
    [
        ("server:\n  host: ''\n", "server.host", "a host name or IP address", "''"),
        ("server:\n  host: 8080\n", "server.host", "a host name or IP address", "8080"),
        ("server:\n  port: 0\n", "server.port", "an integer port 1..65535", "0"),
        ("server:\n  port: 65536\n", "server.port", "an integer port 1..65535", "65536"),
        ("server:\n  port: http\n", "server.port", "an integer port 1..65535", "'http'"),
        ("server:\n  port: 80.5\n", "server.port", "an integer port 1..65535", "80.5"),
        ("server:\n  port: true\n", "server.port", "an integer port 1..65535", "True"),
        ("server:\n  port: null\n", "server.port", "an integer port 1..65535", "None"),
        ("server:\n  workers: 0\n", "server.workers", "a positive integer or auto", "0"),
        ("server:\n  workers: many\n", "server.workers", "a positive integer or auto", "'many'"),
        ("server:\n  public_url: crates.example.com\n", "server.public_url", "an http(s) URL", None),
        ("server:\n  public_url: ftp://x.example\n", "server.public_url", "an http(s) URL", None),
        ("server:\n  public_url: https://x.example/?a=1\n", "server.public_url", "an http(s) URL", None),
        (
            "upstream:\n  index_url: sparse+https://index.crates.io/\n",
            "upstream.index_url",
            "an http(s)",
            None,
        ),
        ("upstream:\n  index_url: https://\n", "upstream.index_url", "an http(s) URL", None),
        ("upstream:\n  index_url: https://x:port/\n", "upstream.index_url", "an http(s) URL", None),
        ("upstream:\n  timeout: 0\n", "upstream.timeout", "a positive duration like 30s", "0"),
        ("upstream:\n  timeout: forever\n", "upstream.timeout", "a positive duration like 30s", "'forever'"),
        ("upstream:\n  timeout: soon\n", "upstream.timeout", "a positive duration like 30s", "'soon'"),
        ("upstream:\n  retries: -1\n", "upstream.retries", "a whole number >= 0", "-1"),
        ("upstream:\n  retries: 1.5\n", "upstream.retries", "a whole number >= 0", "1.5"),
        ("upstream:\n  max_connections: 0\n", "upstream.max_connections", "a whole number >= 1", "0"),
        ("upstream:\n  user_agent: ''\n", "upstream.user_agent", "a non-empty string", "''"),
        ("upstream:\n  user_agent: 1.0\n", "upstream.user_agent", "a non-empty string", "1.0"),
        ("upstream:\n  proxy: socks5://p:1080\n", "upstream.proxy", "an http(s) proxy URL", None),
        (
            "upstream:\n  ca_bundle: /no/such/ca.pem\n",
            "upstream.ca_bundle",
            "a path to an existing PEM file",
            None,
        ),
        ("cache:\n  dir: ''\n", "cache.dir", "a directory path", "''"),
        ("cache:\n  dir: [a, b]\n", "cache.dir", "a directory path", "['a', 'b']"),
        ("cache:\n  max_size: lots\n", "cache.max_size", "a size like 20GiB", "'lots'"),
        ("cache:\n  max_size: -1\n", "cache.max_size", "a size like 20GiB", "-1"),
        ("cache:\n  max_size: 1.5\n", "cache.max_size", "a size like 20GiB", "1.5"),
        ("cache:\n  index_ttl: -5s\n", "cache.index_ttl", "a duration like 5m", "'-5s'"),
        ("cache:\n  index_ttl: forever\n", "cache.index_ttl", "a duration like 5m", "'forever'"),
        ("cache:\n  negative_ttl: 1 week\n", "cache.negative_ttl", "a duration like 1m", "'1 week'"),
        ("cache:\n  stale_if_error: always\n", "cache.stale_if_error", "a duration like 7d", "'always'"),
        ("cache:\n  memory_size: plenty\n", "cache.memory_size", "a size like 64MiB, or 0", "'plenty'"),
        ("offline: maybe\n", "offline", "true or false", "'maybe'"),
        ("offline: 2\n", "offline", "true or false", "2"),
        ("offline: null\n", "offline", "true or false", "None"),
        (
            "logging:\n  level: verbose\n",
            "logging.level",
            "one of debug, info, warning, error, critical",
            None,
        ),
        ("logging:\n  format: xml\n", "logging.format", "one of text, json", "'xml'"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, key: str, expected: str, got: str | None) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'mirror.yaml'}: {key}: expected {expected}")
    if got is not None:
        assert message.endswith(f", got {got}")
    assert "\n" not in message


def test_message_format_matches_contract_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "cache:\n  max_size: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(Path("mirror.yaml"), env=NO_ENV)
    assert str(info.value) == "mirror.yaml: cache.max_size: expected a size like 20GiB, got 'lots'"


def test_long_values_are_shortened_in_messages(tmp_path: Path) -> None:
    message = error_of(tmp_path, f"logging:\n  level: {'x' * 500}\n")
    assert message.endswith("...")
    assert len(message) < 250


# --- unknown keys, bad structure, bad YAML ---------------------------------------------------------------


def test_unknown_key_names_dotted_key_and_allowed_keys(tmp_path: Path) -> None:
    message = error_of(tmp_path, "server:\n  prot: 9000\n")
    assert message == (
        f"{tmp_path / 'mirror.yaml'}: server.prot: unknown key (did you mean 'port'?); "
        "allowed keys: host, port, workers, public_url, max_connections, idle_timeout, tls_cert, tls_key, "
        "trusted_proxies, shutdown_timeout"
    )


def test_unknown_section(tmp_path: Path) -> None:
    message = error_of(tmp_path, "database:\n  url: x\n")
    assert message == (
        f"{tmp_path / 'mirror.yaml'}: database: unknown key; "
        "allowed keys: server, upstream, cache, offline, logging, storage, coordination, auth, registries, "
        "policy, toolchains, audit"
    )


def test_unknown_section_with_suggestion(tmp_path: Path) -> None:
    assert "unknown key (did you mean 'upstream'?)" in error_of(tmp_path, "upstreem:\n  retries: 1\n")


def test_section_must_be_mapping(tmp_path: Path) -> None:
    message = error_of(tmp_path, "server: 8080\n")
    assert message == f"{tmp_path / 'mirror.yaml'}: server: expected a mapping of server settings, got 8080"


@pytest.mark.parametrize("text", ["- server\n- cache\n", "just a string\n", "42\n"])
def test_top_level_must_be_mapping(tmp_path: Path, text: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'mirror.yaml'}: expected a mapping with keys server, upstream")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("server:\n  port: 8080\n   host: x: y\n", 3),
        ("server:\n  host: [unclosed\n", 3),
        ("cache:\n\tdir: x\n", 2),
        ("a: 1\n---\nb: 2\n", 2),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, line: int) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'mirror.yaml'}: not valid YAML: ")
    assert f"line {line}" in message
    assert "\n" not in message


def test_second_document_reason_reads_whole(tmp_path: Path) -> None:
    message = error_of(tmp_path, "a: 1\n---\nb: 2\n")
    assert message.endswith(
        ": not valid YAML: expected a single document in the stream "
        "but found another document at line 2, column 1"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_bytes(b"server:\n  host: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: not UTF-8"):
        load_config(path, env=NO_ENV)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env=NO_ENV)  # a directory
    assert str(info.value).startswith(f"{tmp_path}: cannot read: ")


def test_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_bytes("\ufeffserver:\n  port: 9000\n".encode())
    assert load_config(path, env=NO_ENV).server.port == 9000


# --- environment -----------------------------------------------------------------------------------------


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 8000\n  host: 0.0.0.0\ncache:\n  dir: /from/file\n")
    config = load_config(
        path,
        env={
            "CRATEMIRROR_SERVER_PORT": "9000",
            "CRATEMIRROR_CACHE_DIR": "/var/cache/cratemirror",
            "CRATEMIRROR_UPSTREAM_INDEX_URL": "https://example.org/index",
            "CRATEMIRROR_OFFLINE": "true",
            "CRATEMIRROR_SERVER_WORKERS": "auto",
            "CRATEMIRROR_CACHE_MAX_SIZE": "1GiB",
            "CRATEMIRROR_CACHE_STALE_IF_ERROR": "forever",
            "CRATEMIRROR_LOGGING_LEVEL": "WARNING",
            "PATH": "/usr/bin",
        },
    )
    assert config.server.port == 9000
    assert config.server.host == "0.0.0.0"  # untouched by env
    assert config.server.workers == (os.cpu_count() or 1)
    assert config.cache.dir == Path("/var/cache/cratemirror")
    assert config.upstream.index_url == "https://example.org/index/"
    assert config.offline is True
    assert config.cache.max_size == GiB
    assert config.cache.stale_if_error == math.inf
    assert config.logging.level == "warning"
    assert config.source == str(path)


@pytest.mark.parametrize("value", ["false", "0", "no", "off", "FALSE"])
def test_env_bool_false(value: str) -> None:
    assert load_config(None, env={"CRATEMIRROR_OFFLINE": value}).offline is False


def test_env_empty_unsets_optional_key(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  public_url: https://a.example\n")
    config = load_config(path, env={"CRATEMIRROR_SERVER_PUBLIC_URL": ""})
    assert config.server.public_url is None


def test_env_bad_value_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"CRATEMIRROR_SERVER_PORT": "http"})
    assert str(info.value) == (
        "environment CRATEMIRROR_SERVER_PORT: server.port: expected an integer port 1..65535, got 'http'"
    )


def test_env_empty_required_key_is_error() -> None:
    with pytest.raises(ConfigError, match=r"^environment CRATEMIRROR_SERVER_HOST: server.host: expected"):
        load_config(None, env={"CRATEMIRROR_SERVER_HOST": ""})


def test_env_unknown_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"CRATEMIRROR_SERVER_PROT": "9000"})
    message = str(info.value)
    assert message.startswith(
        "environment CRATEMIRROR_SERVER_PROT: unknown variable (did you mean CRATEMIRROR_SERVER_PORT?)"
    )
    assert "CRATEMIRROR_CACHE_MAX_SIZE" in message
    assert "\n" not in message


def test_env_config_variable_is_not_a_setting(tmp_path: Path) -> None:
    assert load_config(None, env={"CRATEMIRROR_CONFIG": str(tmp_path / "x.yaml")}) == Config()


def test_env_other_prefixes_ignored() -> None:
    assert (
        load_config(None, env={"CRATEMIRRORX": "1", "cratemirror_server_port": "1", "HOME": "/"}) == Config()
    )


def test_env_none_means_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CRATEMIRROR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CRATEMIRROR_SERVER_PORT", "9123")
    assert load_config(None).server.port == 9123


def test_bad_file_value_is_error_even_if_env_overrides(tmp_path: Path) -> None:
    # A broken file stays broken; it must not start working only while some variable happens to be set.
    path = write(tmp_path, "server:\n  port: nope\n")
    with pytest.raises(ConfigError, match=r"mirror.yaml: server.port"):
        load_config(path, env={"CRATEMIRROR_SERVER_PORT": "9000"})


# --- overrides (command-line flags) ----------------------------------------------------------------------


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path, "server:\n  port: 1001\n  host: file-host\n  workers: 3\ncache:\n  dir: file-dir\n"
    )
    env = {"CRATEMIRROR_SERVER_PORT": "1002", "CRATEMIRROR_SERVER_HOST": "env-host"}
    config = load_config(path, env=env, overrides={"server.port": 1003})
    assert config.server.port == 1003  # flag beats env and file
    assert config.server.host == "env-host"  # env beats file
    assert config.server.workers == 3  # file beats default
    assert config.cache.dir == Path("file-dir")
    assert config.upstream.retries == 3  # default


def test_overrides_all_cli_flags_and_none_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1001\noffline: true\n")
    config = load_config(
        path,
        env=NO_ENV,
        overrides={
            "server.host": "::",
            "server.port": None,  # argparse default: leave the file's value alone
            "server.workers": 2,
            "cache.dir": Path("/x"),
            "upstream.index_url": "http://upstream.local",
            "offline": None,
            "cache.max_size": "10MB",
        },
    )
    assert config.server == ServerConfig(host="::", port=1001, workers=2, public_url=None)
    assert config.cache.dir == Path("/x")
    assert config.upstream.index_url == "http://upstream.local/"
    assert config.offline is True
    assert config.cache.max_size == 10_000_000


def test_override_offline_true(tmp_path: Path) -> None:
    assert (
        load_config(None, env={"CRATEMIRROR_OFFLINE": "false"}, overrides={"offline": True}).offline is True
    )


def test_override_bad_value_names_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env=NO_ENV, overrides={"server.port": 70000})
    assert str(info.value) == "--port: server.port: expected an integer port 1..65535, got 70000"
    with pytest.raises(ConfigError, match=r"^--cache-dir: cache.dir: expected"):
        load_config(None, env=NO_ENV, overrides={"cache.dir": ""})
    with pytest.raises(ConfigError, match=r"^command line: upstream.retries: expected a whole number"):
        load_config(None, env=NO_ENV, overrides={"upstream.retries": "x"})


def test_override_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"^command line: server.prot: unknown key"):
        load_config(None, env=NO_ENV, overrides={"server.prot": 1})


# --- find_config_path ------------------------------------------------------------------------------------


def test_find_none_when_nothing_present(tmp_path: Path) -> None:
    assert find_config_path(None, NO_ENV, tmp_path) is None


def test_find_cli_path(tmp_path: Path) -> None:
    path = write(tmp_path, "", name="custom.yaml")
    write(tmp_path, "")  # ./mirror.yaml too: --config still wins
    env = {"CRATEMIRROR_CONFIG": str(write(tmp_path, "", name="env.yaml"))}
    assert find_config_path(str(path), env, tmp_path) == path


def test_find_cli_path_relative_to_cwd(tmp_path: Path) -> None:
    write(tmp_path, "", name="custom.yaml")
    assert find_config_path("custom.yaml", NO_ENV, tmp_path) == tmp_path / "custom.yaml"


def test_find_missing_cli_path(tmp_path: Path) -> None:
    write(tmp_path, "")  # a ./mirror.yaml must not be used as a fallback for a wrong --config
    with pytest.raises(ConfigError) as info:
        find_config_path("nope.yaml", NO_ENV, tmp_path)
    assert str(info.value) == "--config: expected a path to an existing config file, got 'nope.yaml'"


def test_find_cli_path_directory_is_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--config: "):
        find_config_path(str(tmp_path), NO_ENV, tmp_path)


def test_find_env_path(tmp_path: Path) -> None:
    path = write(tmp_path, "", name="env.yaml")
    write(tmp_path, "")  # ./mirror.yaml: $CRATEMIRROR_CONFIG still wins
    assert find_config_path(None, {"CRATEMIRROR_CONFIG": str(path)}, tmp_path) == path


def test_find_missing_env_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        find_config_path(None, {"CRATEMIRROR_CONFIG": "/no/such.yaml"}, tmp_path)
    assert str(info.value) == (
        "environment CRATEMIRROR_CONFIG: expected a path to an existing config file, got '/no/such.yaml'"
    )


def test_find_empty_env_path_is_unset(tmp_path: Path) -> None:
    assert find_config_path(None, {"CRATEMIRROR_CONFIG": ""}, tmp_path) is None


def test_find_mirror_yaml_in_cwd(tmp_path: Path) -> None:
    write(tmp_path, "server:\n  port: 9999\n")
    found = find_config_path(None, NO_ENV, tmp_path)
    assert found == tmp_path / "mirror.yaml"
    assert load_config(found, env=NO_ENV).server.port == 9999


def test_find_mirror_yaml_in_process_cwd_keeps_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Messages then read "mirror.yaml: ..." as in the contract rather than an absolute path.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "")
    found = find_config_path(None, NO_ENV, Path.cwd())
    assert found == Path("mirror.yaml")
    assert load_config(found, env=NO_ENV).source == "mirror.yaml"


def test_find_ignores_mirror_yaml_directory(tmp_path: Path) -> None:
    (tmp_path / "mirror.yaml").mkdir()
    assert find_config_path(None, NO_ENV, tmp_path) is None


# --- the keys added with the schema (contract.md mirror.yaml) --------------------------------------------


def test_new_key_defaults() -> None:
    config = Config()
    assert (config.server.max_connections, config.server.idle_timeout) == (4096, 30.0)
    assert (config.server.tls_cert, config.server.tls_key) == (None, None)
    assert (config.upstream.max_index_size, config.upstream.max_crate_size) == (64 * 1024**2, GiB)
    assert (config.cache.index_ttl, config.cache.stale_while_revalidate) == (30.0, 300.0)
    assert config.storage == StorageConfig(backend="local", s3=S3Config())
    assert config.storage.s3 == S3Config(
        bucket=None,
        prefix="",
        endpoint_url=None,
        region=None,
        access_key_id=None,
        secret_access_key=None,
        serve="proxy",
    )
    assert config.coordination.redis_url is None
    assert config.auth == AuthConfig(required=False, tokens_file=Path("./tokens.yaml"), protect_status=False)
    assert config.registries == {}
    assert config.policy == PolicyConfig(
        mode="off",
        advisory_db=None,
        advisories="deny",
        informational=(),
        ignore=(),
        licenses=(),
        deny=(),
        allow=(),
    )


def test_new_keys_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if cratemirror[fleet] were installed: any importable module stands in for its clients.
    monkeypatch.setattr(config_module, "FLEET_MODULES", dict.fromkeys(config_module.FLEET_MODULES, "yaml"))
    cert = write(tmp_path, "-----BEGIN CERTIFICATE-----\n", name="cert.pem")
    key = write(tmp_path, "-----BEGIN PRIVATE KEY-----\n", name="key.pem")
    config = load_text(
        tmp_path,
        f"""
server:
  max_connections: 100
  idle_timeout: 500ms
  tls_cert: {cert}
  tls_key: {key}
upstream:
  max_index_size: 1MiB
  max_crate_size: 10MB
cache:
  index_ttl: 0
  stale_while_revalidate: 1h
storage:
  backend: S3
  s3:
    bucket: crates-cache
    prefix: mirror/eu/
    endpoint_url: http://127.0.0.1:9000
    region: eu-west-1
    access_key_id: AKIAEXAMPLE
    secret_access_key: s3-secret-value
    serve: redirect
    integrity_key: {INTEGRITY_KEY}
coordination:
  redis_url: redis://127.0.0.1:6379/0
auth:
  required: true
  tokens_file: /etc/cratemirror/tokens.yaml
  protect_status: yes
registries:
  internal:
    index_url: https://kellnr.example/api/v1/crates/index
    token_env: KELLNR_TOKEN
    index_ttl: 10s
    stale_if_error: forever
  vendor_2: {{index_url: "http://127.0.0.1:8000/", token: registry-secret-value}}
policy:
  mode: off
  advisory_db: ./advisory-db
  advisories: warn
  informational: [unmaintained, Unsound]
  ignore: [RUSTSEC-2020-0071]
  licenses: [MIT, Apache-2.0, GPL-2.0+, LicenseRef-internal]
  deny: [openssl-sys, "time@<0.2.23"]
  allow: ["ring@^0.17"]
""",
    )
    assert config.server.max_connections == 100
    assert config.server.idle_timeout == 0.5
    assert (config.server.tls_cert, config.server.tls_key) == (cert, key)
    assert (config.upstream.max_index_size, config.upstream.max_crate_size) == (1024**2, 10_000_000)
    assert (config.cache.index_ttl, config.cache.stale_while_revalidate) == (0.0, 3600.0)
    assert config.storage.backend == "s3"
    s3 = config.storage.s3
    assert (s3.bucket, s3.prefix, s3.endpoint_url, s3.region) == (
        "crates-cache",
        "mirror/eu/",
        "http://127.0.0.1:9000",
        "eu-west-1",
    )
    assert (s3.access_key_id, s3.secret_key(), s3.serve) == ("AKIAEXAMPLE", "s3-secret-value", "redirect")
    assert config.coordination.redis_url == "redis://127.0.0.1:6379/0"
    assert config.auth == AuthConfig(
        required=True, tokens_file=Path("/etc/cratemirror/tokens.yaml"), protect_status=True
    )
    internal = config.registries["internal"]
    assert internal == RegistryConfig(
        index_url="https://kellnr.example/api/v1/crates/index/",
        token_env="KELLNR_TOKEN",
        index_ttl=10.0,
        stale_if_error=math.inf,
    )
    assert internal.negative_ttl is None
    assert internal.secret_token({"KELLNR_TOKEN": "from-env"}) == "from-env"
    assert internal.secret_token({}) is None
    vendor = config.registries["vendor_2"]
    assert (vendor.index_url, vendor.secret_token({})) == ("http://127.0.0.1:8000/", "registry-secret-value")
    policy = config.policy
    assert (policy.mode, policy.advisory_db, policy.advisories) == ("off", Path("advisory-db"), "warn")
    assert policy.informational == ("unmaintained", "unsound")
    assert policy.ignore == ("RUSTSEC-2020-0071",)
    assert policy.licenses == ("MIT", "Apache-2.0", "GPL-2.0+", "LicenseRef-internal")
    assert (policy.deny, policy.allow) == (("openssl-sys", "time@<0.2.23"), ("ring@^0.17",))


@pytest.mark.parametrize("mode", ["off", "'off'", "report", "ENFORCE"])
def test_policy_mode_forms(tmp_path: Path, mode: str) -> None:
    # A bare `off` is YAML 1.1 false; it still means the mode "off".
    assert load_text(tmp_path, f"policy:\n  mode: {mode}\n").policy.mode == mode.strip("'").lower()


@pytest.mark.parametrize(
    ("text", "key", "expected", "got"),
    [
        ("server:\n  max_connections: 0\n", "server.max_connections", "a whole number >= 1", "0"),
        ("server:\n  idle_timeout: 0\n", "server.idle_timeout", "a positive duration like 30s", "0"),
        ("server:\n  tls_cert: /no/such.pem\n", "server.tls_cert", "a path to an existing PEM", None),
        ("upstream:\n  max_index_size: 0\n", "upstream.max_index_size", "a positive size like 64MiB", "0"),
        (
            "upstream:\n  max_crate_size: big\n",
            "upstream.max_crate_size",
            "a positive size like 1GiB",
            "'big'",
        ),
        ("cache:\n  stale_while_revalidate: forever\n", "cache.stale_while_revalidate", "a duration", None),
        ("storage:\n  backend: gcs\n", "storage.backend", "one of local, s3", "'gcs'"),
        ("storage: [s3]\n", "storage", "a mapping of storage settings", "['s3']"),
        ("storage:\n  s3: {bucket: Bad_Bucket}\n", "storage.s3.bucket", "an S3 bucket name", "'Bad_Bucket'"),
        ("storage:\n  s3: {prefix: /abs}\n", "storage.s3.prefix", "a key prefix like mirror/", "'/abs'"),
        ("storage:\n  s3: {prefix: a/../b}\n", "storage.s3.prefix", "a key prefix like mirror/", None),
        ("storage:\n  s3: {serve: stream}\n", "storage.s3.serve", "one of proxy, redirect", "'stream'"),
        ("storage:\n  s3: {endpoint_url: minio:9000}\n", "storage.s3.endpoint_url", "an http(s) URL", None),
        ("coordination:\n  redis_url: http://r:6379\n", "coordination.redis_url", "a redis URL", None),
        ("auth:\n  required: maybe\n", "auth.required", "true or false", "'maybe'"),
        ("auth:\n  tokens_file: ''\n", "auth.tokens_file", "a file path", "''"),
        ("policy:\n  mode: strict\n", "policy.mode", "one of off, report, enforce", "'strict'"),
        ("policy:\n  advisories: block\n", "policy.advisories", "one of deny, warn", "'block'"),
        (
            "policy:\n  informational: [notice, yanked]\n",
            "policy.informational[1]",
            "a list of unmaintained, unsound, notice",
            "'yanked'",
        ),
        ("policy:\n  ignore: RUSTSEC-2020-0071\n", "policy.ignore", "a list of advisory ids", None),
        (
            "policy:\n  ignore: [RUSTSEC-20-1]\n",
            "policy.ignore[0]",
            "a list of advisory ids",
            "'RUSTSEC-20-1'",
        ),
        (
            "policy:\n  licenses: [MIT OR Apache-2.0]\n",
            "policy.licenses[0]",
            "a list of SPDX licence ids",
            None,
        ),
        ("policy:\n  deny: [1password]\n", "policy.deny[0]", 'a list of "name" or', "'1password'"),
        ("policy:\n  allow: ['ring@']\n", "policy.allow[0]", 'a list of "name" or', "'ring@'"),
        ("registries: [internal]\n", "registries", "a mapping of registry names", "['internal']"),
        (
            "registries:\n  Internal: {index_url: https://x.example}\n",
            "registries.Internal",
            "a registry name",
            None,
        ),
        (
            "registries:\n  a/b: {index_url: https://x.example}\n",
            "registries.a/b",
            "a registry name",
            "'a/b'",
        ),
        ("registries:\n  ..: {index_url: https://x.example}\n", "registries...", "a registry name", "'..'"),
        (
            "registries:\n  crates-io: {index_url: https://x.example}\n",
            "registries.crates-io",
            "a registry name of lowercase letters, digits, - and _ (crates-io is reserved)",
            "'crates-io'",
        ),
        ("registries:\n  a: {token_env: T}\n", "registries.a.index_url", "an http(s) URL", "nothing"),
        ("registries:\n  a: {index_url: ftp://x}\n", "registries.a.index_url", "an http(s) URL", "'ftp://x'"),
        (
            "registries:\n  a: {index_url: 'https://x.example', token_env: 'X-Y'}\n",
            "registries.a.token_env",
            "an environment variable name",
            "'X-Y'",
        ),
        (
            "registries:\n  a: {index_url: 'https://x.example', index_ttl: soon}\n",
            "registries.a.index_ttl",
            "a duration like 30s, or null",
            "'soon'",
        ),
    ],
)
def test_bad_values_of_new_keys(tmp_path: Path, text: str, key: str, expected: str, got: str | None) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'mirror.yaml'}: {key}: expected {expected}")
    if got is not None:
        assert message.endswith(f", got {got}")
    assert "\n" not in message


def test_unknown_key_in_nested_section_and_registry(tmp_path: Path) -> None:
    assert error_of(tmp_path, "storage:\n  s3:\n    buckett: x\n") == (
        f"{tmp_path / 'mirror.yaml'}: storage.s3.buckett: unknown key (did you mean 'bucket'?); "
        "allowed keys: bucket, prefix, endpoint_url, region, access_key_id, secret_access_key, serve, "
        "integrity_key, timeout"
    )
    assert error_of(tmp_path, "registries:\n  a: {index_url: 'https://x.example', tokn: x}\n") == (
        f"{tmp_path / 'mirror.yaml'}: registries.a.tokn: unknown key (did you mean 'token'?); "
        "allowed keys: index_url, token, token_env, index_ttl, negative_ttl, stale_if_error"
    )


# --- checks across keys ----------------------------------------------------------------------------------


def test_tls_cert_and_key_both_or_neither(tmp_path: Path) -> None:
    cert = write(tmp_path, "x", name="cert.pem")
    message = error_of(tmp_path, f"server:\n  tls_cert: {cert}\n")
    assert message == (
        f"{tmp_path / 'mirror.yaml'}: server.tls_key: expected a path to a PEM file when the other of "
        "tls_cert and tls_key is set, got None"
    )
    message = error_of(tmp_path, f"server:\n  tls_key: {cert}\n")
    assert message.startswith(f"{tmp_path / 'mirror.yaml'}: server.tls_cert: expected a path to a PEM file")


def test_s3_backend_needs_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "FLEET_MODULES", dict.fromkeys(config_module.FLEET_MODULES, "yaml"))
    assert error_of(tmp_path, "storage:\n  backend: s3\n") == (
        f"{tmp_path / 'mirror.yaml'}: storage.s3.bucket: expected an S3 bucket name when storage.backend "
        "is s3, got None"
    )
    # The bucket may come from another layer than the backend: the check runs on the merged whole.
    path = write(tmp_path, "storage:\n  backend: s3\n")
    config = load_config(
        path,
        env={
            "CRATEMIRROR_STORAGE_S3_BUCKET": "crates",
            "CRATEMIRROR_STORAGE_S3_INTEGRITY_KEY": INTEGRITY_KEY,
        },
    )
    assert (config.storage.backend, config.storage.s3.bucket) == ("s3", "crates")


def test_s3_backend_needs_an_integrity_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "FLEET_MODULES", dict.fromkeys(config_module.FLEET_MODULES, "yaml"))
    message = error_of(tmp_path, "storage:\n  backend: s3\n  s3: {bucket: crates}\n")
    assert message.startswith(
        f"{tmp_path / 'mirror.yaml'}: storage.s3.integrity_key: expected a secret shared by the replicas "
        "when storage.backend is s3 (make one: python3 -c 'import secrets; print(secrets.token_hex(32))')"
    )
    assert "\n" not in message
    short = error_of(tmp_path, "storage:\n  backend: s3\n  s3: {bucket: crates, integrity_key: tooshort}\n")
    assert short == (
        f"{tmp_path / 'mirror.yaml'}: storage.s3.integrity_key: expected a secret of at least 32 characters, "
        "or null, got '<hidden>'"
    )
    config = load_text(
        tmp_path, f"storage:\n  backend: s3\n  s3: {{bucket: crates, integrity_key: {INTEGRITY_KEY}}}\n"
    )
    assert config.storage.s3.integrity_secret() == INTEGRITY_KEY.encode()
    assert INTEGRITY_KEY not in repr(config)


def test_token_and_token_env_not_both(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, "registries:\n  a: {index_url: 'https://x.example', token: abc, token_env: TOKEN}\n"
    )
    assert message == (
        f"{tmp_path / 'mirror.yaml'}: registries.a.token_env: expected null when token is set "
        "(give token or token_env, not both), got 'TOKEN'"
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("storage:\n  backend: s3\n  s3: {bucket: crates}\n", "storage.backend"),
        ("coordination:\n  redis_url: redis://127.0.0.1:6379/0\n", "coordination.redis_url"),
    ],
)
def test_fleet_settings_name_the_missing_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key: str
) -> None:
    monkeypatch.setattr(
        config_module,
        "FLEET_MODULES",
        dict.fromkeys(config_module.FLEET_MODULES, "cratemirror_no_such_module"),
    )
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'mirror.yaml'}: {key}: expected the extra cratemirror[fleet]")
    assert "pip install 'cratemirror[fleet]'" in message
    assert "\n" not in message


# --- secrets ---------------------------------------------------------------------------------------------

SECRET_YAML = """
storage:
  s3: {secret_access_key: s3-secret-value}
registries:
  internal: {index_url: 'https://x.example', token: registry-secret-value}
"""


def test_secrets_never_in_repr_or_str(tmp_path: Path) -> None:
    config = load_text(tmp_path, SECRET_YAML)
    for text in (repr(config), str(config), repr(config.registries), repr(config.storage)):
        assert "s3-secret-value" not in text
        assert "registry-secret-value" not in text
    assert config.storage.s3.secret_key() == "s3-secret-value"
    assert config.registries["internal"].secret_token() == "registry-secret-value"


def test_secrets_never_in_errors(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, "registries:\n  a: {index_url: 'https://x.example', token: [registry-secret]}\n"
    )
    assert (
        message
        == f"{tmp_path / 'mirror.yaml'}: registries.a.token: expected a token string, or null, got '<hidden>'"
    )
    message = error_of(tmp_path, "coordination:\n  redis_url: http://user:redis-password@r:6379\n")
    assert "redis-password" not in message
    assert message.endswith("got 'http://***@r:6379'")
    # a token is often the whole userinfo: masked as well
    message = error_of(tmp_path, "coordination:\n  redis_url: http://only-a-token@r:6379/x/y\n")
    assert "only-a-token" not in message
    assert message.endswith("got 'http://***@r:6379/x/y'")


# --- environment and flags for the nested keys -----------------------------------------------------------


def test_env_nested_and_list_and_mapping_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "FLEET_MODULES", dict.fromkeys(config_module.FLEET_MODULES, "yaml"))
    config = load_config(
        None,
        env={
            "CRATEMIRROR_STORAGE_BACKEND": "s3",
            "CRATEMIRROR_STORAGE_S3_BUCKET": "crates",
            "CRATEMIRROR_STORAGE_S3_SECRET_ACCESS_KEY": "s3-secret-value",
            "CRATEMIRROR_STORAGE_S3_INTEGRITY_KEY": INTEGRITY_KEY,
            "CRATEMIRROR_SERVER_MAX_CONNECTIONS": "10",
            "CRATEMIRROR_CACHE_STALE_WHILE_REVALIDATE": "2m",
            "CRATEMIRROR_AUTH_REQUIRED": "yes",
            "CRATEMIRROR_POLICY_IGNORE": "RUSTSEC-2020-0071, RUSTSEC-2021-0001",
            "CRATEMIRROR_POLICY_LICENSES": "[MIT, Apache-2.0]",
            "CRATEMIRROR_POLICY_DENY": "",
            "CRATEMIRROR_REGISTRIES": "{internal: {index_url: 'https://x.example', token_env: T}}",
        },
    )
    assert (config.storage.backend, config.storage.s3.bucket, config.storage.s3.secret_key()) == (
        "s3",
        "crates",
        "s3-secret-value",
    )
    assert (config.server.max_connections, config.cache.stale_while_revalidate) == (10, 120.0)
    assert config.auth.required is True
    assert config.storage.s3.integrity_secret() == INTEGRITY_KEY.encode()
    assert config.policy.ignore == ("RUSTSEC-2020-0071", "RUSTSEC-2021-0001")
    assert config.policy.licenses == ("MIT", "Apache-2.0")
    assert config.policy.deny == ()
    assert config.registries == {"internal": RegistryConfig(index_url="https://x.example/", token_env="T")}


def test_env_unknown_nested_variable_has_hint() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"CRATEMIRROR_STORAGE_S3_BUKET": "x"})
    assert str(info.value).startswith(
        "environment CRATEMIRROR_STORAGE_S3_BUKET: unknown variable "
        "(did you mean CRATEMIRROR_STORAGE_S3_BUCKET?)"
    )


def test_env_bad_nested_value_names_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"CRATEMIRROR_POLICY_IGNORE": "RUSTSEC-2020-0071,nope"})
    assert str(info.value) == (
        "environment CRATEMIRROR_POLICY_IGNORE: policy.ignore[1]: expected a list of advisory ids like "
        "RUSTSEC-2019-0001, got 'nope'"
    )
    with pytest.raises(ConfigError, match=r"^environment CRATEMIRROR_REGISTRIES: not valid YAML: "):
        load_config(None, env={"CRATEMIRROR_REGISTRIES": "{a: [}"})


def test_origins_name_default_file_variable_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1001\n  host: file-host\n")
    loaded = load(path, {"CRATEMIRROR_SERVER_HOST": "env-host"}, {"server.workers": 3, "cache.dir": None})
    rows = {key: (value, origin) for key, value, origin in effective_values(loaded)}
    assert rows["server.port"] == ("1001", str(path))
    assert rows["server.host"] == ("env-host", "environment CRATEMIRROR_SERVER_HOST")
    assert rows["server.workers"] == ("3", "--workers")
    assert rows["cache.dir"] == ("cache", "default")
    assert rows["cache.stale_if_error"] == ("7d", "default")
    assert set(rows) == {key for key, _ in schema_keys()}


# --- values are frozen, hashable and built by keyword ----------------------------------------------------


def test_frozen_hashable_keyword_construction(tmp_path: Path) -> None:
    config = load_text(tmp_path, SECRET_YAML)
    assert hash(config) == hash(load_text(tmp_path, SECRET_YAML))
    assert len({config, Config(), Config()}) == 2
    with pytest.raises(ValueError):
        config.offline = True  # type: ignore[misc]
    with pytest.raises(ValueError):
        config.cache.max_size = 1  # type: ignore[misc]
    cache = CacheConfig(dir=tmp_path, max_size="1GiB", index_ttl="5s")  # type: ignore[arg-type]
    assert (cache.dir, cache.max_size, cache.index_ttl) == (tmp_path, GiB, 5.0)
    assert Config(cache=cache).cache is cache
    with pytest.raises(ValueError):
        CacheConfig(max_size="lots")  # type: ignore[arg-type]


def test_config_built_directly_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRATEMIRROR_SERVER_PORT", "9999")
    assert Config().server.port == 8080


# --- upstream.prefetch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("off", "off"), ("index", "index"), ("crates", "crates")])
def test_prefetch_words_including_yaml_off(tmp_path: Path, text: str, expected: str) -> None:
    # YAML 1.1 reads a bare `off` as false: it still means the word
    assert load_text(tmp_path, f"upstream:\n  prefetch: {text}\n").upstream.prefetch == expected


@pytest.mark.parametrize("text", ["sometimes", "true", "1"])
def test_prefetch_other_values_name_the_key_and_the_words(tmp_path: Path, text: str) -> None:
    message = error_of(tmp_path, f"upstream:\n  prefetch: {text}\n")
    assert "upstream.prefetch: expected off, index or crates" in message, message
