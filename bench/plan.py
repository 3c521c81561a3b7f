"""What the bench measures: targets, workloads, scenarios and the configs they use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# How long the slow collector takes to answer each export.
SLOW_COLLECTOR_S = 2.0
# Port 1 on loopback refuses connections at once.
REFUSED = "http://127.0.0.1:1"
TELEMETRY_OFF: Mapping[str, Any] = {"telemetry": {"enabled": False}}


@dataclass(frozen=True)
class Target:
    """A server to measure: its kind, plus environment and config it runs with."""

    name: str
    kind: str  # direct | bare | llmproxy
    env: Mapping[str, str] = field(default_factory=dict)
    # Merged over the generated llmproxy configuration (kind "llmproxy" only).
    config: Mapping[str, Any] = field(default_factory=dict)
    # Where its spans go (kind "llmproxy" only): None, no tracing; "ok", a local
    # receiver; "slow", one that answers after SLOW_COLLECTOR_S; "dead", a port
    # where nothing listens.
    collector: str | None = None
    # Names of the workloads it runs; None runs them all.
    workloads: tuple[str, ...] | None = None
    # llmproxy serve --workers N (kind "llmproxy" only); None leaves the default.
    workers: int | None = None


@dataclass(frozen=True)
class Workload:
    """One load pattern: unary (wrk) or streamed (stream_client.py)."""

    name: str
    concurrency: int
    stream: bool
    pace_ms: float | None = None
    tokens: int | None = None
    once: bool = False  # each connection sends one request: N streams at once


WORKLOADS = (
    Workload("nonstream_c16", 16, stream=False),
    Workload("nonstream_c1", 1, stream=False),
    Workload("stream_c16", 16, stream=True, tokens=16),
    Workload("paced_c1", 1, stream=True, pace_ms=20, tokens=16),
    Workload("paced_c64", 64, stream=True, pace_ms=20, tokens=16),
)
WORKLOAD = {w.name: w for w in WORKLOADS}
# The workloads whose throughput the bar compares: run in rounds in the main table.
ROUNDS_WORKLOADS = ("nonstream_c16", "nonstream_c1", "stream_c16")
ROUNDS = 3

# The main table: two baselines and llmproxy with its telemetry off and on.
TARGETS = (
    Target("direct", "direct"),
    Target("bare", "bare"),
    Target("llmproxy-off", "llmproxy", config=TELEMETRY_OFF),
    Target("llmproxy-full", "llmproxy", collector="ok"),
)
# llmproxy-full again, its spans going to a sick collector; compared with the above.
COLLECTOR_WORKLOADS = ("nonstream_c1", "stream_c16")
COLLECTOR_TARGETS = (
    Target(
        "slow-collector", "llmproxy", collector="slow", workloads=COLLECTOR_WORKLOADS
    ),
    Target(
        "dead-collector", "llmproxy", collector="dead", workloads=COLLECTOR_WORKLOADS
    ),
)
# The workers scenario: llmproxy-full with one worker process, then two, nothing
# pinned (the provider and the load generators float too), on the workloads that
# a second core can speed up.
WORKERS_WORKLOADS = ("nonstream_c16", "stream_c16")
WORKERS_TARGETS = tuple(
    Target(
        f"workers-{n}",
        "llmproxy",
        collector="ok",
        workloads=WORKERS_WORKLOADS,
        workers=n,
    )
    for n in (1, 2)
)
# The dead-upstream scenario: a second route, /dead, to a port that refuses, with
# a breaker; the healthy route's workloads run without, then with, a flood of
# DEAD_ROUTE_CONNECTIONS connections on /dead.
DEAD_UPSTREAM: Mapping[str, Any] = {
    "upstreams": {
        "dead": {
            "url": REFUSED,
            "api": "openai",
            "health": {"path": "off"},
            "breaker": {
                "failures": 5,
                "window": "10s",
                "reset_after": "5s",
                "half_open_trials": 1,
            },
        }
    },
    "routes": [
        {"prefix": "/dead", "upstream": "dead", "name": "dead", "strip_prefix": True},
        {"prefix": "/v1", "upstream": "sim", "name": "sim"},
    ],
}
DEAD_UPSTREAM_WORKLOADS = ("nonstream_c1", "paced_c1")
DEAD_ROUTE_CONNECTIONS = 16
# The memory scenario: this many paced streams held open at once, ~2 s each.
MEMORY_STREAMS = 2000
MEMORY_STREAMS_QUICK = 500


def memory_workload(streams: int) -> Workload:
    """``streams`` paced streams at once, 40 tokens 50 ms apart: about 2 s each."""
    return Workload(
        f"paced_once_c{streams}", streams, stream=True, pace_ms=50, tokens=40, once=True
    )


SCENARIOS = ("main", "collector", "dead-upstream", "memory", "workers")
QUICK_SCENARIOS = ("main", "dead-upstream", "memory")


def scenarios(spec: str | None, quick: bool) -> tuple[str, ...]:
    """The scenarios a comma-separated ``spec`` names ("all" for every one);
    without one, every scenario, or those of the quick run. Raises ValueError
    for a name that is not a scenario."""
    if spec is None:
        return QUICK_SCENARIOS if quick else SCENARIOS
    names = SCENARIOS if spec == "all" else tuple(n for n in spec.split(",") if n)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; pick from {SCENARIOS}")
    return tuple(n for n in SCENARIOS if n in names)


def traces_endpoint(collector: str | None, sink_url: str | None) -> str | None:
    """The OTLP traces endpoint a target is given, or None for no tracing."""
    if collector is None:
        return None
    if collector == "dead":
        return REFUSED + "/v1/traces"
    if sink_url is None:
        raise ValueError(f"collector {collector!r} needs a running sink")
    return sink_url


def llmproxy_config(
    port: int, admin_port: int, upstream: str, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The configuration llmproxy is benchmarked with, ``extra`` merged over it."""
    config: dict[str, Any] = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
        },
        "upstreams": {
            "sim": {
                "url": upstream,
                "api": "openai",
                # Probes off: they would add requests the load generators do not see.
                "health": {"path": "off"},
                # Room for the memory scenario's streams, so none waits in a queue.
                "max_concurrency": 4096,
            }
        },
        "routes": [{"prefix": "/v1", "upstream": "sim", "name": "sim"}],
    }
    return merge(config, extra)


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
