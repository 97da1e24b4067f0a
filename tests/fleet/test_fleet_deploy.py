"""Checks of the fleet's deploy files: deploy/haproxy/haproxy.cfg (haproxy -c), deploy/compose/ (compose
fleet file, its Prometheus config via promtool) and deploy/kubernetes/fleet/ (shapes, config loads)."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cratemirror.config import schema as config_module
from cratemirror.config.load import load_config
from cratemirror.config.schema import ConfigError
from tests.fleet_support import HAPROXY_CFG, make_tls, require

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.fleet.yml"
K8S_FLEET = REPO / "deploy" / "kubernetes" / "fleet"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for path in sorted(K8S_FLEET.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {K8S_FLEET}")


@pytest.fixture
def fleet_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if cratemirror[fleet] were installed (any importable module stands in for its clients)."""
    monkeypatch.setattr(config_module, "FLEET_MODULES", dict.fromkeys(config_module.FLEET_MODULES, "yaml"))


def test_haproxy_cfg_is_valid(tmp_path: Path) -> None:
    haproxy = require("haproxy", "haproxy")
    tls = make_tls(tmp_path)
    env = {
        "PATH": "/usr/bin:/bin",
        "CRATEMIRROR_FRONT_BIND": "127.0.0.1:8443",
        "CRATEMIRROR_FRONT_PEM": str(tls.server_pem),
        "CRATEMIRROR_REPLICAS": "localhost:8080",
    }
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = HAPROXY_CFG.read_text()
    for needed in (
        "alpn h2,http/1.1",
        "balance uri",
        "hash-type consistent",
        "option redispatch",
        "retry-on conn-failure empty-response response-timeout",
        "http-check send meth GET uri /readyz",
        "X-Forwarded-Proto https",
        "X-Forwarded-Host",
        "option forwardfor",
    ):
        assert needed in text, needed


def test_compose_fleet_services(fleet_extra: None) -> None:
    compose = _docs(COMPOSE)[0]
    services = compose["services"]
    assert set(services) == {"mirror", "front", "redis", "minio", "minio-bucket", "prometheus", "grafana"}
    mirror = services["mirror"]
    assert mirror["deploy"]["replicas"] == 3
    assert "fleet" in mirror["build"]["args"]["EXTRAS"]
    # Every variable is one the mirror knows, and together they load (S3 + Redis).
    # ${VAR:-default} as compose expands it with VAR unset
    env = {
        key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in mirror["environment"].items()
    }
    # The fleet secret has no default: compose refuses to start without it.
    assert env["CRATEMIRROR_STORAGE_S3_INTEGRITY_KEY"].startswith("${CRATEMIRROR_INTEGRITY_KEY:?")
    env["CRATEMIRROR_STORAGE_S3_INTEGRITY_KEY"] = secrets.token_hex(32)
    config = load_config(None, env=env)
    assert config.storage.backend == "s3"
    assert config.storage.s3.bucket == "crates"
    assert config.coordination.redis_url == "redis://redis:6379/0"
    front = services["front"]["environment"]
    assert front["CRATEMIRROR_REPLICAS"] == "mirror:8080"
    for volume in [
        *services["front"]["volumes"],
        *services["prometheus"]["volumes"],
        *services["grafana"]["volumes"],
    ]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE_DIR / source).exists() or source == "./certs", volume


def test_compose_fleet_prometheus_config(tmp_path: Path) -> None:
    promtool = require("promtool", "prometheus")
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_fleet_manifests(tmp_path: Path, fleet_extra: None) -> None:
    kustomization = _docs(K8S_FLEET / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        for doc in _docs(K8S_FLEET / resource):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], resource
            assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "cratemirror", resource

    deployment = _k8s("Deployment", "cratemirror")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["envFrom"] == [{"secretRef": {"name": "cratemirror-s3"}}]

    hpa = _k8s("HorizontalPodAutoscaler", "cratemirror")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cratemirror",
    }
    assert hpa["spec"]["minReplicas"] >= 2

    secret = _k8s("Secret", "cratemirror-s3")
    mirror_yaml = tmp_path / "mirror.yaml"
    mirror_yaml.write_text(_k8s("ConfigMap", "cratemirror-fleet-config")["data"]["mirror.yaml"])
    # The placeholder stops start-up naming the key; a made one loads.
    with pytest.raises(ConfigError, match=r"storage\.s3\.integrity_key: expected a secret of at least 32"):
        load_config(mirror_yaml, env=dict(secret["stringData"]))
    made = {**secret["stringData"], "CRATEMIRROR_STORAGE_S3_INTEGRITY_KEY": secrets.token_hex(32)}
    config = load_config(mirror_yaml, env=made)
    assert config.storage.backend == "s3" and config.storage.s3.serve == "redirect"
    assert config.coordination.redis_url == "redis://cratemirror-redis:6379/0"
    assert _k8s("Service", "cratemirror-redis")["spec"]["ports"][0]["port"] == 6379

    # The front runs the shipped haproxy.cfg, byte for byte, against the headless Service.
    assert _k8s("ConfigMap", "cratemirror-front")["data"]["haproxy.cfg"] == HAPROXY_CFG.read_text()
    front = _k8s("Deployment", "cratemirror-front")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in front["env"]}
    assert env["CRATEMIRROR_REPLICAS"] == "cratemirror-replicas:8080"
    assert _k8s("Service", "cratemirror-replicas")["spec"]["clusterIP"] == "None"
