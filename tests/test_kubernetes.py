"""The Kubernetes manifests: valid for the API server (kubernetes-validate, strict), and true to
the app they run (its settings, routes, port, user, drain and metrics)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastserve.config import ENV_PREFIX, GROUPS, env_name
from fastserve.worker import _DRAIN_TIMEOUT_S

ROOT = Path(__file__).parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
# Kinds that come from CRDs or tools: kubernetes-validate has no schema for them.
NOT_IN_THE_API = {"ServiceMonitor", "Kustomization"}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def one(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


def test_every_manifest_is_valid_for_the_kubernetes_api() -> None:
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert validate is not None, "kubernetes-validate is a test dependency"
    files = [str(path) for path in sorted(MANIFESTS.glob("*.yaml"))]
    done = subprocess.run([validate, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = set(re.findall(r"passed for resource (\S+)", done.stdout + done.stderr))
    expected = {
        f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        for _, doc in documents()
        if doc["kind"] not in NOT_IN_THE_API
    }
    assert passed == expected  # none skipped for want of a schema


def test_the_kustomization_applies_every_manifest_but_the_examples() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {"secret.example.yaml", "hpa-queue-depth.yaml"}  # a real secret; an alternative HPA
    assert listed == on_disk - examples


def container() -> dict[str, Any]:
    pod = one("Deployment", "fastserve")["spec"]["template"]["spec"]
    (found,) = pod["containers"]
    return found  # type: ignore[no-any-return]


def test_settings_are_real_fastserve_settings() -> None:
    known = {env_name(f.name) for group in GROUPS for f in group.__dataclass_fields__.values()}
    config = one("ConfigMap", "fastserve")["data"]
    env = {e["name"] for e in container()["env"]}
    for name in {*config, *env}:
        if name.startswith(ENV_PREFIX):
            assert name in known, f"{name} is not a setting"
    assert config["FASTSERVE_HOST"] == "0.0.0.0"  # loopback is unreachable from the Service
    # The admin token comes from a Secret, never from the ConfigMap.
    assert "FASTSERVE_ADMIN_TOKEN" not in config
    (token,) = [e for e in container()["env"] if e["name"] == "FASTSERVE_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "fastserve-admin", "key": "token"}
    assert one("Secret", "fastserve-admin")["stringData"].keys() == {"token"}


def test_probes_and_ports_are_the_apps() -> None:
    from fastserve.app import create_app

    routes = {route.path for route in create_app().starlette.routes}  # type: ignore[attr-defined]
    c = container()
    port = int(one("ConfigMap", "fastserve")["data"]["FASTSERVE_PORT"])
    assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] in routes
        assert c[probe]["httpGet"]["port"] == "http"
    service = one("Service", "fastserve")["spec"]
    assert service["ports"][0]["targetPort"] == "http"
    monitor = one("ServiceMonitor", "fastserve")["spec"]
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics" and "/metrics" in routes


def test_the_grace_period_covers_the_pre_stop_wait_and_the_drain() -> None:
    pod = one("Deployment", "fastserve")["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + _DRAIN_TIMEOUT_S + 5


def test_the_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    pod = one("Deployment", "fastserve")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    # tempfile's directory (the workers' metric files) is the one writable mount.
    assert [m["mountPath"] for m in container()["volumeMounts"]] == ["/tmp"]
    resources = container()["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]
    workers = int(one("ConfigMap", "fastserve")["data"]["FASTSERVE_WORKERS"])
    assert workers <= float(resources["limits"]["cpu"])  # a worker per core the pod may use


@pytest.mark.parametrize("name", ["fastserve", "fastserve-queue-depth"])
def test_autoscalers_and_the_budget_aim_at_the_deployment(name: str) -> None:
    labels = one("Deployment", "fastserve")["spec"]["template"]["metadata"]["labels"]
    hpa = one("HorizontalPodAutoscaler", name)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fastserve"}
    assert one("PodDisruptionBudget", "fastserve")["spec"]["selector"]["matchLabels"] == labels
    assert one("Service", "fastserve")["spec"]["selector"] == labels
    for metric in hpa["metrics"]:
        if metric["type"] == "Pods":  # through the Prometheus Adapter: a metric fastserve exports
            exported = (ROOT / "src" / "fastserve" / "metrics.py").read_text()
            assert f'"{metric["pods"]["metric"]["name"]}"' in exported


def test_the_state_url_names_the_redis_service() -> None:
    url = one("ConfigMap", "fastserve")["data"]["FASTSERVE_STATE_URL"]
    redis = one("Service", "fastserve-redis")["spec"]
    assert url == f"redis://fastserve-redis:{redis['ports'][0]['port']}/0"
