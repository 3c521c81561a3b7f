"""Health on real sockets: a provider driven through healthy, slow, rate-limited,
failing and recovered phases, watched through /health, /metrics and the logs."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import FakeProvider, ProxyFactory, Recording, RunningProxy, proxy_config
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.telemetry.logging import setup_logging

WINDOW = 1.0


class Phases:
    """A provider whose behaviour a test switches between phases."""

    def __init__(self) -> None:
        self.phase = "healthy"
        self.chat = Recording.load("openai/chat_completion")
        self.chats = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            if self.phase == "slow":
                await asyncio.sleep(0.3)
            if self.phase == "failing":
                return web.json_response({"error": {"message": "down"}}, status=503)
            return web.json_response({"object": "list", "data": []})
        self.chats += 1
        if self.phase == "failing" or (self.phase == "erroring" and self.chats % 3):
            return web.json_response({"error": {"message": "boom"}}, status=500)
        remaining = "3" if self.phase == "rate_limited" else "9000"
        headers = {
            **self.chat.headers,
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": remaining,
        }
        return web.Response(body=self.chat.body, headers=headers)


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    listener = setup_logging("info", stream)
    yield stream
    listener.stop()


@pytest.fixture
async def watched(provider: FakeProvider, start_proxy: ProxyFactory) -> RunningProxy:
    raw = proxy_config(provider.url)
    raw["upstreams"]["openai"]["health"] = {
        "interval": "100ms",
        "timeout": "1s",  # longer than the interval: probes overlap, never queue
        "degraded_latency": "150ms",
        "window": WINDOW,
        "error_ratio": 0.5,
    }
    raw["upstreams"]["openai"]["breaker"] = {
        "failures": 5,  # above the erroring phase's 4 faults
        "window": "10s",
        "reset_after": "300ms",
    }
    raw["upstreams"]["openai"]["retries"] = {"attempts": 1}
    return await start_proxy(raw)


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, orjson.loads(await resp.read())


async def chat(running: RunningProxy, n: int = 1) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.post(
                running.url + "/v1/chat/completions", data=b'{"model":"gpt-4o"}'
            ) as resp:
                await resp.read()
                statuses.append(resp.status)
    await running.settle()
    return statuses


async def wait_status(
    running: RunningProxy, want: str, within: float = 3.0
) -> dict[str, Any]:
    """Poll /health until the openai upstream reports ``want``; check /readyz too."""
    deadline = time.monotonic() + within
    while True:
        status, ready = await get_json(running.admin_url + "/readyz")
        assert status == 200, ready  # a provider's trouble never makes us unready
        status, report = await get_json(running.admin_url + "/health")
        assert status == 200
        upstream = report["upstreams"]["openai"]
        if upstream["status"] == want:
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"wanted {want}, have {upstream}")
        await asyncio.sleep(0.05)


async def scrape(running: RunningProxy) -> dict[tuple[str, str], float]:
    """The openai upstream's health and probe samples, by (name, state or probe)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(running.admin_url + "/metrics") as resp:
            text = await resp.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("upstream") != "openai" or not (
                sample.name == "llmproxy_upstream_health"
                or sample.name.startswith("llmproxy_probe_")
            ):
                continue
            key = labels.get("state") or labels.get("probe", "")
            if "le" not in labels:
                found[(sample.name, key)] = sample.value
    return found


async def states(running: RunningProxy) -> dict[str, float]:
    samples = await scrape(running)
    return {k: v for (n, k), v in samples.items() if n == "llmproxy_upstream_health"}


class Changes:
    """The ``upstream.health.changed`` events logged since the last call."""

    def __init__(self, logs: io.StringIO) -> None:
        self.logs = logs
        self.seen = 0

    def new(self) -> list[tuple[str, str]]:
        from llmproxy.telemetry import logging as log_module

        assert log_module._writer is not None
        log_module._writer.flush()
        events = [orjson.loads(line) for line in self.logs.getvalue().splitlines()]
        found = [
            (e["from"], e["to"])
            for e in events
            if e["event"] == "upstream.health.changed" and e["upstream"] == "openai"
        ]
        fresh, self.seen = found[self.seen :], len(found)
        return fresh


async def test_phases_healthy_slow_limited_failing_recovered_socket(
    provider: FakeProvider, watched: RunningProxy, logs: io.StringIO
) -> None:
    phases = Phases()
    provider.handler = phases.handle
    changes = Changes(logs)
    up = {"up": 1.0, "degraded": 0.0, "down": 0.0}
    degraded = {"up": 0.0, "degraded": 1.0, "down": 0.0}
    down = {"up": 0.0, "degraded": 0.0, "down": 1.0}

    # healthy: a probe has passed, traffic is counted, nothing changed
    assert await chat(watched, 3) == [200, 200, 200]
    report = await wait_probed(watched)
    health = report["upstreams"]["openai"]
    assert report["status"] == "UP" and health["breaker"] == "closed"
    assert health["probe"]["ok"] and health["recent"]["requests"] == 3
    assert await states(watched) == up
    assert changes.new() == []
    probes = (await scrape(watched))[
        ("llmproxy_probe_duration_seconds_count", "models")
    ]
    assert probes >= 1

    # slow: the probe takes longer than degraded_latency
    phases.phase = "slow"
    report = await wait_status(watched, "DEGRADED")
    assert report["status"] == "DEGRADED"
    assert "probe took" in report["upstreams"]["openai"]["reasons"][0]
    assert await states(watched) == degraded
    assert changes.new() == [("UP", "DEGRADED")]

    # rate limited: headroom under 10%; it ages out once traffic stops
    phases.phase = "rate_limited"
    await wait_status(watched, "UP")
    assert changes.new() == [("DEGRADED", "UP")]
    await chat(watched)
    report = await wait_status(watched, "DEGRADED")
    reasons = report["upstreams"]["openai"]["reasons"]
    assert reasons == ["rate limit: 0% of requests left"]
    assert report["upstreams"]["openai"]["ratelimit_headroom"]["requests"] == 0.0003
    assert await states(watched) == degraded
    assert changes.new() == [("UP", "DEGRADED")]
    await wait_status(watched, "UP", within=WINDOW + 3)  # no traffic: aged out
    assert await states(watched) == up
    assert changes.new() == [("DEGRADED", "UP")]

    # erroring: 4 of 6 requests fail, under the breaker's threshold
    phases.phase = "erroring"
    assert sorted(await chat(watched, 6)) == [200] * 2 + [500] * 4
    report = await wait_status(watched, "DEGRADED")
    health = report["upstreams"]["openai"]
    assert health["reasons"] == ["67% of 6 recent requests failed"]
    assert health["breaker"] == "closed" and health["recent"]["error_ratio"] == 0.6667
    assert health["last_error"]["error_type"] == "upstream_5xx"
    assert await states(watched) == degraded
    assert changes.new() == [("UP", "DEGRADED")]
    await wait_status(watched, "UP", within=WINDOW + 3)  # no traffic: aged out
    assert changes.new() == [("DEGRADED", "UP")]

    # failing: the probe fails and real traffic opens the breaker
    phases.phase = "failing"
    before = await scrape(watched)
    statuses = await chat(watched, 3)
    assert statuses[0] == 500 and set(statuses) <= {500, 503}
    report = await wait_status(watched, "DOWN")
    health = report["upstreams"]["openai"]
    assert health["breaker"] in ("open", "half_open")
    assert health["last_error"] is not None
    assert await states(watched) == down
    assert changes.new() == [("UP", "DOWN")]
    await wait_for(lambda: probe_failures(watched, before), within=3)

    # recovered, with no traffic: half-open is DEGRADED while the outage is
    # recent, then the probes alone bring it UP, the breaker still half-open
    phases.phase = "healthy"
    report = await wait_status(watched, "DEGRADED")
    health = report["upstreams"]["openai"]
    assert health["breaker"] == "half_open"
    assert health["reasons"] == ["circuit breaker half-open"]
    assert await states(watched) == degraded
    report = await wait_status(watched, "UP", within=WINDOW + 3)
    health = report["upstreams"]["openai"]
    assert health["breaker"] == "half_open" and health["reasons"] == []
    assert health["probe"]["ok"]
    assert await states(watched) == up
    assert changes.new() == [("DOWN", "DEGRADED"), ("DEGRADED", "UP")]
    # the next request is the trial that closes the breaker
    assert await chat(watched) == [200]
    report = await wait_status(watched, "UP")
    assert report["upstreams"]["openai"]["breaker"] == "closed"
    assert changes.new() == []


async def wait_probed(running: RunningProxy, within: float = 3.0) -> dict[str, Any]:
    """Poll /health until the openai upstream has a probe result."""
    deadline = time.monotonic() + within
    while True:
        _, report = await get_json(running.admin_url + "/health")
        if report["upstreams"]["openai"]["probe"] is not None:
            return report  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, "no probe ran"
        await asyncio.sleep(0.05)


async def probe_failures(
    running: RunningProxy, before: dict[tuple[str, str], float]
) -> bool:
    """Whether failed probes were counted, and timed, since ``before``."""
    now = await scrape(running)
    failures = ("llmproxy_probe_failures_total", "models")
    timed = ("llmproxy_probe_duration_seconds_count", "models")
    return now.get(failures, 0) > before.get(failures, 0) and now[timed] > before[timed]


async def wait_for(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_hung_probe_does_not_block_the_next_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    calls: list[float] = []

    async def hang(request: web.Request) -> web.StreamResponse:
        calls.append(time.monotonic())
        await asyncio.sleep(30)
        return web.Response()

    provider.handler = hang
    raw = proxy_config(provider.url)
    raw["upstreams"]["openai"]["health"] = {"interval": "100ms", "timeout": "3s"}
    running = await start_proxy(raw)
    # Probes one after another would have sent one by now; each waits for none.
    deadline = time.monotonic() + 2.5
    while len(calls) < 5:
        assert time.monotonic() < deadline, f"only {len(calls)} probes began"
        await asyncio.sleep(0.05)
    report = await wait_status(running, "DOWN", within=6)
    assert "no answer within 3s" in report["upstreams"]["openai"]["reasons"][0]


async def test_health_is_503_only_when_the_proxy_cannot_serve_socket(
    provider: FakeProvider, watched: RunningProxy
) -> None:
    status, report = await get_json(watched.admin_url + "/health")
    assert status == 200 and report["ready"] is True
    watched.proxy.ready = False
    watched.proxy.not_ready_reason = "shutting down"
    status, report = await get_json(watched.admin_url + "/health")
    assert status == 503 and report["reason"] == "shutting down"
    status, _ = await get_json(watched.admin_url + "/readyz")
    assert status == 503
    status, _ = await get_json(watched.admin_url + "/healthz")
    assert status == 200
