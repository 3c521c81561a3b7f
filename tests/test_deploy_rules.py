"""The shipped monitoring: Prometheus rules, their promtool tests, Grafana dashboard.

Static checks that need no server: the rules pass ``promtool check rules`` and
their unit tests, every alert has a test that fires it and one that keeps it
silent, every metric and label the expressions name is one the proxy exposes,
and the dashboard is an importable JSON model with a row per pitfall.
``test_dashboard_socket.py`` runs every expression against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from llmproxy.config import build_config
from llmproxy.errors import ERROR_TYPES
from llmproxy.exchange import TOKEN_FIELDS
from llmproxy.ratelimits import RESOURCES
from llmproxy.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "llmproxy-rules.yaml"
RULE_TESTS = sorted(RULES.parent.glob("*.test.yaml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "llmproxy.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VARIABLES = ("route", "upstream", "model")
# Grafana's own variables the expressions may use, besides the template's.
GRAFANA_VARIABLES = {"__rate_interval", "__range", "__interval"}

# Each pitfall the dashboard answers: its row's title, and what the row's
# expressions must show.
ROWS = {
    "Latency": [
        f"llmproxy:{histogram}:{quantile}_5m"
        for histogram in (
            "request_duration_seconds",
            "overhead_seconds",
            "time_to_first_token_seconds",
        )
        for quantile in ("p50", "p95", "p99")
    ],
    "Cost": [
        "llmproxy:tokens_per_hour:rate5m",
        "llmproxy:cost_usd_per_hour:rate5m",
        "llmproxy:output_tokens_per_request:ratio_rate1h",
        "offset 1w",
    ],
    "Errors": ["llmproxy_errors_total", "error_type"],
    "Rate limits and provider queueing": [
        "llmproxy:ratelimit_headroom:ratio",
        "llmproxy:time_to_response_headers_seconds:p99_5m",
        'error_type=~"rate_limited|overloaded"',
    ],
    "Breakers and health": [
        "llmproxy_circuit_breaker_state",
        "llmproxy:upstream_health:max_state",
    ],
    "Response anomalies": ["llmproxy:response_anomalies:ratio_rate15m"],
    "Prompt cache": ["llmproxy:prompt_cache_hit:ratio_rate5m"],
    "Proxy saturation": [
        "llmproxy_inflight_requests",
        "llmproxy_queued_requests",
        "llmproxy:queue_wait_seconds:p99_5m",
    ],
}
SEVERITIES = {"critical", "warning", "info"}
# The closed vocabularies of PRODUCT.md: a value outside them in a matcher is a
# typo that would make its panel or alert silently empty.
TOKEN_TYPES = {token_type for token_type, _ in TOKEN_FIELDS}
VOCABULARIES = {
    "error_type": set(ERROR_TYPES),
    "state": {"up", "degraded", "down"},
    "type": TOKEN_TYPES,
    "gen_ai_token_type": TOKEN_TYPES,
    "resource": set(RESOURCES),
    "kind": {
        "truncated",
        "content_filter",
        "refusal",
        "empty",
        "invalid_json",
        "invalid_tool_arguments",
    },
    "status_class": {"1xx", "2xx", "3xx", "4xx", "5xx"},
    "usage_source": {"provider", "injected", "estimated"},
    "stream": {"true", "false"},
}
_METRIC = re.compile(r"\b(?:llmproxy|gen_ai)_[a-z0-9_]+")
_SELECTOR = re.compile(r"\b((?:llmproxy|gen_ai)_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_VALUE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_WORD = re.compile(r"[a-z0-9_]+")
_RECORDED = re.compile(r"\bllmproxy:[a-z0-9_]+:[a-z0-9_]+\b")


def load_rules() -> dict[str, Any]:
    return dict(yaml.safe_load(RULES.read_text()))


def rules(kind: str) -> list[dict[str, Any]]:
    """Every rule of one kind, ``record`` or ``alert``, across the groups."""
    return [r for g in load_rules()["groups"] for r in g["rules"] if kind in r]


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def exposed_metrics() -> dict[str, set[str]]:
    """Every series name the proxy can expose, with the labels each carries."""
    registry = CollectorRegistry()
    raw = {
        "upstreams": {"openai": {"url": "http://127.0.0.1:1", "api": "openai"}},
        "routes": [{"prefix": "/v1", "upstream": "openai"}],
    }
    metrics = Metrics(build_config(raw), registry)
    names: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        labels = set(getattr(collector, "_labelnames", ()))
        kind = getattr(collector, "_type", None)
        name = getattr(collector, "_name", None)
        if name is None:
            continue
        if kind == "counter":
            names[name + "_total"] = labels
        elif kind == "histogram":
            for suffix in ("_sum", "_count"):
                names[name + suffix] = labels
            names[name + "_bucket"] = labels | {"le"}
        else:
            names[name] = labels
    return names


def every_expr() -> list[str]:
    return [r["expr"] for r in rules("record") + rules("alert")] + dashboard_exprs(
        load_dashboard()
    )


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (CI installs Debian's prometheus)")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, check=False, cwd=ROOT
    )


def test_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass_promtool() -> None:
    assert RULE_TESTS, "no promtool test files beside the rules"
    result = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        suite = yaml.safe_load(path.read_text())
        assert suite["rule_files"] == [RULES.name], path
        for group in suite["tests"]:
            for case in group.get("alert_rule_test", []):
                name = case["alertname"]
                (firing if case.get("exp_alerts") else silent).add(name)
    alerts = {r["alert"] for r in rules("alert")}
    assert alerts - firing == set(), "alerts no test makes fire"
    assert alerts - silent == set(), "alerts no test checks silent"
    assert (firing | silent) - alerts == set(), "tests of alerts that do not exist"


def test_alerts_carry_severity_and_runbook() -> None:
    for alert in rules("alert"):
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook"}, name
        assert all(str(v).strip() for v in annotations.values()), name
        assert len(annotations["runbook"]) > 200, f"{name}: runbook says too little"


def test_readme_explains_every_alert() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for alert in rules("alert"):
        assert f"| `{alert['alert']}` |" in readme, f"{alert['alert']}: not in README"


def test_recording_rules_are_named_level_metric_operation() -> None:
    names = [r["record"] for r in rules("record")]
    assert len(names) == len(set(names))
    for name in names:
        assert _RECORDED.fullmatch(name), name


def test_expressions_name_only_exposed_metrics_and_labels() -> None:
    exposed = exposed_metrics()
    label_names = set().union(*exposed.values())
    for expr in every_expr():
        for name in set(_METRIC.findall(expr)) - label_names:
            assert name in exposed, f"{name} is not exposed: {expr}"
        for name, matchers in _SELECTOR.findall(expr):
            for label in _MATCHER.findall(matchers):
                assert label in exposed[name], f"{name} has no label {label}: {expr}"


def test_matchers_use_only_values_of_the_closed_vocabularies() -> None:
    for expr in every_expr():
        for label, _, value in _VALUE.findall(expr):
            if label not in VOCABULARIES or "$" in value:
                continue  # a template variable: Grafana fills it in
            # Plain alternatives only ("a|b"); a real regex is left unchecked.
            words = [w for w in value.split("|") if _WORD.fullmatch(w)]
            unknown = set(words) - VOCABULARIES[label]
            assert not unknown, f"{label} has no value {unknown}: {expr}"


def test_dashboard_reads_only_recorded_series_that_exist() -> None:
    recorded = {r["record"] for r in rules("record")}
    for expr in dashboard_exprs(load_dashboard()):
        for name in _RECORDED.findall(expr):
            assert name in recorded, f"{name} is not recorded: {expr}"


def test_dashboard_is_an_importable_model() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["id"] is None  # a new dashboard on import, never an overwrite
    assert dashboard["uid"] and dashboard["title"]
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_is_templated_on_datasource_route_upstream_model() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in VARIABLES:
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["datasource"] == DATASOURCE, name
        assert variable["multi"] and variable["includeAll"], name
        definition = variable["definition"]
        assert definition.startswith("label_values(llmproxy_requests_total"), name
        assert definition.endswith(f", {name})"), name
        assert variable["query"]["query"] == definition, name


def test_every_panel_queries_the_templated_datasource() -> None:
    for panel in dashboard_panels(load_dashboard()):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            unknown = used - set(VARIABLES) - GRAFANA_VARIABLES
            assert not unknown, f"{panel['title']}: unknown variables {unknown}"


def test_dashboard_has_a_row_per_pitfall() -> None:
    exprs_by_row: dict[str, list[str]] = {}
    current: list[str] = []
    for panel in load_dashboard()["panels"]:
        if panel["type"] == "row":
            current = exprs_by_row.setdefault(panel["title"], [])
            current.extend(t["expr"] for p in panel["panels"] for t in p["targets"])
        else:
            current.extend(t["expr"] for t in panel["targets"])
    for title, wanted in ROWS.items():
        assert title in exprs_by_row, f"no row {title!r}"
        text = "\n".join(exprs_by_row[title])
        for fragment in wanted:
            assert fragment in text, f"row {title!r} does not show {fragment}"
