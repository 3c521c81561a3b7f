"""Shared test fixtures: a fake provider on a real socket, and the proxy in front.

The fake provider is a small aiohttp application on 127.0.0.1 that replays the
recorded provider responses in ``shared/fixtures/upstream`` (or whatever a test
scripts), and remembers every request it received.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from llmproxy.app import Proxy
from llmproxy.config import build_config
from llmproxy.exchange import Exchange

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream"
if not FIXTURES.is_dir():  # CI lays shared/ beside the clone
    FIXTURES = Path(__file__).resolve().parents[1] / "shared" / "fixtures" / "upstream"

_HOP = {"connection", "transfer-encoding", "content-length", "keep-alive"}


@dataclass
class Recording:
    """One recorded provider response: its status, headers and exact body bytes."""

    name: str
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @classmethod
    def load(cls, name: str, body_file: str | None = None) -> Recording:
        meta = json.loads((FIXTURES / f"{name}.meta.json").read_text())
        headers: CIMultiDict[str] = CIMultiDict()
        for key, value in meta["headers"].items():
            if key.lower() in _HOP:
                continue
            for v in value if isinstance(value, list) else [value]:
                headers.add(key, v)
        path = FIXTURES / (body_file or _body_file(name))
        if path.suffix != ".gz":
            # The recording's body was stored decompressed; its header still says gzip.
            headers.popall("Content-Encoding", None)
        return cls(name, meta["status"]["code"], headers, path.read_bytes())


def _body_file(name: str) -> str:
    for ext in (".sse", ".json", ".reformatted.json"):
        if (FIXTURES / f"{name}{ext}").exists():
            return f"{name}{ext}"
    raise FileNotFoundError(name)


def split_randomly(data: bytes, rng: random.Random, max_piece: int = 64) -> list[bytes]:
    """Cut ``data`` at random byte boundaries (pieces of 1..max_piece bytes)."""
    pieces, i = [], 0
    while i < len(data):
        n = rng.randint(1, max_piece)
        pieces.append(data[i : i + n])
        i += n
    return pieces


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeProvider:
    """A fake provider: replays recordings, or runs a handler a test sets."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    handler: Handler | None = None
    recording: Recording | None = None
    chunks: list[bytes] | None = None
    pace: float = 0.0
    closed_early: asyncio.Event = field(default_factory=asyncio.Event)

    def reply(
        self, recording: Recording, chunks: list[bytes] | None = None, pace: float = 0.0
    ) -> None:
        """Answer the next requests with ``recording``, written as ``chunks``."""
        self.recording, self.chunks, self.pace, self.handler = (
            recording,
            chunks,
            pace,
            None,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method, request.path_qs, CIMultiDict(request.headers), body
            )
        )
        if self.handler is not None:
            return await self.handler(request)
        if self.recording is None:
            return web.json_response(
                {"error": {"message": "no reply scripted"}}, status=500
            )
        return await self.write(request, self.recording, self.chunks, self.pace)

    async def write(
        self,
        request: web.Request,
        rec: Recording,
        chunks: list[bytes] | None,
        pace: float,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=rec.status, headers=rec.headers)
        if chunks is None:
            resp.content_length = len(rec.body)
        await resp.prepare(request)
        try:
            for piece in chunks or [rec.body]:
                await resp.write(piece)
                if pace:
                    await asyncio.sleep(pace)
        except (ConnectionError, asyncio.CancelledError):
            self.closed_early.set()
            raise
        await resp.write_eof()
        return resp


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    fake = FakeProvider()
    server = web.Server(fake.handle, handler_cancellation=True)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


NO_PROBE: dict[str, Any] = {"path": "off"}


def proxy_config(provider_url: str, **overrides: Any) -> dict[str, Any]:
    """A config with an OpenAI and an Anthropic upstream, both the fake provider."""
    raw: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        # Probes off: tests that count what the provider received must not see
        # them. Health tests turn them on.
        "upstreams": {
            "openai": {"url": provider_url, "api": "openai", "health": NO_PROBE},
            "anthropic": {
                "url": provider_url,
                "api": "anthropic",
                "health": NO_PROBE,
            },
        },
        "routes": [
            {"prefix": "/anthropic", "upstream": "anthropic", "strip_prefix": True},
            {"prefix": "/v1", "upstream": "openai"},
        ],
    }
    for key, value in overrides.items():
        raw[key] = value
    return raw


@dataclass
class RunningProxy:
    proxy: Proxy
    exchanges: list[Exchange]

    @property
    def url(self) -> str:
        return self.proxy.proxy_url

    @property
    def admin_url(self) -> str:
        return self.proxy.admin_url

    async def settle(self) -> None:
        """Let the recorder's deferred flush run."""
        for _ in range(3):
            await asyncio.sleep(0)
        self.proxy.recorder.flush()


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[ProxyFactory]:
    started: list[Proxy] = []

    async def start(raw: dict[str, Any]) -> RunningProxy:
        exchanges: list[Exchange] = []
        proxy = Proxy(build_config(raw), sinks=[exchanges.append])
        await proxy.start()
        started.append(proxy)
        return RunningProxy(proxy, exchanges)

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def proxy(provider: FakeProvider, start_proxy: ProxyFactory) -> RunningProxy:
    return await start_proxy(proxy_config(provider.url))
