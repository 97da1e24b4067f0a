"""Tests for cratemirror.config: parsing, layering (defaults < file < env < flags) and error messages."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

from cratemirror import config as config_module
from cratemirror.config import (
    CacheConfig,
    Config,
    ConfigError,
    LoggingConfig,
    ServerConfig,
    UpstreamConfig,
    find_config_path,
    load_config,
    parse_duration,
    parse_size,
)

REPO_MIRROR_YAML = Path(__file__).resolve().parent.parent / "mirror.yaml"
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
    assert config.server == ServerConfig("127.0.0.1", 8080, os.cpu_count() or 1, None)
    assert config.upstream == UpstreamConfig("https://index.crates.io/", 30.0, 3, 32, None, None, None)
    assert config.cache == CacheConfig(Path("./cache"), 20 * GiB, 300.0, 60.0, 7 * 86400.0)
    assert config.offline is False
    assert config.logging == LoggingConfig("info", "text")


def test_repo_mirror_yaml_equals_defaults() -> None:
    config = load_config(REPO_MIRROR_YAML, env=NO_ENV)
    assert config.source == str(REPO_MIRROR_YAML)
    assert dataclasses.replace(config, source="built-in defaults") == load_config(None, env=NO_ENV)


def test_repo_mirror_yaml_lists_every_key() -> None:
    # Every key is spelled out (and commented) so the file doubles as documentation.
    lines = REPO_MIRROR_YAML.read_text(encoding="utf-8").splitlines()
    section = ""
    seen = set()
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key = line.split(":", 1)[0].strip()
        if line.startswith(" "):
            seen.add(f"{section}.{key}")
            assert "#" in line, f"key {section}.{key} has no comment"
        elif line.rstrip().endswith(":"):
            section = key
        else:
            seen.add(key)
            assert "#" in line, f"key {key} has no comment"
    assert seen == set(config_module._KEYS)


def test_schema_matches_dataclasses() -> None:
    # The key table and the dataclasses must describe the same keys.
    expected = {
        f"{section}.{f.name}"
        for section, cls in [
            ("server", ServerConfig),
            ("upstream", UpstreamConfig),
            ("cache", CacheConfig),
            ("logging", LoggingConfig),
        ]
        for f in dataclasses.fields(cls)
    } | {"offline"}
    assert set(config_module._KEYS) == expected


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert dataclasses.replace(load_text(tmp_path, ""), source="built-in defaults") == Config()


def test_comment_only_file_and_empty_sections_are_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "# nothing\nserver:\n  # port: 1\ncache:\n")
    assert dataclasses.replace(config, source="built-in defaults") == Config()


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
    assert config.server == ServerConfig("0.0.0.0", 9000, 4, "https://crates.example.com")
    assert config.upstream == UpstreamConfig(
        "http://localhost:8000/index/", 2.5, 0, 1, "my-agent/1.0", "http://proxy:3128", ca
    )
    assert config.cache == CacheConfig(Path("relative/cache"), 3 * GiB // 2, 0.0, 0.5, math.inf)
    assert not config.cache.dir.is_absolute()  # kept as given, not resolved
    assert config.offline is True
    assert config.logging == LoggingConfig("debug", "json")


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
        "allowed keys: host, port, workers, public_url, max_connections, idle_timeout"
    )


def test_unknown_section(tmp_path: Path) -> None:
    message = error_of(tmp_path, "database:\n  url: x\n")
    assert message == (
        f"{tmp_path / 'mirror.yaml'}: database: unknown key; "
        "allowed keys: server, upstream, cache, offline, logging"
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
    assert config.server == ServerConfig("::", 1001, 2, None)
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
