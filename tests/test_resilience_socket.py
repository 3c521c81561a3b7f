"""Resilience on real sockets: a fake provider failing on purpose, the proxy in front.

Faults are injected at the provider (refused connections, a hang before the
headers, a stall or a reset mid-stream, 429, 500, 503 and 529 answers), and each
test checks what the client got, what the provider received, and what the
breaker, the exchange records and the metrics say.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import statistics
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import (
    FakeProvider,
    Handler,
    ProxyFactory,
    Recording,
    RunningProxy,
    proxy_config,
)
from prometheus_client.parser import text_string_to_metric_families
from test_faults_socket import RawUpstream, Script

from llmproxy.breaker import Breaker
from llmproxy.exchange import Exchange
from llmproxy.retry import BUDGET_CAP, BUDGET_RATIO

REFUSED = "http://127.0.0.1:1"  # nothing listens on port 1: a certain refusal
CHAT_PATH = "/v1/chat/completions"
CHAT = orjson.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
# Asks for usage itself, so the proxy relays the provider's bytes unedited.
STREAM_CHAT = orjson.dumps(
    {
        "model": "gpt-4",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
)
ERROR_BODIES = {
    429: {"error": {"code": "rate_limit_exceeded", "message": "slow down"}},
    500: {"error": {"type": "server_error", "message": "boom"}},
    502: {"error": {"type": "server_error", "message": "bad gateway"}},
    503: {"error": {"type": "server_error", "message": "unavailable"}},
    529: {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
}
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)
RATE_LIMITED = {
    "Retry-After": "0",
    "x-ratelimit-limit-requests": "100",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "1s",
}


# --- the client side -------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    seconds: float

    @property
    def error_type(self) -> str:
        return str(orjson.loads(self.body)["error"]["type"])


async def post(
    url: str, body: bytes = CHAT, session: aiohttp.ClientSession | None = None
) -> Reply:
    """POST and read the whole answer; the time is wall time, end to end."""
    if session is None:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as own:
            return await post(url, body, own)
    started = time.perf_counter()
    async with session.post(url, data=body) as resp:
        data = await resp.read()
    return Reply(resp.status, resp.headers, data, time.perf_counter() - started)


async def eventually(check: Any, within: float = 5.0) -> None:
    """Wait until ``check()`` holds; fail after ``within`` seconds."""
    deadline = time.perf_counter() + within
    while not check():
        assert time.perf_counter() < deadline, "condition never held"
        await asyncio.sleep(0.01)


# --- the provider side -----------------------------------------------------------


def posts(fake: FakeProvider) -> int:
    """Requests the provider got (health probes, were any on, are GETs)."""
    return sum(1 for r in fake.received if r.method == "POST")


def completion() -> Handler:
    rec = Recording.load("openai/chat_completion")

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=rec.status, headers=rec.headers, body=rec.body)

    return handle


def answer(status: int, headers: Mapping[str, str] | None = None) -> Handler:
    """An error answer with the provider's JSON envelope."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = ERROR_BODIES.get(status, {"error": {"message": f"status {status}"}})
        return web.Response(
            status=status,
            headers=headers,
            body=orjson.dumps(body),
            content_type="application/json",
        )

    return handle


def script(*handlers: Handler) -> Handler:
    """The n-th request gets the n-th handler; the last one answers the rest."""
    count = itertools.count()

    async def handle(request: web.Request) -> web.StreamResponse:
        n = next(count)
        return await handlers[min(n, len(handlers) - 1)](request)

    return handle


def hang(gate: asyncio.Event, then: Handler | None = None) -> Handler:
    """No headers until the gate opens."""
    after = then or completion()

    async def handle(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return await after(request)

    return handle


def stream_events() -> tuple[Recording, list[bytes]]:
    rec = Recording.load("openai/chat_completions_stream_include_usage")
    return rec, [e + b"\n\n" for e in rec.body.split(b"\n\n") if e]


def stall(gate: asyncio.Event, sent: int = 2) -> Handler:
    """Headers and ``sent`` events, then nothing until the gate opens."""
    rec, events = stream_events()

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=rec.headers)
        await resp.prepare(request)
        for event in events[:sent]:
            await resp.write(event)
        await gate.wait()
        return resp

    return handle


def slow_stream(gate: asyncio.Event) -> Handler:
    """A whole stream, whose second half waits for the gate."""
    rec, events = stream_events()

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=rec.headers)
        await resp.prepare(request)
        await resp.write(events[0])
        await gate.wait()
        for event in events[1:]:
            await resp.write(event)
        await resp.write_eof()
        return resp

    return handle


def reset(sent: int = 2) -> Handler:
    """Headers and ``sent`` events, then the connection drops."""
    rec, events = stream_events()

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=rec.headers)
        await resp.prepare(request)
        for event in events[:sent]:
            await resp.write(event)
        assert request.transport is not None
        request.transport.close()
        return resp

    return handle


def trickle(pace: float) -> Handler:
    """A stream that never ends: one event every ``pace`` seconds."""
    rec, events = stream_events()

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=rec.headers)
        await resp.prepare(request)
        for event in itertools.cycle(events[:-1]):
            await resp.write(event)
            await asyncio.sleep(pace)
        return resp

    return handle


@pytest.fixture
async def backup() -> AsyncIterator[FakeProvider]:
    """A second fake provider, built as conftest builds the first."""
    fake = FakeProvider()
    server = web.Server(fake.handle, handler_cancellation=True)  # type: ignore[arg-type]
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def gate() -> AsyncIterator[asyncio.Event]:
    """Hanging handlers wait on this; it opens when the test ends, if not before."""
    event = asyncio.Event()
    yield event
    event.set()
    await asyncio.sleep(0.01)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A URL whose connections are never accepted: the listen backlog is full."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.05)  # let the handshakes that can complete fill the backlog
    yield f"http://127.0.0.1:{port}"
    for s in [*fillers, server]:
        s.close()


# --- the proxy and what it reports -------------------------------------------------


def config(url: str, **openai: Any) -> dict[str, Any]:
    """Both upstreams at ``url``, no probes, one try; ``openai`` overrides its own."""
    raw = proxy_config(url)
    raw["server"]["drain_grace"] = "1s"
    for upstream in raw["upstreams"].values():
        upstream["health"] = {"path": "off"}
        upstream["retries"] = {"attempts": 1}
        # A test that fails while a request hangs then fails in seconds, not minutes.
        upstream["timeouts"] = {"first_byte": "5s"}
    raw["upstreams"]["openai"].update(openai)
    return raw


def add_upstream(raw: dict[str, Any], name: str, url: str, **settings: Any) -> None:
    spec = {"url": url, "api": "openai", "health": {"path": "off"}}
    spec["retries"] = {"attempts": 1}
    spec["timeouts"] = {"first_byte": "5s"}
    raw["upstreams"][name] = {**spec, **settings}


def breaker(running: RunningProxy, name: str = "openai") -> Breaker:
    assert running.proxy.dispatcher is not None
    return running.proxy.dispatcher.breakers[name]


def finished(running: RunningProxy) -> list[Exchange]:
    """The exchanges recorded so far, handing over any still queued for the sinks."""
    running.proxy.recorder.flush()
    return running.exchanges


async def last_exchange(running: RunningProxy) -> Exchange:
    await running.settle()
    return running.exchanges[-1]


async def scrape(running: RunningProxy) -> list[tuple[str, dict[str, str], float]]:
    """Every sample on the admin port's /metrics."""
    await running.settle()
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
        session.get(running.admin_url + "/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def metric(
    samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = labels.items()
    found = [v for n, ls, v in samples if n == name and want <= ls.items()]
    assert found, f"no sample {name} {labels}"
    return sum(found)


@pytest.fixture
def transitions() -> Iterator[list[tuple[str, str, str]]]:
    """Every ``breaker.state.changed`` event, as (upstream, from, to)."""
    seen: list[tuple[str, str, str]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "breaker.state.changed":
                fields = record.fields  # type: ignore[attr-defined]
                seen.append((fields["upstream"], fields["from"], fields["to"]))

    logger = logging.getLogger("llmproxy.breaker")
    handler = Catch()
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


# --- circuit breaker -------------------------------------------------------------


async def test_breaker_opens_at_threshold_then_fails_fast_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    transitions: list[tuple[str, str, str]],
) -> None:
    provider.handler = answer(500)
    running = await start_proxy(
        config(
            provider.url,
            breaker={"failures": 3, "window": "10s", "reset_after": "30s"},
        )
    )
    url = running.url + CHAT_PATH
    for n in range(3):
        reply = await post(url)
        assert reply.status == 500, n  # the provider's answer, passed through
        assert reply.body == orjson.dumps(ERROR_BODIES[500])
    assert breaker(running).state == "open"
    assert transitions == [("openai", "closed", "open")]
    samples = await scrape(running)
    assert metric(samples, "llmproxy_circuit_breaker_state", upstream="openai") == 1
    assert metric(samples, "llmproxy_circuit_breaker_state", upstream="anthropic") == 0

    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        await post(running.url + "/warm-up", session=session)  # a kept-alive socket
        replies = [await post(url, session=session) for _ in range(10)]
    for reply in replies:
        assert reply.status == 503 and reply.error_type == "circuit_open"
        assert 1 <= int(reply.headers["Retry-After"]) <= 30
    assert posts(provider) == 3  # nothing reached the provider
    assert statistics.median(r.seconds for r in replies) < 0.005
    await running.settle()
    refused = [e for e in running.exchanges if e.error_type == "circuit_open"]
    assert len(refused) == 10 and all(e.attempts == [] for e in refused)
    assert statistics.median(e.duration for e in refused) < 0.001


async def test_caller_errors_and_rate_limits_never_open_the_breaker_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    transitions: list[tuple[str, str, str]],
) -> None:
    statuses = [400, 401, 404, 413, 422, 429]
    provider.handler = script(*(answer(s) for s in statuses * 2), answer(500))
    running = await start_proxy(
        config(provider.url, breaker={"failures": 1, "window": "10s"})
    )
    for status in statuses * 2:
        reply = await post(running.url + CHAT_PATH)
        assert reply.status == status
        assert breaker(running).state == "closed", status
    assert posts(provider) == 12
    assert transitions == []
    # The breaker does open, on the first upstream fault.
    assert (await post(running.url + CHAT_PATH)).status == 500
    assert breaker(running).state == "open"


async def test_half_open_trial_closes_breaker_when_provider_recovers_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    transitions: list[tuple[str, str, str]],
) -> None:
    provider.handler = answer(503)
    running = await start_proxy(
        config(provider.url, breaker={"failures": 2, "reset_after": "200ms"})
    )
    url = running.url + CHAT_PATH
    assert [(await post(url)).status for _ in range(2)] == [503, 503]
    assert (await post(url)).error_type == "circuit_open"
    assert posts(provider) == 2

    # reset_after passes with no traffic; the gauge shows half-open by itself.
    await asyncio.sleep(0.4)
    samples = await scrape(running)
    assert metric(samples, "llmproxy_circuit_breaker_state", upstream="openai") == 2
    # The trial still fails: open again, for another reset_after.
    reply = await post(url)
    assert reply.status == 503 and reply.body == orjson.dumps(ERROR_BODIES[503])
    assert posts(provider) == 3
    assert breaker(running).state == "open"
    assert (await post(url)).error_type == "circuit_open"

    provider.handler = completion()
    await asyncio.sleep(0.4)
    assert (await post(url)).status == 200
    assert breaker(running).state == "closed"
    assert [(await post(url)).status for _ in range(3)] == [200] * 3
    assert posts(provider) == 7
    samples = await scrape(running)
    assert metric(samples, "llmproxy_circuit_breaker_state", upstream="openai") == 0
    assert transitions == [
        ("openai", "closed", "open"),
        ("openai", "open", "half_open"),
        ("openai", "half_open", "open"),
        ("openai", "open", "half_open"),
        ("openai", "half_open", "closed"),
    ]


@pytest.mark.parametrize("trials", [1, 2])
async def test_half_open_admits_only_the_configured_trials_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    gate: asyncio.Event,
    trials: int,
) -> None:
    provider.handler = script(answer(500), hang(gate))
    running = await start_proxy(
        config(
            provider.url,
            breaker={"failures": 1, "reset_after": "200ms", "half_open_trials": trials},
        )
    )
    url = running.url + CHAT_PATH
    assert (await post(url)).status == 500
    await asyncio.sleep(0.4)
    pending = [asyncio.create_task(post(url)) for _ in range(trials)]
    await eventually(lambda: posts(provider) == 1 + trials)
    for _ in range(3):
        reply = await post(url)
        assert reply.status == 503 and reply.error_type == "circuit_open"
        assert "Retry-After" in reply.headers
    assert posts(provider) == 1 + trials
    assert breaker(running).state == "half_open"
    gate.set()
    assert [r.status for r in await asyncio.gather(*pending)] == [200] * trials
    assert breaker(running).state == "closed"
    assert (await post(url)).status == 200


@pytest.mark.parametrize("where", ["before_headers", "mid_stream"])
async def test_cancelled_client_never_closes_a_half_open_breaker_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    transitions: list[tuple[str, str, str]],
    gate: asyncio.Event,
    where: str,
) -> None:
    slow = hang(gate) if where == "before_headers" else stall(gate)
    provider.handler = script(answer(500), slow)
    running = await start_proxy(
        config(provider.url, breaker={"failures": 1, "reset_after": "200ms"})
    )
    url = running.url + CHAT_PATH
    assert (await post(url)).status == 500
    await asyncio.sleep(0.4)
    assert breaker(running).state == "half_open"

    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        if where == "before_headers":
            trial = asyncio.create_task(session.post(url, data=CHAT))
            await eventually(lambda: posts(provider) == 2)
            trial.cancel()
            with pytest.raises(asyncio.CancelledError):
                await trial
        else:
            resp = await session.post(url, data=STREAM_CHAT)
            assert resp.status == 200
            assert await resp.content.readany()
            resp.close()  # the client goes away mid-stream
        await eventually(
            lambda: any(e.error_type == "client_disconnect" for e in finished(running))
        )
    assert breaker(running).state == "half_open"
    assert ("openai", "half_open", "closed") not in transitions
    samples = await scrape(running)
    assert metric(samples, "llmproxy_circuit_breaker_state", upstream="openai") == 2

    # The cancelled trial gave its place back: the next request is a trial.
    provider.handler = completion()
    assert (await post(url)).status == 200
    assert breaker(running).state == "closed"


async def test_a_long_success_from_before_the_outage_keeps_it_open_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, gate: asyncio.Event
) -> None:
    provider.handler = script(slow_stream(gate), answer(500))
    running = await start_proxy(
        config(provider.url, breaker={"failures": 2, "reset_after": "30s"})
    )
    url = running.url + CHAT_PATH
    long = asyncio.create_task(post(url, STREAM_CHAT))
    await eventually(lambda: posts(provider) == 1)
    assert [(await post(url)).status for _ in range(2)] == [500, 500]
    assert breaker(running).state == "open"
    gate.set()
    assert (await long).status == 200
    assert (await last_exchange(running)).error_type is None
    assert breaker(running).state == "open"
    assert (await post(url)).error_type == "circuit_open"
    assert posts(provider) == 3


async def test_client_disconnects_never_open_the_breaker_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    transitions: list[tuple[str, str, str]],
    gate: asyncio.Event,
) -> None:
    provider.handler = stall(gate)
    running = await start_proxy(config(provider.url, breaker={"failures": 1}))
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        for _ in range(3):
            resp = await session.post(running.url + CHAT_PATH, data=STREAM_CHAT)
            assert await resp.content.readany()
            resp.close()
    await eventually(lambda: len(finished(running)) == 3)
    assert {e.error_type for e in running.exchanges} == {"client_disconnect"}
    assert breaker(running).state == "closed"
    assert transitions == []


async def test_healthy_route_stays_fast_while_another_upstream_is_dead_socket(
    provider: FakeProvider,
    backup: FakeProvider,
    start_proxy: ProxyFactory,
    gate: asyncio.Event,
) -> None:
    provider.reply(Recording.load("anthropic/message"))
    backup.handler = hang(gate)
    raw = config(REFUSED, breaker={"failures": 3})
    raw["upstreams"]["anthropic"]["url"] = provider.url
    add_upstream(raw, "stuck", backup.url, max_concurrency=2, max_queue=2)
    raw["routes"].append(
        {"prefix": "/stuck", "upstream": "stuck", "strip_prefix": True}
    )
    running = await start_proxy(raw)

    async def hammer_dead() -> list[Reply]:
        return [await post(running.url + CHAT_PATH) for _ in range(20)]

    dead = asyncio.create_task(hammer_dead())
    stuck = [
        asyncio.create_task(post(running.url + "/stuck" + CHAT_PATH)) for _ in range(6)
    ]
    await eventually(lambda: posts(backup) == 2)  # both of its slots are held
    healthy = []
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        for _ in range(20):
            healthy.append(
                await post(running.url + "/anthropic/v1/messages", session=session)
            )
            await asyncio.sleep(0.005)
    assert [r.status for r in healthy] == [200] * 20
    assert max(r.seconds for r in healthy) < 0.5
    assert statistics.median(r.seconds for r in healthy) < 0.05
    assert posts(provider) == 20

    dead_replies = await dead
    types = [r.error_type for r in dead_replies]
    assert set(types) == {"connect_error", "circuit_open"}
    assert types.count("connect_error") == 3  # it opened at the third fault
    gate.set()
    stuck_replies = await asyncio.gather(*stuck)
    assert sorted(r.status for r in stuck_replies) == [200] * 4 + [503] * 2
    assert posts(backup) == 4


# --- timeouts --------------------------------------------------------------------


async def test_connect_timeout_is_504_and_retried_socket(
    start_proxy: ProxyFactory, blackhole: str
) -> None:
    running = await start_proxy(
        config(
            blackhole,
            timeouts={"connect": "200ms"},
            retries={"attempts": 2, "backoff": "10ms"},
        )
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 504 and reply.error_type == "timeout_connect"
    assert 0.35 < reply.seconds < 3
    ex = await last_exchange(running)
    assert ex.error_type == "timeout_connect"
    assert [a.error_type for a in ex.attempts] == ["timeout_connect"] * 2


async def test_first_byte_timeout_is_504_and_not_retried_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, gate: asyncio.Event
) -> None:
    provider.handler = hang(gate)
    running = await start_proxy(
        config(
            provider.url,
            timeouts={"first_byte": "200ms"},
            retries={"attempts": 3, "backoff": "10ms"},
        )
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 504 and reply.error_type == "timeout_first_byte"
    assert 0.15 < reply.seconds < 2
    assert posts(provider) == 1
    ex = await last_exchange(running)
    assert ex.error_type == "timeout_first_byte"
    assert [a.error_type for a in ex.attempts] == ["timeout_first_byte"]


async def test_total_timeout_before_headers_is_504_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, gate: asyncio.Event
) -> None:
    provider.handler = hang(gate)
    running = await start_proxy(
        config(provider.url, timeouts={"first_byte": "5s", "total": "300ms"})
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 504 and reply.error_type == "timeout_total"
    assert 0.25 < reply.seconds < 2
    assert (await last_exchange(running)).error_type == "timeout_total"


async def read_until_cut(url: str) -> tuple[int, bytes]:
    """POST a stream request; return the status and what came before the cut."""
    received = b""
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        async with session.post(url, data=STREAM_CHAT) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
            return resp.status, received


async def test_idle_gap_mid_stream_cuts_the_client_off_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, gate: asyncio.Event
) -> None:
    provider.handler = stall(gate, sent=2)
    running = await start_proxy(
        config(
            provider.url,
            timeouts={"idle": "200ms"},
            retries={"attempts": 3},
            breaker={"failures": 1},
        )
    )
    started = time.perf_counter()
    status, received = await read_until_cut(running.url + CHAT_PATH)
    assert 0.15 < time.perf_counter() - started < 2
    assert status == 200
    assert received == b"".join(stream_events()[1][:2])
    assert posts(provider) == 1  # headers were sent: never retried
    ex = await last_exchange(running)
    assert ex.status == 200 and ex.error_type == "timeout_idle"
    assert breaker(running).state == "open"  # a timeout is the upstream's fault


async def test_total_timeout_mid_stream_cuts_the_client_off_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.handler = trickle(0.05)
    running = await start_proxy(
        config(provider.url, timeouts={"idle": "1s", "total": "400ms"})
    )
    started = time.perf_counter()
    status, received = await read_until_cut(running.url + CHAT_PATH)
    assert 0.35 < time.perf_counter() - started < 2
    assert status == 200 and received.startswith(b"data: ")
    ex = await last_exchange(running)
    assert ex.status == 200 and ex.error_type == "timeout_total"


async def test_reset_mid_stream_is_truncated_not_retried_and_counts_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.handler = reset(sent=3)
    running = await start_proxy(
        config(provider.url, retries={"attempts": 3}, breaker={"failures": 1})
    )
    status, received = await read_until_cut(running.url + CHAT_PATH)
    assert status == 200
    assert received == b"".join(stream_events()[1][:3])
    assert posts(provider) == 1
    assert (await last_exchange(running)).error_type == "stream_truncated"
    assert breaker(running).state == "open"


async def test_malformed_response_is_502_and_counts_socket(
    start_proxy: ProxyFactory,
) -> None:
    hits = 0

    async def garbage(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal hits
        hits += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 two hundred OK\r\nnot a header\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        running = await start_proxy(
            config(
                f"http://127.0.0.1:{port}",
                retries={"attempts": 3},
                breaker={"failures": 1},
            )
        )
        reply = await post(running.url + CHAT_PATH)
    finally:
        server.close()
        await server.wait_closed()
    assert reply.status == 502 and reply.error_type == "malformed_response"
    assert hits == 1  # never retried
    assert breaker(running).state == "open"


# --- retries ---------------------------------------------------------------------


async def test_connect_errors_are_retried_up_to_attempts_socket(
    start_proxy: ProxyFactory,
) -> None:
    running = await start_proxy(
        config(
            REFUSED,
            retries={"attempts": 3, "backoff": "10ms"},
            breaker={"failures": 100},
        )
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 502 and reply.error_type == "connect_error"
    ex = await last_exchange(running)
    assert [a.error_type for a in ex.attempts] == ["connect_error"] * 3
    assert all(a.upstream == "openai" for a in ex.attempts)
    samples = await scrape(running)
    retried = metric(
        samples, "llmproxy_retries_total", upstream="openai", error_type="connect_error"
    )
    assert retried == 2
    tries = metric(
        samples,
        "gen_ai_client_operation_duration_seconds_count",
        upstream="openai",
        error_type="connect_error",
    )
    assert tries == 3


async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reset the connection: a TCP RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    writer.transport.abort()


async def fin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close the connection cleanly, with no answer."""
    writer.close()


@contextlib.asynccontextmanager
async def raw_upstream(script: Script) -> AsyncIterator[RawUpstream]:
    """A raw TCP upstream that answers every request with ``script``."""
    upstream = RawUpstream([script])
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


@pytest.mark.parametrize("close", [rst, fin], ids=["reset", "close"])
async def test_a_request_the_provider_received_is_never_retried_socket(
    start_proxy: ProxyFactory, close: Any
) -> None:
    # The provider read the whole request before the connection went: it may
    # have processed (and billed) it, so a retry could run it twice.
    async with raw_upstream(close) as upstream:
        running = await start_proxy(
            config(upstream.url, retries={"attempts": 2, "backoff": "10ms"})
        )
        reply = await post(running.url + CHAT_PATH)
    assert reply.status == 502 and reply.error_type == "connect_error"
    assert upstream.requests == 1
    ex = await last_exchange(running)
    assert [a.error_type for a in ex.attempts] == ["connect_error"]
    samples = await scrape(running)
    assert not [s for s in samples if s[0] == "llmproxy_retries_total"]


async def test_a_pooled_connection_the_provider_closed_is_not_reused_socket(
    start_proxy: ProxyFactory,
) -> None:
    # Servers close idle keep-alive connections sooner than the proxy's pool
    # would (uvicorn after 5s). aiohttp drops a pooled connection whose close
    # it has seen, so the next request goes out on a new one and succeeds.
    closed = asyncio.Event()

    async def answer_then_idle_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        closed.set()
        writer.close()  # the server's keep-alive timeout, at once

    async with raw_upstream(answer_then_idle_close) as upstream:
        running = await start_proxy(config(upstream.url, retries={"attempts": 1}))
        first = await post(running.url + CHAT_PATH)
        await closed.wait()
        await asyncio.sleep(0.1)  # loopback delivers the FIN at once
        second = await post(running.url + CHAT_PATH)
    assert (first.status, second.status) == (200, 200)
    assert (upstream.requests, upstream.connections) == (2, 2)


@pytest.mark.parametrize(
    ("status", "headers", "error_type"),
    [
        (429, RATE_LIMITED, "rate_limited"),
        (503, {"Retry-After": "0"}, "upstream_5xx"),
        (503, {}, "upstream_5xx"),
        (529, {}, "overloaded"),
    ],
)
async def test_retryable_answers_are_retried_then_served_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    status: int,
    headers: dict[str, str],
    error_type: str,
) -> None:
    provider.handler = script(answer(status, headers), completion())
    running = await start_proxy(
        config(provider.url, retries={"attempts": 3, "backoff": "10ms"})
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 200
    assert reply.body == Recording.load("openai/chat_completion").body
    assert posts(provider) == 2
    ex = await last_exchange(running)
    assert [a.status for a in ex.attempts] == [status, 200]
    assert [a.error_type for a in ex.attempts] == [error_type, None]
    assert ex.error_type is None
    samples = await scrape(running)
    retried = metric(
        samples, "llmproxy_retries_total", upstream="openai", error_type=error_type
    )
    assert retried == 1
    tries = metric(
        samples, "gen_ai_client_operation_duration_seconds_count", upstream="openai"
    )
    assert tries == 2


@pytest.mark.parametrize("status", [400, 404, 500, 502])
async def test_other_answers_pass_through_untried_again_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, status: int
) -> None:
    provider.handler = answer(status)
    running = await start_proxy(
        config(provider.url, retries={"attempts": 3, "backoff": "10ms"})
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == status
    assert reply.headers["x-llmproxy-upstream"] == "openai"
    assert posts(provider) == 1
    assert len((await last_exchange(running)).attempts) == 1


async def test_retry_after_is_waited_for_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.handler = script(answer(503, {"Retry-After": "1"}), completion())
    running = await start_proxy(
        config(
            provider.url,
            retries={"attempts": 2, "backoff": "10ms", "max_retry_after": "5s"},
        )
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 200 and posts(provider) == 2
    assert 0.9 < reply.seconds < 3


@pytest.mark.parametrize("status", [429, 503, 529])
async def test_retry_after_beyond_the_cap_goes_to_the_client_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, status: int
) -> None:
    provider.handler = answer(status, {"Retry-After": "30"})
    running = await start_proxy(
        config(
            provider.url,
            retries={"attempts": 3, "backoff": "10ms", "max_retry_after": "1s"},
        )
    )
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == status and reply.headers["Retry-After"] == "30"
    assert reply.body == orjson.dumps(ERROR_BODIES[status])
    assert reply.seconds < 0.9
    assert posts(provider) == 1


@pytest.mark.parametrize(
    ("status", "marked", "tries"), [(500, "true", 2), (503, "false", 1)]
)
async def test_x_should_retry_is_obeyed_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    status: int,
    marked: str,
    tries: int,
) -> None:
    provider.handler = answer(status, {"x-should-retry": marked})
    running = await start_proxy(
        config(provider.url, retries={"attempts": 2, "backoff": "10ms"})
    )
    assert (await post(running.url + CHAT_PATH)).status == status
    assert posts(provider) == tries


async def test_rate_limited_until_the_end_reaches_the_client_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.handler = answer(429, RATE_LIMITED)
    running = await start_proxy(
        config(
            provider.url,
            retries={"attempts": 2, "backoff": "10ms"},
            breaker={"failures": 1},
        )
    )
    for _ in range(3):
        reply = await post(running.url + CHAT_PATH)
        assert reply.status == 429
        assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    assert posts(provider) == 6
    assert breaker(running).state == "closed"  # a rate limit is not a fault
    samples = await scrape(running)
    remaining = metric(
        samples, "llmproxy_ratelimit_remaining", upstream="openai", resource="requests"
    )
    assert remaining == 0
    assert (
        metric(
            samples, "llmproxy_ratelimit_limit", upstream="openai", resource="requests"
        )
        == 100
    )
    retried = metric(
        samples, "llmproxy_retries_total", upstream="openai", error_type="rate_limited"
    )
    assert retried == 3


@pytest.mark.parametrize("fault", ["refused", "503"])
async def test_retry_budget_bounds_retries_in_an_outage_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, fault: str
) -> None:
    provider.handler = answer(503)
    running = await start_proxy(
        config(
            REFUSED if fault == "refused" else provider.url,
            retries={"attempts": 3, "backoff": "1ms"},
            breaker={"failures": 1000},
        )
    )
    requests = 20
    for _ in range(requests):
        assert (await post(running.url + CHAT_PATH)).status in (502, 503)
    await running.settle()
    tries = sum(len(ex.attempts) for ex in running.exchanges)
    if fault == "503":
        assert tries == posts(provider)
    retries = tries - requests
    assert retries <= BUDGET_CAP / 2 + requests * BUDGET_RATIO
    assert retries >= BUDGET_CAP / 2  # the budget was there, and was spent


# --- fallbacks -------------------------------------------------------------------


async def test_fallbacks_in_order_when_the_primary_refuses_socket(
    backup: FakeProvider, start_proxy: ProxyFactory
) -> None:
    backup.handler = completion()
    raw = config(REFUSED, retries={"attempts": 2, "backoff": "10ms"})
    add_upstream(raw, "dead", REFUSED)
    add_upstream(raw, "backup", backup.url)
    raw["routes"][1]["fallbacks"] = ["dead", "backup"]
    running = await start_proxy(raw)
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 200
    assert reply.headers["x-llmproxy-upstream"] == "backup"
    assert reply.body == Recording.load("openai/chat_completion").body
    assert posts(backup) == 1
    ex = await last_exchange(running)
    assert ex.upstream == "backup" and ex.fallback and ex.error_type is None
    assert [a.upstream for a in ex.attempts] == ["openai", "openai", "dead", "backup"]
    samples = await scrape(running)
    assert metric(samples, "llmproxy_fallbacks_total", route="/v1") == 1
    assert metric(samples, "llmproxy_fallbacks_total", upstream="backup") == 1


@pytest.mark.parametrize("status", [429, 500, 503, 529])
async def test_fallback_after_a_final_error_answer_socket(
    provider: FakeProvider,
    backup: FakeProvider,
    start_proxy: ProxyFactory,
    status: int,
) -> None:
    provider.handler = answer(status)
    backup.handler = completion()
    raw = config(provider.url)
    add_upstream(raw, "backup", backup.url)
    raw["routes"][1]["fallbacks"] = ["backup"]
    running = await start_proxy(raw)
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 200 and reply.headers["x-llmproxy-upstream"] == "backup"
    assert (posts(provider), posts(backup)) == (1, 1)
    ex = await last_exchange(running)
    assert [a.status for a in ex.attempts] == [status, 200]


async def test_fallback_while_the_primary_breaker_is_open_socket(
    provider: FakeProvider, backup: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.handler = answer(500)
    backup.handler = completion()
    raw = config(provider.url, breaker={"failures": 1, "reset_after": "30s"})
    add_upstream(raw, "backup", backup.url)
    raw["routes"][1]["fallbacks"] = ["backup"]
    running = await start_proxy(raw)
    url = running.url + CHAT_PATH
    assert (await post(url)).headers["x-llmproxy-upstream"] == "backup"
    assert breaker(running).state == "open"
    for _ in range(3):
        reply = await post(url)
        assert reply.status == 200 and reply.headers["x-llmproxy-upstream"] == "backup"
    assert (posts(provider), posts(backup)) == (1, 4)
    ex = await last_exchange(running)
    assert [a.upstream for a in ex.attempts] == ["backup"] and ex.fallback
    samples = await scrape(running)
    assert metric(samples, "llmproxy_fallbacks_total", upstream="backup") == 4


async def test_fallback_after_a_first_byte_timeout_socket(
    provider: FakeProvider,
    backup: FakeProvider,
    start_proxy: ProxyFactory,
    gate: asyncio.Event,
) -> None:
    provider.handler = hang(gate)
    backup.handler = completion()
    raw = config(provider.url, timeouts={"first_byte": "200ms"})
    add_upstream(raw, "backup", backup.url)
    raw["routes"][1]["fallbacks"] = ["backup"]
    running = await start_proxy(raw)
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 200 and reply.headers["x-llmproxy-upstream"] == "backup"
    assert 0.15 < reply.seconds < 2
    ex = await last_exchange(running)
    assert [a.error_type for a in ex.attempts] == ["timeout_first_byte", None]


async def test_primary_answer_reaches_the_client_when_fallbacks_fail_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.handler = answer(429, {**RATE_LIMITED, "Retry-After": "30"})
    raw = config(provider.url)
    add_upstream(raw, "dead", REFUSED)
    raw["routes"][1]["fallbacks"] = ["dead"]
    running = await start_proxy(raw)
    reply = await post(running.url + CHAT_PATH)
    samples = await scrape(running)
    assert reply.status == 429 and reply.headers["Retry-After"] == "30"
    assert reply.headers["x-llmproxy-upstream"] == "openai"
    assert reply.body == orjson.dumps(ERROR_BODIES[429])
    gauge = "llmproxy_ratelimit_remaining"
    assert metric(samples, gauge, upstream="openai", resource="requests") == 0
    assert not [s for s in samples if s[0] == gauge and s[1]["upstream"] == "dead"]


async def test_a_caller_error_does_not_fall_back_socket(
    provider: FakeProvider, backup: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.handler = answer(400)
    backup.handler = completion()
    raw = config(provider.url)
    add_upstream(raw, "backup", backup.url)
    raw["routes"][1]["fallbacks"] = ["backup"]
    running = await start_proxy(raw)
    reply = await post(running.url + CHAT_PATH)
    assert reply.status == 400 and reply.headers["x-llmproxy-upstream"] == "openai"
    assert posts(backup) == 0


# --- concurrency -----------------------------------------------------------------


async def test_a_full_queue_answers_queue_full_at_once_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, gate: asyncio.Event
) -> None:
    inflight, most = 0, 0
    then = completion()

    async def slow(request: web.Request) -> web.StreamResponse:
        nonlocal inflight, most
        inflight += 1
        most = max(most, inflight)
        try:
            await gate.wait()
            return await then(request)
        finally:
            inflight -= 1

    provider.handler = slow
    running = await start_proxy(config(provider.url, max_concurrency=1, max_queue=1))
    assert running.proxy.dispatcher is not None
    limiter = running.proxy.dispatcher.limiters["openai"]
    tasks = [asyncio.create_task(post(running.url + CHAT_PATH)) for _ in range(3)]
    await eventually(lambda: any(t.done() for t in tasks))
    refused = next(t for t in tasks if t.done()).result()
    assert refused.status == 503 and refused.error_type == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.seconds < 0.5
    await eventually(lambda: posts(provider) == 1 and limiter.queued == 1)
    samples = await scrape(running)
    assert metric(samples, "llmproxy_inflight_requests", upstream="openai") == 1
    assert metric(samples, "llmproxy_queued_requests", upstream="openai") == 1

    await asyncio.sleep(0.3)  # the queued request waits at least this long
    gate.set()
    replies = await asyncio.gather(*tasks)
    assert sorted(r.status for r in replies) == [200, 200, 503]
    assert posts(provider) == 2 and most == 1
    samples = await scrape(running)
    assert metric(samples, "llmproxy_inflight_requests", upstream="openai") == 0
    assert metric(samples, "llmproxy_queued_requests", upstream="openai") == 0
    waits = "llmproxy_queue_wait_seconds"
    assert metric(samples, waits + "_count", upstream="openai") == 2
    assert metric(samples, waits + "_sum", upstream="openai") >= 0.25
    errors = metric(
        samples, "llmproxy_errors_total", upstream="openai", error_type="queue_full"
    )
    assert errors == 1


async def test_clients_leaving_free_their_slot_and_place_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, gate: asyncio.Event
) -> None:
    provider.handler = hang(gate)
    running = await start_proxy(config(provider.url, max_concurrency=1, max_queue=1))
    assert running.proxy.dispatcher is not None
    limiter = running.proxy.dispatcher.limiters["openai"]
    url = running.url + CHAT_PATH
    holder = asyncio.create_task(post(url))
    await eventually(lambda: posts(provider) == 1)
    waiting = asyncio.create_task(post(url))
    await eventually(lambda: limiter.queued == 1)
    waiting.cancel()  # the queued client gives up
    await eventually(lambda: limiter.queued == 0)
    assert (limiter.inflight, posts(provider)) == (1, 1)
    holder.cancel()  # and so does the one being served
    await eventually(lambda: limiter.inflight == 0)

    provider.handler = completion()
    replies = await asyncio.gather(*(post(url) for _ in range(2)))
    assert [r.status for r in replies] == [200, 200]
    assert (limiter.inflight, limiter.queued) == (0, 0)
