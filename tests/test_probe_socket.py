"""The streaming probe on real sockets, against a fake SSE provider: it measures
time to the first content token, stops there, never sends a second request
when a stream ends early, and records failures, up to /health and /metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import FakeProvider, Handler, ProxyFactory, proxy_config

from llmproxy.config import Upstream, build_config
from llmproxy.probe import stream_probe

ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"pong"}}]}\n\n'
DONE = b"data: [DONE]\n\n"
# A short reconnection time: were the client to reconnect, it would do so at once.
RETRY_AT_ONCE = b"retry: 1\n\n"
SSE = {"Content-Type": "text/event-stream"}


def upstream(url: str, api: str = "openai", timeout: str = "2s") -> Upstream:
    raw = proxy_config(url)
    health = {"path": "off", "stream_model": "m", "timeout": timeout}
    for spec in raw["upstreams"].values():
        spec["health"] = health
    return build_config(raw).upstreams["anthropic" if api == "anthropic" else "openai"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as own:
        yield own


def streaming(*parts: bytes | float, hold: asyncio.Event | None = None) -> Handler:
    """A handler writing ``parts`` (a float is a pause), then holding or ending."""

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE)
        await resp.prepare(request)
        for part in parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
            else:
                await resp.write(part)
        if hold is not None:
            await hold.wait()
        await resp.write_eof()
        return resp

    return handle


async def test_time_to_first_token_is_measured_and_the_probe_stops_there_socket(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()  # the stream stays open: only the token ends the probe
    provider.handler = streaming(ROLE, 0.2, TOKEN, hold=never)
    result = await stream_probe(session, upstream(provider.url))
    assert result["ok"] and result["error"] is None
    assert 0.2 <= result["time_to_first_token_s"] < 1.5
    sent = orjson.loads(provider.received[0].body)
    assert sent["max_tokens"] == 1 and sent["stream"] is True
    assert provider.received[0].path == "/v1/chat/completions"
    never.set()


async def test_anthropic_first_token_is_the_first_content_delta_socket(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    provider.handler = streaming(
        b'event: message_start\ndata: {"type":"message_start"}\n\n',
        0.1,
        b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    )
    result = await stream_probe(session, upstream(provider.url, "anthropic"))
    assert result["ok"] and result["time_to_first_token_s"] >= 0.1
    assert provider.received[0].path == "/v1/messages"
    assert provider.received[0].headers["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize(
    "parts",
    [(RETRY_AT_ONCE, ROLE), (RETRY_AT_ONCE,), (RETRY_AT_ONCE, ROLE, DONE)],
    ids=["no terminal event", "no events", "done without a token"],
)
async def test_a_stream_that_ends_early_is_requested_once_socket(
    provider: FakeProvider, session: aiohttp.ClientSession, parts: tuple[bytes]
) -> None:
    provider.handler = streaming(*parts)
    result = await stream_probe(session, upstream(provider.url))
    assert not result["ok"] and result["time_to_first_token_s"] is None
    assert result["error"] == "the stream ended without a token"
    await asyncio.sleep(0.1)  # a reconnect, had there been one, is immediate
    assert len(provider.received) == 1


async def test_error_event_and_error_status_are_failures_socket(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    error = b'data: {"error":{"message":"model overloaded"}}\n\n'
    provider.handler = streaming(ROLE, error)
    result = await stream_probe(session, upstream(provider.url))
    assert not result["ok"]
    assert result["error"] == "error event: model overloaded"

    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "no"}}, status=500)

    provider.handler = refuse
    result = await stream_probe(session, upstream(provider.url))
    assert not result["ok"] and "500" in result["error"]
    assert len(provider.received) == 2


async def test_a_stream_without_a_token_in_time_is_cut_socket(
    provider: FakeProvider, session: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()
    provider.handler = streaming(ROLE, hold=never)
    started = time.monotonic()
    result = await stream_probe(session, upstream(provider.url, timeout="300ms"))
    assert not result["ok"] and result["error"] == "no first token within 0.3s"
    assert time.monotonic() - started < 2
    never.set()


async def test_failed_stream_probe_degrades_until_it_passes_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    failing = True

    async def handle(request: web.Request) -> web.StreamResponse:
        if failing:
            return web.json_response({"error": {"message": "quota"}}, status=429)
        return await streaming(ROLE, TOKEN, DONE)(request)

    provider.handler = handle
    raw = proxy_config(provider.url)
    raw["upstreams"]["openai"]["health"] = {
        "path": "off",
        "stream_model": "m",
        "stream_interval": "100ms",
        "timeout": "1s",
    }
    running = await start_proxy(raw)
    report = await poll_health(running.admin_url, "DEGRADED")
    assert report["reasons"][0].startswith("stream probe failed: ")
    assert report["stream_probe"]["ok"] is False
    assert report["last_error"]["error_type"] == "stream_probe"
    assert await probe_failures(running.admin_url) >= 1

    failing = False
    report = await poll_health(running.admin_url, "UP")
    assert report["stream_probe"]["ok"] is True
    assert report["stream_probe"]["time_to_first_token_s"] is not None


async def poll_health(admin_url: str, want: str, within: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(admin_url + "/health") as resp:
                report = orjson.loads(await resp.read())["upstreams"]["openai"]
            if report["status"] == want:
                return report
            assert time.monotonic() < deadline, f"wanted {want}, have {report}"
            await asyncio.sleep(0.05)


async def probe_failures(admin_url: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin_url + "/metrics") as resp:
            text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llmproxy_probe_failures_total{")
        and 'probe="stream"' in line
        and 'upstream="openai"' in line
    )
