"""The Helm chart in deploy/helm/llmproxy: renders, lints, validates, checks values.

Rendering and linting use helm-python-sdk (Helm's Go SDK, no helm binary);
manifests are checked against the Kubernetes OpenAPI schemas of
kubernetes-validate. Tests that need either skip when it is not installed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "llmproxy"

# The oldest Kubernetes the chart's preStop sleep action needs, and a recent one.
KUBE_VERSIONS = ("1.30.0", "1.33.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

ALL_ON: dict[str, Any] = {
    "apiKeys": {"create": True, "openai": "sk-test-openai", "anthropic": "sk-ant-test"},
    "config": {
        "upstreams": {
            "openai": {"headers": {"Authorization": "Bearer ${OPENAI_API_KEY}"}},
            "anthropic": {"headers": {"x-api-key": "${ANTHROPIC_API_KEY}"}},
        },
    },
    "env": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4318"}],
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
    },
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
}
VARIANTS = {"default": {}, "all_on": ALL_ON}


@pytest.fixture(scope="module")
def helm() -> Any:
    return pytest.importorskip(
        "helm_python", reason="helm-python-sdk is not installed (pip install it)"
    )


def render(helm: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``, NOTES.txt left out."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(
            copy.deepcopy(values), name="llmproxy", namespace="llm", is_install=True
        )
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = (o for o in objects if o["kind"] == kind)
    return found


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    return dict(main)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> dict[str, Any]:
    return VARIANTS[request.param]


# Rendering and linting


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_lint_is_clean(helm: Any, name: str) -> None:
    report = helm.lint(CHART, VARIANTS[name], strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_default_renders_the_core_objects(helm: Any) -> None:
    kinds = sorted(o["kind"] for o in render(helm))
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]


def test_all_on_renders_every_optional_part(helm: Any) -> None:
    kinds = sorted(o["kind"] for o in render(helm, ALL_ON))
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Secret",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_match_kubernetes_schemas(
    helm: Any, variant: dict[str, Any], kube_version: str
) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed"
    )
    for obj in render(helm, variant):
        if obj["kind"] in CRD_KINDS:
            continue  # no schema for CRDs there: checked by the tests below
        kv.validate(obj, kube_version, strict=True)


# The proxy's configuration


def _config_file(objects: list[dict[str, Any]], directory: Path) -> Path:
    configmap = next(o for o in objects if o["metadata"]["name"] == "llmproxy")
    path = directory / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"], encoding="utf-8")
    return path


def _pod_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the proxy would see, with Secret references resolved."""
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    env = {}
    for var in container(objects).get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            env[var["name"]] = var["value"]
        elif ref["key"] in secrets[ref["name"]]["stringData"]:
            env[var["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    return env


def test_rendered_config_passes_llmproxy_check(
    helm: Any, variant: dict[str, Any], tmp_path: Path
) -> None:
    objects = render(helm, variant)
    path = _config_file(objects, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(_pod_env(objects))
    result = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_default_config_is_the_containers_default(helm: Any) -> None:
    objects = render(helm)
    chart_config = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])
    image_config = yaml.safe_load(
        (ROOT / "deploy" / "docker" / "config.yaml").read_text(encoding="utf-8")
    )
    assert chart_config == image_config


def test_keys_reach_the_pod_from_an_existing_secret(helm: Any) -> None:
    objects = render(helm, {"apiKeys": {"existingSecret": "provider-keys"}})
    assert not [o for o in objects if o["kind"] == "Secret"]
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in container(objects)["env"]
        if "valueFrom" in v
    }
    assert refs == {
        "OPENAI_API_KEY": {
            "name": "provider-keys",
            "key": "OPENAI_API_KEY",
            "optional": True,
        },
        "ANTHROPIC_API_KEY": {
            "name": "provider-keys",
            "key": "ANTHROPIC_API_KEY",
            "optional": True,
        },
    }


def test_worker_count_reaches_the_pod(helm: Any) -> None:
    def workers(values: dict[str, Any]) -> list[str]:
        env = container(render(helm, values))["env"]
        return [v["value"] for v in env if v["name"] == "LLMPROXY_WORKERS"]

    assert workers({}) == ["2"]
    assert workers({"workers": 0}) == ["0"]


def test_notes_tell_how_to_point_clients_at_the_proxy(helm: Any) -> None:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render({}, name="edge", namespace="llm", is_install=True)
    (notes,) = (text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    assert "OPENAI_BASE_URL=http://edge-llmproxy.llm.svc:" in notes, notes
    assert "ANTHROPIC_BASE_URL=" in notes and "/anthropic" in notes, notes


def test_created_secret_holds_the_keys(helm: Any) -> None:
    objects = render(helm, ALL_ON)
    assert one(objects, "Secret")["stringData"] == {
        "OPENAI_API_KEY": "sk-test-openai",
        "ANTHROPIC_API_KEY": "sk-ant-test",
    }
    assert _pod_env(objects)["OPENAI_API_KEY"] == "sk-test-openai"


def test_config_change_rolls_the_pods(helm: Any) -> None:
    def checksum(values: dict[str, Any]) -> str:
        pod = one(render(helm, values), "Deployment")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/config"])

    changed = {"config": {"server": {"max_body_bytes": 1024}}}
    assert checksum({}) == checksum({})
    assert checksum({}) != checksum(changed)


def test_container_ports_follow_the_config(helm: Any) -> None:
    values = {"config": {"server": {"listen": ":8000", "admin_listen": "0.0.0.0:9100"}}}
    ports = {
        p["name"]: p["containerPort"] for p in container(render(helm, values))["ports"]
    }
    assert ports == {"proxy": 8000, "admin": 9100}


# Shutdown: the drain must finish before Kubernetes kills the pod


def _grace(objects: list[dict[str, Any]]) -> int:
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    return int(spec["terminationGracePeriodSeconds"])


@pytest.mark.parametrize("drain_grace", ["30s", "2m", "1500ms", 45, 0.5, "1h"])
def test_termination_grace_exceeds_preStop_and_drain(
    helm: Any, drain_grace: object, tmp_path: Path
) -> None:
    objects = render(helm, {"config": {"server": {"drain_grace": drain_grace}}})
    drain = load_config(_config_file(objects, tmp_path)).server.drain_grace
    pre_stop = container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert _grace(objects) > pre_stop + drain


def test_default_drain_grace_when_the_config_sets_none(helm: Any) -> None:
    values = {"config": {"server": {"drain_grace": None}}}
    assert _grace(render(helm, values)) == 5 + 30 + 10


def test_explicit_termination_grace_is_kept_when_long_enough(helm: Any) -> None:
    assert _grace(render(helm, {"terminationGracePeriodSeconds": 120})) == 120


def test_termination_grace_that_would_cut_the_drain_is_refused(helm: Any) -> None:
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render(helm, {"terminationGracePeriodSeconds": 35})


def test_unparseable_drain_grace_is_refused(helm: Any) -> None:
    with pytest.raises(helm.HelmError, match="drain_grace"):
        render(helm, {"config": {"server": {"drain_grace": "${GRACE}"}}})


# The pod


def test_pod_is_locked_down(helm: Any) -> None:
    objects = render(helm)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    main = container(objects)
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = (m for m in main["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_probes_use_the_admin_port(helm: Any) -> None:
    main = container(render(helm))
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_replicas_spread_over_zones_and_nodes(helm: Any) -> None:
    objects = render(helm)
    pod = one(objects, "Deployment")["spec"]["template"]
    spread = pod["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    for constraint in spread:
        selector = constraint["labelSelector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()


def test_autoscaler_owns_the_replica_count(helm: Any) -> None:
    objects = render(helm, ALL_ON)
    assert "replicas" not in one(objects, "Deployment")["spec"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llmproxy"
    assert {"scaleUp", "scaleDown"} <= hpa["spec"]["behavior"].keys()


def test_service_exposes_proxy_and_admin(helm: Any) -> None:
    objects = render(helm)
    service = one(objects, "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"proxy": (8080, "proxy"), "admin": (9090, "admin")}
    names = {p["name"] for p in container(objects)["ports"]}
    assert names == {"proxy", "admin"}


# Monitoring objects: CRDs, so their structure is checked here


def test_service_monitor_scrapes_the_admin_port(helm: Any) -> None:
    objects = render(helm, ALL_ON)
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    service = one(objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()


def test_prometheus_rule_embeds_the_shipped_rules(helm: Any) -> None:
    rule = one(render(helm, ALL_ON), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    shipped = yaml.safe_load(
        (CHART / "files" / "llmproxy-rules.yaml").read_text(encoding="utf-8")
    )
    assert rule["spec"]["groups"] == shipped["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert isinstance(r["expr"], str | int) and ("alert" in r) != (
                "record" in r
            )


def test_dashboard_configmap_is_found_by_the_grafana_sidecar(helm: Any) -> None:
    objects = render(helm, ALL_ON)
    dashboard = next(o for o in objects if o["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    shipped = json.loads((CHART / "files" / "llmproxy.json").read_text("utf-8"))
    assert json.loads(dashboard["data"]["llmproxy.json"]) == shipped


@pytest.mark.parametrize(
    ("copy_in_chart", "source"),
    [
        ("llmproxy-rules.yaml", "deploy/prometheus/llmproxy-rules.yaml"),
        ("llmproxy.json", "deploy/grafana/llmproxy.json"),
    ],
)
def test_chart_copies_match_their_sources(copy_in_chart: str, source: str) -> None:
    original = ROOT / source
    if not original.exists():
        pytest.skip(f"{source} does not exist yet; the chart ships a placeholder")
    chart_copy = CHART / "files" / copy_in_chart
    assert chart_copy.read_bytes() == original.read_bytes(), (
        f"copy {source} to {chart_copy.relative_to(ROOT)}"
    )


# values.schema.json


def _schema_errors(values: dict[str, Any]) -> Iterator[str]:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    merged = _merge(defaults, values)
    for error in jsonschema.Draft7Validator(schema).iter_errors(merged):
        yield error.message


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing: maps merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_schema_accepts_the_shipped_values(name: str) -> None:
    assert list(_schema_errors(VARIANTS[name])) == []


BAD_VALUES = {
    "negative replicas": {"replicaCount": -1},
    "replicas as a string": {"replicaCount": "2"},
    "unknown top-level key": {"replicas": 3},
    "unknown image key": {"image": {"name": "llmproxy"}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "port out of range": {"service": {"port": 70000}},
    "bad service type": {"service": {"type": "Ingress"}},
    "drain grace not a duration": {"config": {"server": {"drain_grace": "soon"}}},
    "listen without a port": {"config": {"server": {"listen": "0.0.0.0"}}},
    "config without routes": {"config": {"routes": []}},
    "autoscaling to zero": {"autoscaling": {"minReplicas": 0}},
    "cpu target over 100": {"autoscaling": {"targetCPUUtilizationPercentage": 150}},
    "negative preStop sleep": {"preStopSleepSeconds": -5},
    "termination grace as text": {"terminationGracePeriodSeconds": "60s"},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "often"}}},
    "dashboard switch as text": {"grafanaDashboard": {"enabled": "yes"}},
    "created secret without keys": {"apiKeys": {"create": True}},
    "both secret sources": {
        "apiKeys": {"create": True, "openai": "sk", "existingSecret": "keys"}
    },
    "pdb as a fraction": {"podDisruptionBudget": {"maxUnavailable": 0.5}},
    "negative workers": {"workers": -1},
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=list(BAD_VALUES))
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    assert list(_schema_errors(values)), f"accepted {values}"


@pytest.mark.parametrize(
    "values",
    [BAD_VALUES["negative replicas"], BAD_VALUES["unknown top-level key"]],
    ids=["negative replicas", "unknown top-level key"],
)
def test_helm_itself_enforces_the_schema(helm: Any, values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, kube_version="v1.33.0")
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])
    with pytest.raises(helm.HelmError):
        render(helm, values)
