"""Configuration: typed values, durations, ``${VAR}``, every problem with its path.

The ``llmproxy check`` tests run the command line as a real subprocess.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.config import (
    Breaker,
    Config,
    Health,
    Price,
    Retries,
    Route,
    Server,
    Telemetry,
    Timeouts,
    build_config,
    load_config,
    parse_address,
    parse_duration,
)
from llmproxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# The example block of PRODUCT.md, one comment shortened for width. It is a
# fragment: its routes name an `anthropic` upstream and an `azure` fallback that
# the block does not define.
PRODUCT_EXAMPLE = """\
server:
  listen: 0.0.0.0:8080          # proxied traffic only
  admin_listen: 0.0.0.0:9090    # /metrics and health; never proxied
  max_body_bytes: 16777216
upstreams:
  openai:
    url: https://api.openai.com
    api: openai                  # openai | anthropic (the wire dialect)
    headers:                     # set on every forwarded request; ${VAR} reads env
      Authorization: "Bearer ${OPENAI_API_KEY}"
    timeouts: {connect: 5s, first_byte: 60s, idle: 60s, total: 10m}
    breaker: {failures: 4, window: 1s, reset_after: 30s}
    retries: {attempts: 2, backoff: 250ms}
    max_concurrency: 512
    health: {path: /v1/models, interval: 15s, timeout: 5s, degraded_latency: 2s}
routes:
  - prefix: /anthropic
    upstream: anthropic
    strip_prefix: true
  - prefix: /v1
    upstream: openai
    fallbacks: [azure]
pricing:                         # USD per million tokens; overrides the shipped table
  gpt-4o: {input: 2.50, cached_input: 1.25, output: 10.00}
"""

# What the example leaves out, so that it loads.
PRODUCT_EXAMPLE_COMPLETION = """\
  anthropic:
    url: https://api.anthropic.com
    api: anthropic
  azure:
    url: https://example.openai.azure.com/
    headers: {api-key: "${AZURE_KEY:-azure-default}"}
"""

BEARER = "Bearer ${OPENAI_API_KEY}"
PROBLEM_LINE = re.compile(r"^[A-Za-z0-9_.\[\]()/:* -]+?: \S.*$")


def product_example_complete() -> str:
    head, _, tail = PRODUCT_EXAMPLE.partition("routes:\n")
    return head + PRODUCT_EXAMPLE_COMPLETION + "routes:\n" + tail


def minimal() -> dict[str, Any]:
    return {
        "upstreams": {"openai": {"url": "https://api.openai.com"}},
        "routes": [{"prefix": "/v1", "upstream": "openai"}],
    }


def two_upstreams() -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:8080", "admin_listen": "127.0.0.1:9090"},
        "upstreams": {
            "openai": {"url": "https://api.openai.com", "api": "openai"},
            "anthropic": {"url": "https://api.anthropic.com", "api": "anthropic"},
        },
        "routes": [
            {"prefix": "/anthropic", "upstream": "anthropic", "strip_prefix": True},
            {"prefix": "/v1", "upstream": "openai"},
        ],
    }


def problems(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    return info.value.problems


def paths(found: list[str]) -> list[str]:
    return [p.split(": ", 1)[0] for p in found]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_CONFIG", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_KEY", raising=False)


# --- valid configurations ------------------------------------------------------


def test_product_example_loads_with_typed_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    path = tmp_path / "llmproxy.yaml"
    path.write_text(product_example_complete())

    config = load_config(path)

    assert config.source == str(path)
    assert config.server == Server(
        listen=("0.0.0.0", 8080),
        admin_listen=("0.0.0.0", 9090),
        max_body_bytes=16777216,
        drain_grace=30.0,
    )
    openai = config.upstreams["openai"]
    assert openai.name == "openai"
    assert openai.url == "https://api.openai.com"
    assert (openai.api, openai.provider) == ("openai", "openai")
    assert dict(openai.headers) == {"Authorization": "Bearer sk-test-123"}
    assert openai.sets_credentials
    assert openai.timeouts == Timeouts(
        connect=5.0, first_byte=60.0, idle=60.0, total=600.0
    )
    assert openai.breaker == Breaker(failures=4, window=1.0, reset_after=30.0)
    assert openai.retries == Retries(attempts=2, backoff=0.25, max_retry_after=5.0)
    assert openai.max_concurrency == 512
    assert openai.health == Health(
        path="/v1/models", interval=15.0, timeout=5.0, degraded_latency=2.0
    )
    assert config.routes == (
        Route(
            prefix="/anthropic",
            upstream="anthropic",
            name="/anthropic",
            strip_prefix=True,
        ),
        Route(prefix="/v1", upstream="openai", name="/v1", fallbacks=("azure",)),
    )
    assert dict(config.pricing) == {
        "gpt-4o": Price(input=2.5, output=10.0, cached_input=1.25)
    }
    assert config.telemetry == Telemetry(max_models=50, log_requests=True)


def test_product_example_completion_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "k")

    config = build_config(yaml.safe_load(product_example_complete()))

    anthropic = config.upstreams["anthropic"]
    assert (anthropic.api, anthropic.provider) == ("anthropic", "anthropic")
    assert not anthropic.sets_credentials
    azure = config.upstreams["azure"]
    assert azure.url == "https://example.openai.azure.com"  # trailing / dropped
    assert dict(azure.headers) == {"api-key": "azure-default"}
    assert azure.sets_credentials


def test_product_example_verbatim_reports_its_undefined_upstreams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "k")

    found = problems(yaml.safe_load(PRODUCT_EXAMPLE))

    assert paths(found) == ["routes[0].upstream", "routes[1].fallbacks[0]"]
    assert "'anthropic'" in found[0]
    assert "'azure'" in found[1]


def test_minimal_config_takes_every_default() -> None:
    config = build_config(minimal())

    assert config.server == Server()
    assert config.server.listen == ("0.0.0.0", 8080)
    assert config.server.admin_listen == ("0.0.0.0", 9090)
    assert config.server.max_body_bytes == 16 * 1024 * 1024
    openai = config.upstreams["openai"]
    assert (openai.api, openai.provider) == ("openai", "openai")
    assert dict(openai.headers) == {}
    assert not openai.sets_credentials
    assert openai.timeouts == Timeouts(5.0, 60.0, 60.0, 600.0)
    assert openai.breaker == Breaker(5, 10.0, 30.0, 1)
    assert openai.retries == Retries(2, 0.25, 5.0)
    assert (openai.max_concurrency, openai.max_queue) == (512, 1024)
    assert openai.health == Health(None, 15.0, 5.0, 2.0)
    assert openai.inject_stream_usage is True
    assert config.routes == (Route("/v1", "openai", "/v1"),)
    assert dict(config.pricing) == {}
    assert config.telemetry == Telemetry()
    assert config.source == "<built-in>"


def test_every_optional_key_is_read() -> None:
    raw = two_upstreams()
    raw["server"].update(max_body_bytes=1024, drain_grace="2s")
    raw["upstreams"]["openai"].update(
        provider="vllm",
        url="http://10.0.0.1:8000/",
        max_concurrency=3,
        max_queue=0,
        inject_stream_usage=False,
        breaker={
            "failures": 2,
            "window": "5s",
            "reset_after": 1,
            "half_open_trials": 3,
        },
        retries={"attempts": 1, "backoff": 0, "max_retry_after": "1m"},
        headers={"OpenAI-Organization": "org-1", "X-Number": 7},
    )
    raw["upstreams"]["azure"] = {"url": "https://azure.example", "api": "openai"}
    raw["routes"][1].update(name="chat", models=["gpt-4*", "o1"], fallbacks=["azure"])
    raw["telemetry"] = {"max_models": 5, "log_requests": False}
    raw["pricing"] = {
        "m": {"input": 1, "output": 2, "cache_creation_input": 3, "reasoning": 4}
    }

    config = build_config(raw, source="test.yaml")

    assert config.source == "test.yaml"
    assert config.server.listen == ("127.0.0.1", 8080)
    assert config.server.max_body_bytes == 1024
    assert config.server.drain_grace == 2.0
    up = config.upstreams["openai"]
    assert up.url == "http://10.0.0.1:8000"
    assert (up.api, up.provider) == ("openai", "vllm")
    assert (up.max_concurrency, up.max_queue) == (3, 0)
    assert up.inject_stream_usage is False
    assert up.breaker == Breaker(2, 5.0, 1.0, 3)
    assert up.retries == Retries(1, 0.0, 60.0)
    assert dict(up.headers) == {"OpenAI-Organization": "org-1", "X-Number": "7"}
    assert not up.sets_credentials
    assert config.routes[1] == Route(
        "/v1", "openai", "chat", models=("gpt-4*", "o1"), fallbacks=("azure",)
    )
    assert config.telemetry == Telemetry(max_models=5, log_requests=False)
    assert config.pricing["m"] == Price(1.0, 2.0, None, 3.0, 4.0)
    assert isinstance(config.pricing["m"].input, float)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("/v1/", "/v1"), ("/v1", "/v1"), ("/", "/"), ("//", "/"), ("/a/b/", "/a/b")],
)
def test_route_prefix_drops_trailing_slashes(prefix: str, expected: str) -> None:
    raw = minimal()
    raw["routes"][0]["prefix"] = prefix

    route = build_config(raw).routes[0]

    assert (route.prefix, route.name) == (expected, expected)


def test_routes_sharing_a_prefix_are_named_prefix_colon_upstream() -> None:
    raw = two_upstreams()
    raw["routes"] = [
        {"prefix": "/v1/", "upstream": "anthropic", "models": ["claude*"]},
        {"prefix": "/v1", "upstream": "openai"},
        {"prefix": "/anthropic", "upstream": "anthropic"},
    ]

    names = [r.name for r in build_config(raw).routes]

    assert names == ["/v1:anthropic", "/v1:openai", "/anthropic"]


def test_listen_and_admin_may_both_ask_for_any_free_port() -> None:
    raw = minimal()
    raw["server"] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}

    config = build_config(raw)

    assert config.server.listen == config.server.admin_listen == ("127.0.0.1", 0)


# --- durations and addresses ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0ms", 0.0),
        (" 5s ", 5.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (30, 30.0),
        (0, 0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    parsed = parse_duration(value)

    assert parsed == pytest.approx(seconds)
    assert isinstance(parsed, float)


@pytest.mark.parametrize(
    "value",
    ["5 minutes", "5x", "", "abc", "s", "ms", "-5s", "1e3", "5S", "1d", None, [5], {}],
)
def test_parse_duration_rejects_non_durations(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5])
def test_parse_duration_rejects_negatives(value: float) -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_parse_duration_rejects_nan() -> None:
    with pytest.raises(ValueError):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "expected a duration"),
        (True, "expected a duration"),
        (-3, "negative"),
        ("-3s", "expected a duration"),
    ],
)
def test_bad_duration_in_config_names_its_field(value: object, message: str) -> None:
    raw = minimal()
    raw["upstreams"]["openai"]["timeouts"] = {"connect": value}

    found = problems(raw)

    assert paths(found) == ["upstreams.openai.timeouts.connect"]
    assert message in found[0]


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (":9090", ("0.0.0.0", 9090)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_address(value: str, address: tuple[str, int]) -> None:
    assert parse_address(value) == address


@pytest.mark.parametrize(
    "value", ["8080", 8080, "host:", "host:http", "host:65536", "host:-1", None]
)
def test_parse_address_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_address(value)


# --- environment expansion -----------------------------------------------------


def test_env_var_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc")
    monkeypatch.setenv("UPSTREAM_HOST", "10.1.2.3")
    raw = minimal()
    raw["upstreams"]["openai"]["url"] = "http://${UPSTREAM_HOST}:8000"
    raw["upstreams"]["openai"]["headers"] = {"Authorization": BEARER}

    up = build_config(raw).upstreams["openai"]

    assert up.url == "http://10.1.2.3:8000"
    assert dict(up.headers) == {"Authorization": "Bearer sk-abc"}


def test_env_default_used_when_unset_and_ignored_when_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLMPROXY_TEST_UNSET", raising=False)
    monkeypatch.setenv("LLMPROXY_TEST_SET", "from-env")
    raw = minimal()
    raw["upstreams"]["openai"]["headers"] = {
        "X-A": "${LLMPROXY_TEST_UNSET:-fallback value}",
        "X-B": "${LLMPROXY_TEST_SET:-fallback}",
        "X-C": "${LLMPROXY_TEST_UNSET:-}x",
        "X-D": "${LLMPROXY_TEST_SET}-${LLMPROXY_TEST_UNSET:-two}",
    }

    headers = dict(build_config(raw).upstreams["openai"].headers)

    assert headers == {
        "X-A": "fallback value",
        "X-B": "from-env",
        "X-C": "x",
        "X-D": "from-env-two",
    }


def test_env_default_feeds_typed_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPROXY_TEST_UNSET", raising=False)
    raw = minimal()
    raw["upstreams"]["openai"]["timeouts"] = {"total": "${LLMPROXY_TEST_UNSET:-2m}"}
    raw["server"] = {"listen": "${LLMPROXY_TEST_UNSET:-127.0.0.1:7000}"}

    config = build_config(raw)

    assert config.upstreams["openai"].timeouts.total == 120.0
    assert config.server.listen == ("127.0.0.1", 7000)


def test_env_default_used_when_set_but_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPROXY_TEST_EMPTY", "")
    raw = minimal()
    raw["upstreams"]["openai"]["headers"] = {"X-A": "${LLMPROXY_TEST_EMPTY:-fallback}"}

    headers = dict(build_config(raw).upstreams["openai"].headers)

    assert headers == {"X-A": "fallback"}


def test_env_var_without_braces_or_with_bad_name_is_literal() -> None:
    raw = minimal()
    raw["upstreams"]["openai"]["headers"] = {"X-A": "$HOME", "X-B": "${1BAD}"}

    headers = dict(build_config(raw).upstreams["openai"].headers)

    assert headers == {"X-A": "$HOME", "X-B": "${1BAD}"}


def test_missing_env_var_reported_with_its_field_path() -> None:
    raw = minimal()
    raw["upstreams"]["openai"]["headers"] = {"Authorization": BEARER}

    found = problems(raw)

    assert found == [
        "upstreams.openai.headers.Authorization: "
        "environment variable OPENAI_API_KEY is not set"
    ]


def test_missing_env_var_in_a_list_reports_the_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLMPROXY_TEST_UNSET", raising=False)
    raw = minimal()
    raw["routes"].append(
        {"prefix": "/x", "upstream": "openai", "fallbacks": ["${LLMPROXY_TEST_UNSET}"]}
    )

    found = problems(raw)

    # The variable expands to "", which then names no upstream either.
    assert found == [
        "routes[1].fallbacks[0]: environment variable LLMPROXY_TEST_UNSET is not set",
        "routes[1].fallbacks[0]: unknown upstream ''",
    ]


def test_env_value_with_newline_is_refused_in_a_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc\r\nX-Injected: 1")
    raw = minimal()
    raw["upstreams"]["openai"]["headers"] = {"Authorization": BEARER}

    found = problems(raw)

    assert paths(found) == ["upstreams.openai.headers.Authorization"]
    assert "CR" in found[0]


# --- one problem, one path -----------------------------------------------------


def _set(raw: dict[str, Any], dotted: str, value: object) -> None:
    """Set ``a.b.0.c`` in a nested structure of dicts and lists."""
    *parents, last = dotted.split(".")
    node: Any = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


SINGLE_PROBLEMS = [
    # (where to set, value, expected path, words of the message)
    ("servers", {}, "servers", "unknown key"),
    ("server.port", 80, "server.port", "unknown key"),
    ("upstreams.openai.timeout", "5s", "upstreams.openai.timeout", "unknown key"),
    (
        "upstreams.openai.timeouts.read",
        "5s",
        "upstreams.openai.timeouts.read",
        "unknown key",
    ),
    (
        "upstreams.openai.breaker.threshold",
        3,
        "upstreams.openai.breaker.threshold",
        "unknown key",
    ),
    ("upstreams.openai.retries.max", 3, "upstreams.openai.retries.max", "unknown key"),
    ("upstreams.openai.health.url", "/x", "upstreams.openai.health.url", "unknown key"),
    ("routes.1.path", "/v1", "routes[1].path", "unknown key"),
    (
        "pricing",
        {"m": {"input": 1, "output": 1, "cache": 1}},
        "pricing.m.cache",
        "unknown key",
    ),
    ("telemetry.level", "x", "telemetry.level", "unknown key"),
    ("upstreams.openai.url", "ftp://api.openai.com", "upstreams.openai.url", "http"),
    ("upstreams.openai.url", "api.openai.com", "upstreams.openai.url", "http"),
    ("upstreams.openai.url", "https://", "upstreams.openai.url", "host"),
    ("upstreams.openai.url", 42, "upstreams.openai.url", "http"),
    ("upstreams.openai.url", None, "upstreams.openai.url", "http"),
    ("upstreams.openai.url", "https://h/?a=1", "upstreams.openai.url", "query"),
    ("upstreams.openai.url", "https://h/#top", "upstreams.openai.url", "fragment"),
    ("upstreams.openai.api", "gemini", "upstreams.openai.api", "'gemini'"),
    ("upstreams.openai.provider", "", "upstreams.openai.provider", "non-empty"),
    ("upstreams.openai.headers", ["a"], "upstreams.openai.headers", "mapping"),
    (
        "upstreams.openai.headers",
        {"X-A": "a\r\nb"},
        "upstreams.openai.headers.X-A",
        "CR",
    ),
    ("upstreams.openai.headers", {"X-A": "a\nb"}, "upstreams.openai.headers.X-A", "LF"),
    ("upstreams.openai.headers", {"X-A": "a\rb"}, "upstreams.openai.headers.X-A", "CR"),
    (
        "upstreams.openai.headers",
        {"X-A\r\nX-B": "v"},
        "upstreams.openai.headers.X-A\r\nX-B",
        "CR",
    ),
    (
        "upstreams.openai.headers",
        {"X-A": None},
        "upstreams.openai.headers.X-A",
        "string",
    ),
    (
        "upstreams.openai.headers",
        {"X-A": True},
        "upstreams.openai.headers.X-A",
        "string",
    ),
    (
        "upstreams.openai.max_concurrency",
        0,
        "upstreams.openai.max_concurrency",
        "at least 1",
    ),
    (
        "upstreams.openai.max_concurrency",
        "many",
        "upstreams.openai.max_concurrency",
        "integer",
    ),
    ("upstreams.openai.max_queue", -1, "upstreams.openai.max_queue", "at least 0"),
    (
        "upstreams.openai.breaker.failures",
        True,
        "upstreams.openai.breaker.failures",
        "integer",
    ),
    (
        "upstreams.openai.retries.attempts",
        1.5,
        "upstreams.openai.retries.attempts",
        "integer",
    ),
    (
        "upstreams.openai.inject_stream_usage",
        "no",
        "upstreams.openai.inject_stream_usage",
        "true or false",
    ),
    (
        "upstreams.openai.health.path",
        "v1/models",
        "upstreams.openai.health.path",
        "starting with /",
    ),
    (
        "upstreams.openai.health.interval",
        "often",
        "upstreams.openai.health.interval",
        "duration",
    ),
    ("upstreams.openai.timeouts", "5s", "upstreams.openai.timeouts", "mapping"),
    ("routes.1.upstream", "nope", "routes[1].upstream", "unknown upstream 'nope'"),
    ("routes.1.upstream", None, "routes[1].upstream", "unknown upstream None"),
    (
        "routes.1.fallbacks",
        ["openai", "azure"],
        "routes[1].fallbacks[1]",
        "unknown upstream 'azure'",
    ),
    ("routes.1.fallbacks", "anthropic", "routes[1].fallbacks", "list of strings"),
    ("routes.1.models", "gpt-4*", "routes[1].models", "list of strings"),
    ("routes.1.models", [1], "routes[1].models", "list of strings"),
    ("routes.1.prefix", "v1", "routes[1].prefix", "starting with /"),
    ("routes.1.prefix", None, "routes[1].prefix", "starting with /"),
    ("routes.1.strip_prefix", "yes", "routes[1].strip_prefix", "true or false"),
    ("routes.1.name", "", "routes[1].name", "non-empty"),
    ("routes.1", "/v1", "routes[1]", "mapping"),
    ("server", 8080, "server", "mapping"),
    ("server.listen", "8080", "server.listen", "host:port"),
    ("server.listen", 8080, "server.listen", "host:port"),
    ("server.listen", "localhost:http", "server.listen", "port"),
    ("server.listen", "0.0.0.0:99999", "server.listen", "port"),
    ("server.admin_listen", "127.0.0.1:8080", "server.admin_listen", "differ"),
    ("server.max_body_bytes", 0, "server.max_body_bytes", "at least 1"),
    ("server.drain_grace", "soon", "server.drain_grace", "duration"),
    ("pricing", {"gpt-4o": {"output": 10}}, "pricing.gpt-4o.input", "required"),
    ("pricing", {"gpt-4o": {"input": 10}}, "pricing.gpt-4o.output", "required"),
    (
        "pricing",
        {"gpt-4o": {"input": -1, "output": 1}},
        "pricing.gpt-4o.input",
        "non-negative",
    ),
    (
        "pricing",
        {"gpt-4o": {"input": "2.5", "output": 1}},
        "pricing.gpt-4o.input",
        "number",
    ),
    (
        "pricing",
        {"gpt-4o": {"input": 1, "output": 1, "reasoning": True}},
        "pricing.gpt-4o.reasoning",
        "number",
    ),
    ("telemetry.max_models", 0, "telemetry.max_models", "at least 1"),
    ("telemetry.log_requests", 1, "telemetry.log_requests", "true or false"),
]


@pytest.mark.parametrize(
    ("where", "value", "path", "words"),
    SINGLE_PROBLEMS,
    ids=[f"{p}={v!r}" for _, v, p, _ in SINGLE_PROBLEMS],
)
def test_one_problem_reported_with_its_path(
    where: str, value: object, path: str, words: str
) -> None:
    raw = two_upstreams()
    _set(raw, where, value)

    found = problems(raw)

    assert paths(found) == [path]
    assert words in found[0].split(": ", 1)[1]


def test_listen_equal_to_admin_listen_after_normalising() -> None:
    raw = minimal()
    raw["server"] = {"listen": ":8080", "admin_listen": "0.0.0.0:8080"}

    assert problems(raw) == ["server.admin_listen: must differ from server.listen"]


def test_unknown_key_message_lists_the_known_keys() -> None:
    raw = minimal()
    raw["upstreams"]["openai"]["timeouts"] = {"read": "5s"}

    assert problems(raw) == [
        "upstreams.openai.timeouts.read: unknown key "
        "(expected one of: connect, first_byte, idle, total)"
    ]


@pytest.mark.parametrize("routes", [[], None, {"prefix": "/v1"}, "/v1"])
def test_routes_must_be_a_non_empty_list(routes: object) -> None:
    raw = minimal()
    raw["routes"] = routes

    assert problems(raw) == ["routes: expected a list of at least one route"]


@pytest.mark.parametrize("upstreams", [{}, None, ["openai"]])
def test_upstreams_must_be_a_non_empty_mapping(upstreams: object) -> None:
    raw = minimal()
    raw["upstreams"] = upstreams

    found = problems(raw)

    # The routes then name an upstream that does not exist, and say so too.
    assert paths(found) == ["upstreams", "routes[0].upstream"]
    assert "at least one upstream" in found[0]


@pytest.mark.parametrize("top", [None, [], ["server"], "server: x", 42])
def test_top_level_must_be_a_mapping(top: object) -> None:
    found = problems(top)

    assert len(found) == 1
    assert found[0].startswith("(top level): expected a mapping")


def test_duplicate_route_names_reported_at_each_route() -> None:
    raw = two_upstreams()
    raw["routes"][0]["name"] = "chat"
    raw["routes"][1]["name"] = "chat"

    assert problems(raw) == [
        "routes[0].name: route name 'chat' is used twice",
        "routes[1].name: route name 'chat' is used twice",
    ]


def test_duplicate_default_route_names() -> None:
    raw = minimal()
    raw["routes"].append({"prefix": "/v1/", "upstream": "openai"})

    assert problems(raw) == [
        "routes[0].name: route name '/v1:openai' is used twice",
        "routes[1].name: route name '/v1:openai' is used twice",
    ]


def test_unhashable_route_upstream_is_a_config_error() -> None:
    raw = minimal()
    raw["routes"][0]["upstream"] = ["openai"]

    assert paths(problems(raw)) == ["routes[0].upstream"]


def test_malformed_ipv6_url_is_a_config_error() -> None:
    raw = minimal()
    raw["upstreams"]["openai"]["url"] = "http://[::1:8000"

    assert paths(problems(raw)) == ["upstreams.openai.url"]


@pytest.mark.parametrize("url", ["http://api.openai.com:abc", "http://h:99999"])
def test_url_with_bad_port_is_a_config_error(url: str) -> None:
    raw = minimal()
    raw["upstreams"]["openai"]["url"] = url

    assert paths(problems(raw)) == ["upstreams.openai.url"]


# --- all problems at once ------------------------------------------------------

MANY_PROBLEMS = """\
servers: {}
server:
  listen: "8080"
  max_body_bytes: 0
upstreams:
  openai:
    url: ftp://api.openai.com
    api: gemini
    headers: {Authorization: "Bearer ${LLMPROXY_TEST_UNSET}"}
    timeouts: {connect: soon}
routes:
  - prefix: /v1
    upstream: nope
    fallbacks: [azure]
  - prefix: v2
    upstream: openai
pricing:
  gpt-4o: {output: 1}
"""
MANY_PATHS = [
    "upstreams.openai.headers.Authorization",
    "servers",
    "server.listen",
    "server.max_body_bytes",
    "upstreams.openai.url",
    "upstreams.openai.api",
    "upstreams.openai.timeouts.connect",
    "routes[0].upstream",
    "routes[0].fallbacks[0]",
    "routes[1].prefix",
    "pricing.gpt-4o.input",
]


def test_all_problems_of_one_document_reported_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLMPROXY_TEST_UNSET", raising=False)

    with pytest.raises(ConfigError) as info:
        build_config(yaml.safe_load(MANY_PROBLEMS))

    assert sorted(paths(info.value.problems)) == sorted(MANY_PATHS)
    assert all(PROBLEM_LINE.match(p) for p in info.value.problems)
    assert str(info.value) == "; ".join(info.value.problems)
    assert isinstance(info.value, ValueError)


# --- load_config ---------------------------------------------------------------


def test_load_config_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(two_upstreams()))

    config = load_config(str(path))

    assert config.source == str(path)
    assert sorted(config.upstreams) == ["anthropic", "openai"]
    assert config.server.listen == ("127.0.0.1", 8080)


def test_load_config_from_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "from-env.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    monkeypatch.setenv("LLMPROXY_CONFIG", str(path))

    config = load_config()

    assert config.source == str(path)
    assert list(config.upstreams) == ["openai"]


def test_explicit_path_wins_over_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(yaml.safe_dump(two_upstreams()))
    monkeypatch.setenv("LLMPROXY_CONFIG", str(tmp_path / "does-not-exist.yaml"))

    assert load_config(explicit).source == str(explicit)


@pytest.mark.parametrize("env", [None, ""])
def test_load_config_built_in_default(
    env: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is not None:
        monkeypatch.setenv("LLMPROXY_CONFIG", env)

    config = load_config()

    assert isinstance(config, Config)
    assert config.source == "<built-in>"
    assert config.server.listen == ("0.0.0.0", 8080)
    assert config.server.admin_listen == ("0.0.0.0", 9090)
    assert {n: (u.url, u.api) for n, u in config.upstreams.items()} == {
        "openai": ("https://api.openai.com", "openai"),
        "anthropic": ("https://api.anthropic.com", "anthropic"),
    }
    # The clients' own credentials pass through: no upstream sets any.
    assert not any(u.sets_credentials for u in config.upstreams.values())
    assert config.routes == (
        Route("/anthropic", "anthropic", "/anthropic", strip_prefix=True),
        Route("/v1", "openai", "/v1"),
    )


def test_missing_file_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)

    [problem] = info.value.problems
    assert problem.startswith(f"{tmp_path}: cannot read: ")


def test_invalid_yaml_reported_with_line_number(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  listen: [1, 2\nupstreams: {}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.problems == [f"{path}: not valid YAML (line 3, column 10)"]
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_yaml_tab_indentation_is_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("server:\n\tlisten: 1.2.3.4:80\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    [problem] = info.value.problems
    assert problem.startswith(f"{path}: not valid YAML (line 2, column 1")


def test_empty_file_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    [problem] = info.value.problems
    assert problem.startswith("(top level): expected a mapping")


def test_file_not_in_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"server: {listen: \xff}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.problems[0].startswith(f"{path}: ")


# --- the command line, as a subprocess -----------------------------------------


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LLMPROXY_CONFIG", "OPENAI_API_KEY", "LLMPROXY_TEST_UNSET")
    }
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def test_check_accepts_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(product_example_complete())

    result = run_cli("check", "--config", str(path), env={"OPENAI_API_KEY": "sk-x"})

    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert str(path) in result.stdout
    assert result.stderr == ""


def test_check_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MANY_PROBLEMS)

    result = run_cli("check", "--config", str(path))

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert sorted(paths(lines)) == sorted(MANY_PATHS)
    assert all(PROBLEM_LINE.match(line) for line in lines), lines


def test_check_reports_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"

    result = run_cli("check", "--config", str(path))

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: cannot read: No such file or directory"
    ]


def test_check_reports_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("routes: [\n")

    result = run_cli("check", "--config", str(path))

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: not valid YAML (line ")


def test_check_accepts_the_shipped_example() -> None:
    example = REPO / "config.example.yaml"
    if not example.exists():
        pytest.skip("config.example.yaml is not written yet")

    result = run_cli("check", "--config", str(example))

    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_requires_config_flag() -> None:
    result = run_cli("check")

    assert result.returncode == 2
    assert "--config" in result.stderr


@pytest.mark.parametrize("args", [("--help",), ("serve", "--help")])
def test_help_mentions_llmproxy_config(args: tuple[str, ...]) -> None:
    result = run_cli(*args)

    assert result.returncode == 0, result.stderr
    assert "LLMPROXY_CONFIG" in result.stdout
    assert "usage: llmproxy" in result.stdout


def test_a_fallback_of_another_dialect_is_refused() -> None:
    raw = two_upstreams()
    raw["routes"][1]["fallbacks"] = ["anthropic"]
    assert problems(raw) == [
        "routes[1].fallbacks[0]: upstream 'anthropic' speaks anthropic, the route's "
        "upstream openai: it cannot serve the request unchanged"
    ]


def test_a_health_probe_needs_a_timeout() -> None:
    raw = two_upstreams()
    raw["upstreams"]["openai"]["health"] = {"timeout": 0}
    assert problems(raw) == [
        "upstreams.openai.health.timeout: expected a duration above 0"
    ]
