"""`cratemirror config check | show | schema` as a real subprocess, and the committed mirror.schema.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from cratemirror.config.load import schema_keys
from tests.mirror_process import clean_env

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "mirror.schema.json"
MIRROR_YAML = REPO / "mirror.yaml"
TIMEOUT = 60.0


def cratemirror(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cratemirror", *args],
        cwd=cwd,
        env=clean_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_check_accepts_the_repo_config() -> None:
    result = cratemirror("config", "check", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("mirror.yaml: ok")


def test_check_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "mirror.yaml").write_text("cache:\n  max_size: lots\n", encoding="utf-8")
    result = cratemirror("config", "check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        result.stderr == "cratemirror: mirror.yaml: cache.max_size: expected a size like 20GiB, got 'lots'\n"
    )


def test_check_bad_environment_and_missing_file(tmp_path: Path) -> None:
    result = cratemirror("config", "check", cwd=tmp_path, CRATEMIRROR_SERVER_PROT="1")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "cratemirror: environment CRATEMIRROR_SERVER_PROT: unknown variable "
        "(did you mean CRATEMIRROR_SERVER_PORT?)"
    )
    assert result.stderr.count("\n") == 1
    result = cratemirror("config", "check", "--config", "nope.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (
        2,
        "usage: cratemirror config check [-h] [--config PATH]\n"
        "cratemirror config check: error: --config: expected a path to an existing config file, "
        "got 'nope.yaml'\n",
    )


def test_show_prints_every_key_with_its_origin_and_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text(
        "server:\n  port: 9001\n"
        "upstream:\n  index_url: 'https://only-a-token-value@index.example/'\n"
        "storage:\n  s3: {secret_access_key: s3-secret-value}\n"
        "registries:\n  internal: {index_url: 'https://x.example', token: registry-secret-value}\n",
        encoding="utf-8",
    )
    fleet_secret = "fleet-integrity-secret-value-0123456789"
    result = cratemirror(
        "config", "show", "--config", str(config), cwd=tmp_path, CRATEMIRROR_CACHE_MAX_SIZE="1GiB",
        CRATEMIRROR_STORAGE_S3_INTEGRITY_KEY=fleet_secret,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert fleet_secret not in result.stdout
    assert "s3-secret-value" not in result.stdout
    assert "registry-secret-value" not in result.stdout
    assert "only-a-token-value" not in result.stdout  # a token that is the whole userinfo
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        setting, _, origin = line.partition("  # ")
        key, _, value = setting.partition(" = ")
        rows[key] = (value.strip(), origin)
    assert result.stdout.splitlines()[0] == f"# config: {config}"
    assert rows["server.port"] == ("9001", str(config))
    assert rows["cache.max_size"] == ("1GiB", "environment CRATEMIRROR_CACHE_MAX_SIZE")
    assert rows["server.host"] == ("127.0.0.1", "default")
    assert rows["storage.s3.secret_access_key"] == ("'**********'", str(config))
    assert rows["storage.s3.integrity_key"] == (
        "'**********'",
        "environment CRATEMIRROR_STORAGE_S3_INTEGRITY_KEY",
    )
    assert rows["registries.internal.token"] == ("'**********'", str(config))
    assert rows["registries.internal.index_url"] == ("https://x.example/", str(config))
    assert rows["upstream.index_url"] == ("https://***@index.example/", str(config))
    expected = {key for key, _ in schema_keys() if key != "registries"}
    assert expected <= set(rows)


def test_schema_command_equals_committed_file(tmp_path: Path) -> None:
    result = cratemirror("config", "schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    assert result.stdout == committed, "regenerate: cratemirror config schema > mirror.schema.json"
    assert json.loads(result.stdout)["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_repo_mirror_yaml_points_editors_at_the_schema() -> None:
    first = MIRROR_YAML.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=./mirror.schema.json"


def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_repo_mirror_yaml_validates_against_the_schema() -> None:
    document = yaml.safe_load(MIRROR_YAML.read_text(encoding="utf-8"))
    errors = [error.message for error in schema_validator().iter_errors(document)]
    assert errors == []


@pytest.mark.parametrize(
    "document",
    [
        {"server": {"prot": 9000}},
        {"server": {"port": 70000}},
        {"cache": {"max_size": "lots"}},
        {"cache": {"index_ttl": "5 minutes"}},
        {"policy": {"mode": "strict"}},
        {"policy": {"ignore": ["RUSTSEC-1"]}},
        {"registries": {"crates-io": {"index_url": "https://x.example/"}}},
        {"registries": {"Bad Name": {"index_url": "https://x.example/"}}},
        {"registries": {"internal": {"token": "x"}}},
        {"storage": {"s3": {"serve": "stream"}}},
    ],
)
def test_schema_rejects_what_the_loader_rejects(document: dict[str, object]) -> None:
    assert list(schema_validator().iter_errors(document)) != []


def show_rows(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines()[1:]:
        setting, _, origin = line.partition("  # ")
        key, _, value = setting.partition(" = ")
        rows[key.strip()] = (value.strip(), origin)
    return rows


def test_show_marks_defaults_and_prints_values_as_written(tmp_path: Path) -> None:
    """The shipped mirror.yaml sets every key to its default: `show` says so instead of attributing
    48 choices to the file; sizes and durations read as written, `workers: auto` as `auto (N)`."""
    shipped = tmp_path / "mirror.yaml"
    shipped.write_text((REPO / "mirror.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    rows = show_rows(cratemirror("config", "show", cwd=tmp_path).stdout)
    cpus = os.cpu_count() or 1
    assert rows["server.workers"] == (f"auto ({cpus})", "mirror.yaml, = default")
    assert rows["cache.max_size"] == ("20GiB", "mirror.yaml, = default")
    assert rows["upstream.max_index_size"] == ("64MiB", "mirror.yaml, = default")
    assert rows["cache.index_ttl"] == ("30s", "mirror.yaml, = default")
    assert all(origin.endswith("= default") for origin in (origin for _, origin in rows.values())), rows

    custom = tmp_path / "custom.yaml"
    custom.write_text("server:\n  workers: 3\ncache:\n  max_size: 1536MiB\n  index_ttl: 90s\n")
    rows = show_rows(cratemirror("config", "show", "--config", str(custom), cwd=tmp_path).stdout)
    assert rows["server.workers"] == ("3", str(custom))
    assert rows["cache.max_size"] == ("1536MiB", str(custom))  # as written, not 1.5GiB or bytes
    assert rows["cache.index_ttl"] == ("90s", str(custom))
    assert rows["upstream.max_crate_size"] == ("1GiB", "default")
