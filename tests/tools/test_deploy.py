"""Checks of the files under deploy/: Dockerfile, compose, systemd, Kubernetes, Prometheus, Grafana.

Needs two Debian packages on the machine (CI installs them; a missing tool fails, it never skips):
`prometheus` (for promtool) and `systemd` (for systemd-analyze).

`metric_names_used_in_deploy()` is the set of metric names the dashboard and the alert rules read; a
test with a live mirror compares it against a real /metrics scrape.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cratemirror.config.load import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
SYSTEMD_UNIT = DEPLOY / "systemd" / "cratemirror.service"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "mirror.yaml"
K8S = DEPLOY / "kubernetes"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cratemirror.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "cratemirror.yml"
README = DEPLOY / "README.md"

CACHE_DIR = "/var/cache/cratemirror"
EXEC_START = "/usr/local/bin/cratemirror serve --config /etc/cratemirror/mirror.yaml"

# docs/contract.md, "Metrics". Names are part of the contract: the dashboard and alerts may use no others.
CONTRACT_METRICS: frozenset[str] = frozenset(
    {
        "cratemirror_cache_requests_total",
        "cratemirror_request_duration_seconds",
        "cratemirror_upstream_requests_total",
        "cratemirror_upstream_request_duration_seconds",
        "cratemirror_checksum_failures_total",
        "cratemirror_coalesced_requests_total",
        "cratemirror_cache_size_bytes",
        "cratemirror_cache_entries",
        "cratemirror_bytes_served_total",
        "cratemirror_upstream_bytes_total",
        "cratemirror_upstream_up",
        "cratemirror_cache_max_size_bytes",
        "cratemirror_storage_integrity_failures_total",
    }
)
CONTRACT_HISTOGRAMS: frozenset[str] = frozenset(
    {"cratemirror_request_duration_seconds", "cratemirror_upstream_request_duration_seconds"}
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series Prometheus itself adds to every scrape target; never in a /metrics answer.
PROMETHEUS_SYNTHETIC: frozenset[str] = frozenset({"up"})
ALLOWED_METRIC_NAMES: frozenset[str] = (
    CONTRACT_METRICS
    | {name + suffix for name in CONTRACT_HISTOGRAMS for suffix in HISTOGRAM_SUFFIXES}
    | PROMETHEUS_SYNTHETIC
)

EXPECTED_ALERTS = (
    "CratemirrorDown",
    "CratemirrorUpstreamDown",
    "CratemirrorHitRateCollapse",
    "CratemirrorChecksumFailures",
    "CratemirrorStorageIntegrityFailures",
    "CratemirrorCacheNearMaxSize",
    "CratemirrorHighLatency",
)

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"} and p.is_file())
K8S_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


# --- helpers -------------------------------------------------------------------------------------------


def _tool(name: str, debian_package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: it comes with the Debian package {debian_package!r} "
            f"(apt-get install -y --no-install-recommends {debian_package})"
        )
    return path


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _dashboard() -> Any:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _all_panels(panels: list[Any]) -> Iterator[Any]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL expression) of every query of every panel."""
    queries = []
    for panel in _all_panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    return queries


def _templating_queries() -> list[str]:
    """The Prometheus queries of the dashboard's query variables (Grafana syntax, not plain PromQL)."""
    queries = []
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def _templating_promql(query: str) -> str:
    """The PromQL inside a Grafana Prometheus variable query."""
    query = query.strip()
    match = re.fullmatch(r"label_values\(\s*(?:(.*?)\s*,)?\s*[A-Za-z_]\w*\s*\)", query, re.DOTALL)
    if match:
        return match.group(1) or ""
    match = re.fullmatch(r"query_result\((.*)\)", query, re.DOTALL)
    if match:
        return match.group(1)
    if re.fullmatch(r"label_names\(\s*\)", query):
        return ""
    pytest.fail(f"unrecognised Grafana variable query {query!r}: teach _templating_promql about it")


def _alert_rules() -> list[Any]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"] if "alert" in rule]


_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (Grafana's $variables allowed in matchers and ranges).

    Not a full parser, but enough for the expressions in deploy/: a `{__name__=...}` selector is refused
    rather than silently missed.
    """
    if "__name__" in expr:
        raise ValueError(f"cannot check a __name__ matcher: {expr!r}")
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if is_call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def metric_names_used_in_deploy() -> set[str]:
    """Every metric name read by deploy/prometheus/alerts.yml and deploy/grafana/dashboards/cratemirror.json.

    Names are as they appear in a scrape: histogram series carry their _bucket / _sum / _count suffix.
    The set also holds `up`, which Prometheus adds per target and no /metrics answer contains.
    """
    names: set[str] = set()
    for rule in _alert_rules():
        names |= promql_metric_names(rule["expr"])
    for _, expr in _panel_queries():
        names |= promql_metric_names(expr)
    for query in _templating_queries():
        names |= promql_metric_names(_templating_promql(query))
    return names


def _parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any [Section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        line = pending + stripped
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        word, _, args = line.partition(" ")
        instructions.append((word.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return instructions


def _dockerfile(instruction: str) -> list[str]:
    return [args for word, args in _dockerfile_instructions() if word == instruction]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in _final_stage():
        if word == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=VALUE, got {args!r}"
                env[key] = value
    return env


def _healthcheck_argv() -> list[str]:
    (healthcheck,) = _dockerfile("HEALTHCHECK")
    _, sep, command = healthcheck.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {healthcheck!r}"
    argv = json.loads(command)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), command
    return [str(a) for a in argv]


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KI": 1024,
    "KIB": 1024,
    "MI": 1024**2,
    "MIB": 1024**2,
    "GI": 1024**3,
    "GIB": 1024**3,
    "TI": 1024**4,
    "TIB": 1024**4,
}


def _bytes(quantity: str) -> int:
    """A mirror.yaml size (20GiB) or a Kubernetes quantity (25Gi) in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", quantity)
    assert match and match.group(2).upper() in _UNITS, f"not a size: {quantity!r}"
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _statefulset() -> Any:
    (doc,) = _load_yaml_all(K8S / "statefulset.yaml")
    assert doc["kind"] == "StatefulSet"
    return doc


def _k8s_mirror_yaml(tmp_path: Path) -> Path:
    (configmap,) = _load_yaml_all(K8S / "configmap.yaml")
    path = tmp_path / "mirror.yaml"
    path.write_text(configmap["data"]["mirror.yaml"], encoding="utf-8")
    return path


# --- YAML and JSON parse -------------------------------------------------------------------------------


def test_deploy_has_yaml_files() -> None:
    assert len(YAML_FILES) >= 10, YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_file_parses(path: Path) -> None:
    docs = _load_yaml_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document should be a mapping"


# --- Prometheus ----------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = _tool("promtool", "prometheus")
    result = _run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, _output(result)


def test_promtool_check_config() -> None:
    promtool = _tool("promtool", "prometheus")
    result = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, _output(result)


def test_promtool_alert_unit_tests() -> None:
    """deploy/prometheus/alerts_test.yml: each alert fires on its symptom (and not before)."""
    promtool = _tool("promtool", "prometheus")
    result = _run([promtool, "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, _output(result)


def test_alert_unit_tests_cover_every_alert() -> None:
    tested = {
        case["alertname"]
        for test in _load_yaml(ALERTS_TEST)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == set(EXPECTED_ALERTS)


def test_alert_rules_are_complete() -> None:
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    assert sorted(rules) == sorted(EXPECTED_ALERTS)
    for name, rule in rules.items():
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook", "runbook_url"):
            assert annotations.get(key), f"{name}: no {key} annotation"
        anchor = annotations["runbook_url"].rpartition("#")[2]
        assert anchor == name.lower(), f"{name}: runbook_url should end in #{name.lower()}"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
    assert rules["CratemirrorUpstreamDown"]["for"] == "5m"
    assert "cratemirror_upstream_up" in rules["CratemirrorUpstreamDown"]["expr"]
    assert re.search(r"\bup\{[^}]*\}\s*==\s*0", rules["CratemirrorDown"]["expr"])
    assert "increase(cratemirror_checksum_failures_total" in rules["CratemirrorChecksumFailures"]["expr"]


def test_alert_runbooks_exist_in_readme() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    for name in EXPECTED_ALERTS:
        assert name.lower() in headings, f"deploy/README.md has no runbook heading for {name}"


def test_prometheus_scrapes_the_mirror() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    mirror = jobs["cratemirror"]  # the job name alerts.yml selects
    assert mirror.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in mirror["static_configs"] for t in static["targets"]]
    assert targets == ["mirror:8080"]
    for rule in _alert_rules():
        for job in re.findall(r'\bjob\s*=~?\s*"([^"]*)"', rule["expr"]):
            assert job == "cratemirror", f"{rule['alert']} selects job {job!r}"


# --- Grafana -------------------------------------------------------------------------------------------


def test_dashboard_parses_and_has_panels() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "cratemirror"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_all_panels(dashboard["panels"]))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_has_the_required_panels() -> None:
    exprs = "\n".join(expr for _, expr in _panel_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (kind, le) "
            "(rate(cratemirror_request_duration_seconds_bucket" in exprs
        )
    for quantile in ("0.5", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (kind, le) "
            "(rate(cratemirror_upstream_request_duration_seconds_bucket" in exprs
        )
    assert "sum by (kind, result) (rate(cratemirror_cache_requests_total" in exprs
    assert "sum by (kind, status) (rate(cratemirror_upstream_requests_total" in exprs
    assert re.search(r'sum by \(kind\) \(rate\(cratemirror_cache_requests_total\{[^}]*result="hit"', exprs)


def test_dashboard_reads_every_contract_metric() -> None:
    used = metric_names_used_in_deploy()
    for name in CONTRACT_METRICS:
        variants = {name} | {name + s for s in HISTOGRAM_SUFFIXES if name in CONTRACT_HISTOGRAMS}
        assert used & variants, f"nothing in deploy/ reads {name}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (Grafana's variables replaced by sample values)."""
    promtool = _tool("promtool", "prometheus")
    substitutions = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$instance": ".*"}
    rules = []
    for i, (where, expr) in enumerate(_panel_queries()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"alert": f"Panel{i}", "expr": expr, "annotations": {"panel": where}})
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    result = _run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, _output(result)


def test_grafana_provisioning_matches_compose() -> None:
    (datasource,) = _load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["current"]["value"] == datasource["uid"]
    (provider,) = _load_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"]
    grafana = _load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"


# --- metric names --------------------------------------------------------------------------------------


def test_promql_metric_names_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (kind, le) (rate(a_bucket{job="x", kind=~"index|crate"}[5m])))'
        " > 2.5 * 1024^3 and on (job) sum without (pid) (rate(b_total[1d] offset 30m)) / ignoring(kind)"
        ' group_left c{instance=~"$instance"} or up{l="by(z)"} unless max(d[$__rate_interval:1m]) > bool 1e3'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c", "up", "d"}
    assert promql_metric_names(_templating_promql("label_values(cratemirror_upstream_up, instance)")) == {
        "cratemirror_upstream_up"
    }


def test_metric_names_used_in_deploy_are_in_the_contract() -> None:
    used = metric_names_used_in_deploy()
    assert used, "no metric names found"
    assert used <= ALLOWED_METRIC_NAMES, f"not in the contract: {sorted(used - ALLOWED_METRIC_NAMES)}"


def test_alert_unit_test_series_are_contract_metrics() -> None:
    series = [s["series"] for test in _load_yaml(ALERTS_TEST)["tests"] for s in test["input_series"]]
    names = {promql_metric_names(s).pop() for s in series}
    assert names <= ALLOWED_METRIC_NAMES, sorted(names - ALLOWED_METRIC_NAMES)


# --- systemd -------------------------------------------------------------------------------------------


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify on a copy whose ExecStart binary exists: /usr/local/bin/cratemirror is not
    installed here, and verify rejects a unit whose binary is missing. Everything else is verified as is,
    and any warning (an unknown key, a bad value) fails the test."""
    systemd_analyze = _tool("systemd-analyze", "systemd")
    stub = tmp_path / "bin" / "cratemirror"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    text = SYSTEMD_UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={EXEC_START}\n" in text
    unit = tmp_path / "cratemirror.service"
    unit.write_text(
        text.replace("ExecStart=/usr/local/bin/cratemirror ", f"ExecStart={stub} "), encoding="utf-8"
    )
    result = _run([systemd_analyze, "verify", "--man=no", str(unit)])
    assert result.returncode == 0, _output(result)
    assert not (result.stdout + result.stderr).strip(), _output(result)


def test_systemd_unit_settings() -> None:
    unit = _parse_unit(SYSTEMD_UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert unit["Service"]["ExecStart"] == [EXEC_START]
    assert service["Restart"] == "on-failure"
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")  # serve sends READY=1
    assert f"CRATEMIRROR_CACHE_DIR={CACHE_DIR}" in unit["Service"]["Environment"]
    assert service["CacheDirectory"] == "cratemirror"
    assert service["StateDirectory"] == "cratemirror"
    assert service.get("DynamicUser") == "yes" or service.get("User") not in {None, "root"}
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}, expected {value!r}"
    assert "@system-service" in unit["Service"]["SystemCallFilter"]
    # Deliberately off: see the comment in the unit.
    assert service.get("MemoryDenyWriteExecute", "no") == "no"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --- configuration used by the deploy files ------------------------------------------------------------


def _env_overrides() -> dict[str, dict[str, str]]:
    """CRATEMIRROR_* variables each deploy file sets, by file."""
    compose_env = _load_yaml(COMPOSE)["services"]["mirror"].get("environment", {})
    container = _statefulset()["spec"]["template"]["spec"]["containers"][0]
    unit = _parse_unit(SYSTEMD_UNIT)
    systemd_env = dict(item.split("=", 1) for item in unit["Service"].get("Environment", []))
    found = {
        "Dockerfile": _dockerfile_env(),
        "docker-compose.yml": {str(k): str(v) for k, v in compose_env.items()},
        "statefulset.yaml": {e["name"]: str(e["value"]) for e in container.get("env", [])},
        "cratemirror.service": systemd_env,
    }
    return {
        where: {k: v for k, v in env.items() if k.startswith("CRATEMIRROR_")} for where, env in found.items()
    }


def test_environment_overrides_are_valid() -> None:
    """Every CRATEMIRROR_* variable set by a deploy file is one the mirror knows, with a valid value."""
    overrides = _env_overrides()
    assert overrides["Dockerfile"] == {
        "CRATEMIRROR_CACHE_DIR": CACHE_DIR,
        "CRATEMIRROR_SERVER_HOST": "0.0.0.0",
    }
    assert overrides["cratemirror.service"]["CRATEMIRROR_CACHE_DIR"] == CACHE_DIR
    for where, env in overrides.items():
        config = load_config(None, env=env)
        if "CRATEMIRROR_CACHE_DIR" in env:
            assert str(config.cache.dir) == CACHE_DIR, where


def test_example_configs_load(tmp_path: Path) -> None:
    """The mirror.yaml files shipped in deploy/ load with the mirror's own config loader."""
    for path in (SYSTEMD_CONFIG, _k8s_mirror_yaml(tmp_path)):
        config = load_config(path, env={})
        assert config.server.host == "0.0.0.0", path
        assert config.server.port == 8080, path
        assert str(config.cache.dir) == CACHE_DIR, path


def test_kubernetes_volume_is_larger_than_the_cache(tmp_path: Path) -> None:
    config = load_config(_k8s_mirror_yaml(tmp_path), env={})
    (claim,) = _statefulset()["spec"]["volumeClaimTemplates"]
    storage = _bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert storage > config.cache.max_size * 1.1, "the volume also holds the index cache: leave headroom"


# --- Docker --------------------------------------------------------------------------------------------


def test_dockerfile_essentials() -> None:
    final = _final_stage()
    words = [word for word, _ in final]
    (base,) = [args for word, args in final if word == "FROM"]
    assert re.match(r"python:(\$\{PYTHON_VERSION\}|3\.1[12])-slim\b", base), base
    (version,) = [
        args for word, args in _dockerfile_instructions() if word == "ARG" and "PYTHON_VERSION" in args
    ]
    assert version in {"PYTHON_VERSION=3.11", "PYTHON_VERSION=3.12"}
    users = [args for word, args in final if word == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, users
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "RUN after USER"
    assert [args for word, args in final if word == "VOLUME"] == [CACHE_DIR]
    assert [args for word, args in final if word == "EXPOSE"] == ["8080"]
    assert [args for word, args in final if word == "ENTRYPOINT"] == ['["cratemirror"]']
    assert [args for word, args in final if word == "CMD"] == ['["serve"]']
    installs = [args for args in _dockerfile("RUN") if "pip install" in args]
    assert any('--no-cache-dir ".[${EXTRAS}]"' in args for args in installs), installs
    assert "ARG EXTRAS=fast" in DOCKERFILE.read_text()


def test_dockerfile_healthcheck_uses_python() -> None:
    argv = _healthcheck_argv()
    assert Path(argv[0]).name.startswith("python"), argv
    assert "urllib" in argv[-1]
    assert "/healthz" in argv[-1]
    assert not any("curl" in a or "wget" in a for a in argv)


def test_dockerfile_copy_sources_exist() -> None:
    """COPY from the build context (the repository root) names only files that exist."""
    checked = []
    for args in _dockerfile("COPY") + _dockerfile("ADD"):
        if args.startswith("--from"):
            continue
        *sources, _ = [a for a in shlex.split(args) if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository root"
            checked.append(source)
    assert checked, "the Dockerfile copies nothing from the build context"


class _HealthHandler(BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        code = type(self).status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_dockerfile_healthcheck_probe_works() -> None:
    """Run the HEALTHCHECK's command (with this interpreter) against a stand-in /healthz on loopback."""
    argv = [sys.executable, *_healthcheck_argv()[1:]]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {"CRATEMIRROR_SERVER_PORT": str(server.server_address[1]), "PATH": "/usr/bin:/bin"}
        _HealthHandler.status = 200
        healthy = _run(argv, env=env)
        assert healthy.returncode == 0, _output(healthy)
        _HealthHandler.status = 503
        unhealthy = _run(argv, env=env)
        assert unhealthy.returncode != 0, _output(unhealthy)
        assert _HealthHandler.paths == ["/healthz", "/healthz"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- docker compose ------------------------------------------------------------------------------------


def test_compose_services() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert {"mirror", "prometheus", "grafana"} <= set(services)
    mirror = services["mirror"]
    assert (DEPLOY / mirror["build"]["context"]).resolve() == REPO
    assert (REPO / mirror["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "8080:8080" in mirror["ports"]
    cache_volume = f"cratemirror-cache:{CACHE_DIR}"
    assert cache_volume in mirror["volumes"]
    assert "cratemirror-cache" in compose["volumes"]
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    prometheus_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prometheus_mounts["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_compose_bind_mounts_exist() -> None:
    checked = []
    for name, service in _load_yaml(COMPOSE)["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
                checked.append(source)
    assert checked, "the compose file bind-mounts nothing from deploy/"


# --- Kubernetes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", K8S_MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_shape(path: Path) -> None:
    docs = _load_yaml_all(path)
    assert docs, f"{path}: no documents"
    for doc in docs:
        assert doc.get("apiVersion"), path
        assert doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), path
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "cratemirror", path


def test_kubernetes_statefulset() -> None:
    statefulset = _statefulset()
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    (container,) = pod["spec"]["containers"]
    assert container["args"][:3] == ["serve", "--config", "/etc/cratemirror/mirror.yaml"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in {"http", 8080}, probe
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    assert mounts[CACHE_DIR]["name"] in claims
    assert not mounts[CACHE_DIR].get("readOnly", False)
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert volumes[mounts["/etc/cratemirror"]["name"]]["configMap"]["name"] == "cratemirror-config"
    assert claims[mounts[CACHE_DIR]["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_kubernetes_service_and_servicemonitor_select_the_pod() -> None:
    pod_labels = _statefulset()["spec"]["template"]["metadata"]["labels"]
    (service,) = _load_yaml_all(K8S / "service.yaml")
    assert service["metadata"]["name"] == _statefulset()["spec"]["serviceName"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 8080, "http")
    (monitor,) = _load_yaml_all(K8S / "servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # The scrape job is named after the Service; alerts.yml selects job="cratemirror".
    assert service["metadata"]["name"] == "cratemirror"


def test_kustomization_lists_the_core_manifests() -> None:
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    # Optional: needs the Prometheus Operator's CRDs.
    assert "servicemonitor.yaml" not in resources
    assert sorted([*resources, "servicemonitor.yaml"]) == sorted(p.name for p in K8S_MANIFESTS)


# --- README --------------------------------------------------------------------------------------------


def test_readme_has_the_cargo_snippet() -> None:
    text = README.read_text(encoding="utf-8")
    assert "[source.crates-io]" in text
    assert 'replace-with = "mirror"' in text
    assert re.search(r'registry = "sparse\+http://[^"]+:8080/index/"', text)


def test_dockerfile_build_context_is_enough_to_install(tmp_path: Path) -> None:
    """No Docker engine here: lay out exactly what the build stage COPYs and build the wheel from it,
    so a file the package needs but the Dockerfile forgets fails here, not in someone's image build."""
    context = tmp_path / "src"
    context.mkdir()
    copies = re.findall(r"^COPY (?!--from)(.+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert copies, "the build stage copies nothing"
    for line in copies:
        *sources, destination = shlex.split(line)
        for source in sources:
            into = context / destination
            if destination.endswith("/"):
                into.mkdir(parents=True, exist_ok=True)
                into = into / Path(source).name
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(REPO / source, into)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("cratemirror-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"cratemirror/__main__.py", "cratemirror/web/status.html"} <= names, sorted(names)
