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

from llmproxy.telemetry.logging import setup_logging

WINDOW = 1.0


class Phases:
    """A provider whose behaviour a test switches between phases."""

    def __init__(self) -> None:
        self.phase = "healthy"
        self.chat = Recording.load("openai/chat_completion")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            if self.phase == "slow":
                await asyncio.sleep(0.3)
            if self.phase == "failing":
                return web.json_response({"error": {"message": "down"}}, status=503)
            return web.json_response({"object": "list", "data": []})
        if self.phase == "failing":
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
        "timeout": "1s",
        "degraded_latency": "150ms",
        "window": WINDOW,
        "error_ratio": 0.5,
    }
    raw["upstreams"]["openai"]["breaker"] = {
        "failures": 3,
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


async def metric_states(running: RunningProxy) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(running.admin_url + "/metrics") as resp:
            text = await resp.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("llmproxy_upstream_health{") and 'upstream="openai"' in line:
            state = line.split('state="')[1].split('"')[0]
            found[state] = float(line.rsplit(" ", 1)[1])
    return found


def changes(logs: io.StringIO) -> list[tuple[str, str]]:
    from llmproxy.telemetry import logging as log_module

    assert log_module._writer is not None
    log_module._writer.flush()
    events = [orjson.loads(line) for line in logs.getvalue().splitlines()]
    return [
        (e["from"], e["to"])
        for e in events
        if e["event"] == "upstream.health.changed" and e["upstream"] == "openai"
    ]


async def test_phases_healthy_slow_limited_failing_recovered_socket(
    provider: FakeProvider, watched: RunningProxy, logs: io.StringIO
) -> None:
    phases = Phases()
    provider.handler = phases.handle

    # healthy
    assert await chat(watched, 3) == [200, 200, 200]
    await asyncio.sleep(0.3)  # the first probe starts within one interval
    report = await wait_status(watched, "UP")
    up = report["upstreams"]["openai"]
    assert report["status"] == "UP" and up["breaker"] == "closed"
    assert up["probe"]["ok"] and up["recent"]["requests"] == 3
    assert await metric_states(watched) == {"up": 1, "degraded": 0, "down": 0}

    # slow: the probe takes longer than degraded_latency
    phases.phase = "slow"
    report = await wait_status(watched, "DEGRADED")
    assert report["status"] == "DEGRADED"
    assert "probe took" in report["upstreams"]["openai"]["reasons"][0]
    assert await metric_states(watched) == {"up": 0, "degraded": 1, "down": 0}

    # rate limited: headroom under 10%
    phases.phase = "rate_limited"
    await wait_status(watched, "UP")
    await chat(watched)
    report = await wait_status(watched, "DEGRADED")
    reasons = report["upstreams"]["openai"]["reasons"]
    assert reasons == ["rate limit: 0% of requests left"]
    assert report["upstreams"]["openai"]["ratelimit_headroom"]["requests"] == 0.0003

    # failing: the probe fails and real traffic opens the breaker
    phases.phase = "failing"
    assert await chat(watched, 3) == [500, 500, 500]
    report = await wait_status(watched, "DOWN")
    down = report["upstreams"]["openai"]
    assert down["breaker"] in ("open", "half_open")
    assert down["last_error"] is not None
    assert await metric_states(watched) == {"up": 0, "degraded": 0, "down": 1}

    # recovered: probes pass, the breaker closes on a trial, old failures age out
    phases.phase = "healthy"
    await asyncio.sleep(0.35)  # past reset_after: half-open
    assert await chat(watched) == [200]
    await asyncio.sleep(WINDOW)
    await chat(watched)
    report = await wait_status(watched, "UP")
    assert report["upstreams"]["openai"]["breaker"] == "closed"

    seen = changes(logs)
    assert ("UP", "DEGRADED") in seen
    assert ("DEGRADED", "DOWN") in seen or ("UP", "DOWN") in seen
    assert seen[-1][1] == "UP"


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
    raw["upstreams"]["openai"]["health"] = {"interval": "100ms", "timeout": "200ms"}
    running = await start_proxy(raw)
    report = await wait_status(running, "DOWN", within=3)
    assert "no answer within 0.2s" in report["upstreams"]["openai"]["reasons"][0]
    await asyncio.sleep(0.5)
    assert len(calls) >= 3  # probes kept coming on schedule


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
