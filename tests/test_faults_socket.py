"""Faults on real sockets: a misbehaving upstream or client, byte by byte.

The upstream here is a raw TCP server that runs a script per connection: resets,
half-closes, stalls, one byte per second, a Content-Length that lies, gzip that
is not, informational answers and extra bytes after the body. Clients read
slowly or disconnect at each phase of a request. Every case checks what the
client got, the error type the exchange records, that the proxy hung up on the
upstream, and that descriptors, sockets and tasks are back where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from conftest import ProxyFactory, Recording, RunningProxy, proxy_config
from leaks import Snapshot, back_to

from llmproxy.exchange import Exchange

CHAT = "/v1/chat/completions"
STREAM_REQUEST = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
EVENTS = [
    e + b"\n\n"
    for e in Recording.load("openai/chat_completions_stream_include_usage").body.split(
        b"\n\n"
    )
    if e
]
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class RawUpstream:
    """A TCP server answering each request with the next script (or the last).

    ``hung_up`` counts connections the proxy closed while a script still held
    them open: the proof that a failed or abandoned response was let go.
    """

    scripts: list[Script]
    url: str = ""
    requests: int = 0
    connections: int = 0
    hung_up: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            while await self._request(reader):
                self.requests += 1
                script = self.scripts[min(self.requests, len(self.scripts)) - 1]
                await script(reader, writer)
                if writer.is_closing():
                    return
            if not writer.is_closing():
                self.hung_up += 1  # the proxy closed; this side had not
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up += 1
        finally:
            writer.close()
            self.changed.set()

    @staticmethod
    async def _request(reader: asyncio.StreamReader) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                await reader.readexactly(int(line.split(b":")[1]))
        return True

    async def wait_hung_up(self, count: int = 1, within: float = 3.0) -> None:
        async with asyncio.timeout(within):
            while self.hung_up < count:
                self.changed.clear()
                await self.changed.wait()


async def hold(reader: asyncio.StreamReader) -> None:
    """Keep the connection open until the proxy closes it."""
    while await reader.read(65536):
        pass


def answer(status: bytes = b"200 OK", head: bytes = b"", body: bytes = b"ok") -> Script:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, len(body), head, body)
        )
        await writer.drain()

    return script


@dataclass
class Outcome:
    status: int = 0
    body: bytes = b""
    error: str | None = None  # the client-side exception, if the body broke off


async def request(url: str, body: bytes = STREAM_REQUEST) -> Outcome:
    outcome = Outcome()
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=CLIENT_TIMEOUT
    ) as session:
        async with session.post(url, data=body) as resp:
            outcome.status = resp.status
            try:
                async for piece in resp.content.iter_any():
                    outcome.body += piece
            except aiohttp.ClientPayloadError as exc:
                outcome.error = type(exc).__name__
    return outcome


async def last_exchange(running: RunningProxy, count: int = 1) -> Exchange:
    for _ in range(300):
        if len(running.exchanges) >= count:
            break
        await asyncio.sleep(0.01)
    await running.settle()
    return running.exchanges[-1]


def config(url: str, **upstream: Any) -> dict[str, Any]:
    raw = proxy_config(url)
    settings = {"retries": {"attempts": 1}, "breaker": {"failures": 1000}, **upstream}
    for spec in raw["upstreams"].values():
        spec.update(settings)
    return raw


@pytest.fixture
async def upstream() -> AsyncIterator[RawUpstream]:
    raw = RawUpstream([])
    await raw.start()
    yield raw
    await raw.stop()


# --- the upstream misbehaves -----------------------------------------------------


async def reset_before_headers(r: Any, w: asyncio.StreamWriter) -> None:
    reset(w)


async def reset_mid_body(r: Any, w: asyncio.StreamWriter) -> None:
    w.write(SSE_HEAD + chunk(EVENTS[0]))
    await w.drain()
    await asyncio.sleep(0.05)
    reset(w)


async def half_close_before_headers(r: asyncio.StreamReader, w: Any) -> None:
    w.write_eof()
    await hold(r)


async def half_close_mid_body(r: asyncio.StreamReader, w: Any) -> None:
    w.write(SSE_HEAD + chunk(EVENTS[0]) + b"5\r\nda")
    w.write_eof()
    await hold(r)


async def stall_before_headers(r: asyncio.StreamReader, w: Any) -> None:
    await hold(r)


async def stall_mid_body(r: asyncio.StreamReader, w: Any) -> None:
    w.write(SSE_HEAD + chunk(EVENTS[0]))
    await hold(r)


async def long_content_length_then_close(r: Any, w: asyncio.StreamWriter) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await w.drain()
    w.close()


async def long_content_length_then_stall(r: asyncio.StreamReader, w: Any) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await hold(r)


async def conflicting_framing(r: asyncio.StreamReader, w: Any) -> None:
    w.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk(b"abc")
        + b"0\r\n\r\n"
    )
    await hold(r)


async def two_content_lengths(r: asyncio.StreamReader, w: Any) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc")
    await hold(r)


FAULTS = {
    # name: (script, upstream settings, status, client error, error type, hung up)
    "reset before headers": (
        reset_before_headers, {}, 502, None, "connect_error", False
    ),
    "reset mid-body": (
        reset_mid_body, {}, 200, "ClientPayloadError", "stream_truncated", False
    ),
    "half-close before headers": (
        half_close_before_headers, {}, 502, None, "connect_error", True
    ),
    "half-close mid-body": (
        half_close_mid_body, {}, 200, "ClientPayloadError", "stream_truncated", True
    ),
    "stall before headers": (
        stall_before_headers, {"timeouts": {"first_byte": "300ms"}},
        504, None, "timeout_first_byte", True,
    ),
    "stall mid-body": (
        stall_mid_body, {"timeouts": {"idle": "300ms"}},
        200, "ClientPayloadError", "timeout_idle", True,
    ),
    "Content-Length longer than the body, then close": (
        long_content_length_then_close, {},
        200, "ClientPayloadError", "stream_truncated", False,
    ),
    "Content-Length longer than the body, then stall": (
        long_content_length_then_stall, {"timeouts": {"idle": "300ms"}},
        200, "ClientPayloadError", "timeout_idle", True,
    ),
    "Content-Length with Transfer-Encoding": (
        conflicting_framing, {}, 502, None, "malformed_response", True
    ),
    "two Content-Lengths": (
        two_content_lengths, {}, 502, None, "malformed_response", True
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("script", "settings", "status", "client_error", "error_type", "hangs_up"),
    FAULTS.values(),
    ids=list(FAULTS),
)
async def test_upstream_fault_ends_typed_closed_and_leak_free_socket(
    upstream: RawUpstream,
    start_proxy: ProxyFactory,
    script: Script,
    settings: dict[str, Any],
    status: int,
    client_error: str | None,
    error_type: str,
    hangs_up: bool,
) -> None:
    upstream.scripts = [script]
    running = await start_proxy(config(upstream.url, **settings))
    before = Snapshot.take()

    for round_ in range(1, 3):  # twice: a leak per fault would show as growth
        outcome = await request(running.url + CHAT)
        assert outcome.status == status
        assert outcome.error == client_error
        if status >= 500:
            assert f'"{error_type}"'.encode() in outcome.body
        ex = await last_exchange(running, round_)
        assert ex.error_type == error_type
        if hangs_up:
            await upstream.wait_hung_up(round_)
    assert upstream.requests == 2  # never retried (attempts: 1)
    await back_to(before)


async def test_one_byte_per_second_is_served_whole_or_cut_by_the_deadline_socket(
    start_proxy: ProxyFactory,
) -> None:
    async def drip_body(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
        for byte in b"abc":
            await asyncio.sleep(1.0)
            w.write(bytes([byte]))
        await hold(r)

    async def drip_head(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
            w.write(bytes([byte]))
            await asyncio.sleep(1.0)
            if r.at_eof() or w.is_closing():
                break  # the proxy gave up

    async def case(script: Script, **settings: Any) -> tuple[Outcome, Exchange, float]:
        up = RawUpstream([script])
        await up.start()
        try:
            running = await start_proxy(config(up.url, **settings))
            started = time.perf_counter()
            # Not a GenAI path: bytes only, nothing for a dialect to judge.
            outcome = await request(running.url + "/v1/files", b"{}")
            seconds = time.perf_counter() - started
            ex = await last_exchange(running)
            await running.proxy.stop()
            return outcome, ex, seconds
        finally:
            await up.stop()

    before = Snapshot.take()
    whole, cut, slow_head = await asyncio.gather(
        case(drip_body, timeouts={"idle": "1500ms"}),
        case(drip_body, timeouts={"idle": "1500ms", "total": "2s"}),
        case(drip_head, timeouts={"first_byte": "1500ms"}),
    )
    # Each byte keeps an idle deadline at bay: the answer arrives whole.
    outcome, ex, seconds = whole
    assert (outcome.status, outcome.body, outcome.error) == (200, b"abc", None)
    assert ex.error_type is None and 2.9 < seconds < 4
    # The total deadline cuts it, and the client can tell.
    outcome, ex, seconds = cut
    assert outcome.status == 200 and outcome.error == "ClientPayloadError"
    assert outcome.body in (b"a", b"ab") and ex.error_type == "timeout_total"
    assert 1.9 < seconds < 3
    # Headers that drip past the first-byte deadline are a 504.
    outcome, ex, seconds = slow_head
    assert outcome.status == 504 and ex.error_type == "timeout_first_byte"
    assert 1.4 < seconds < 2.5
    await back_to(before, within=8)


async def test_bytes_after_a_content_length_body_reach_no_one_socket(
    upstream: RawUpstream, start_proxy: ProxyFactory
) -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
    upstream.scripts = [
        _with_tail(answer(body=b"first"), smuggled),
        answer(body=b"second"),
        answer(body=b"third"),
    ]
    running = await start_proxy(config(upstream.url))
    before = Snapshot.take()
    bodies = [
        (await request(running.url + "/v1/embeddings", b"{}")).body for _ in range(3)
    ]
    assert bodies == [b"first", b"second", b"third"]
    assert upstream.connections == 2  # the one with bytes to spare was dropped
    await back_to(before, slack=2, task_slack=1)  # the pooled one remains


def _with_tail(script: Script, tail: bytes) -> Script:
    async def with_tail(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await script(r, w)
        w.write(tail)
        await w.drain()

    return with_tail


async def test_informational_answers_then_the_real_one_socket(
    upstream: RawUpstream, start_proxy: ProxyFactory
) -> None:
    async def early_hints(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await answer(body=b"final")(r, w)

    upstream.scripts = [early_hints]
    running = await start_proxy(config(upstream.url))
    before = Snapshot.take()
    for _ in range(2):
        outcome = await request(running.url + "/v1/embeddings", b"{}")
        assert (outcome.status, outcome.body, outcome.error) == (200, b"final", None)
    # The answer was whole and framed: its connection is reused, not leaked.
    assert (upstream.requests, upstream.connections) == (2, 1)
    await back_to(before, slack=2, task_slack=1)  # the pooled one remains


async def test_a_body_framed_by_closing_the_connection_arrives_whole_socket(
    upstream: RawUpstream, start_proxy: ProxyFactory
) -> None:
    async def until_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for event in EVENTS:
            w.write(event)
            await w.drain()
        w.close()

    upstream.scripts = [until_close]
    running = await start_proxy(config(upstream.url))
    before = Snapshot.take()
    for round_ in range(1, 3):
        outcome = await request(running.url + CHAT)
        assert outcome.body == b"".join(EVENTS) and outcome.error is None
        ex = await last_exchange(running, round_)
        assert ex.error_type is None and ex.terminal and ex.output_tokens == 5
    # The upstream hung up to end the body; the proxy's end is closed too.
    assert upstream.connections == 2
    await back_to(before)


async def test_invalid_gzip_is_relayed_untouched_and_only_costs_telemetry_socket(
    upstream: RawUpstream, start_proxy: ProxyFactory
) -> None:
    garbage = gzip.compress(b"".join(EVENTS))[:40] + b"\x00not gzip at all" * 20

    async def bad_gzip(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(
            SSE_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
            + chunk(garbage)
            + b"0\r\n\r\n"
        )
        await w.drain()
        w.close()

    upstream.scripts = [bad_gzip]
    running = await start_proxy(config(upstream.url))
    before = Snapshot.take()
    for round_ in range(1, 3):
        outcome = await request(running.url + CHAT)
        assert (outcome.status, outcome.body, outcome.error) == (200, garbage, None)
        ex = await last_exchange(running, round_)
        assert ex.parse_error == "content-encoding does not decode"
        assert ex.error_type is None
    assert upstream.connections == 2  # Connection: close, so never pooled
    await back_to(before)


# --- the client misbehaves -------------------------------------------------------


@dataclass
class Firehose:
    """An upstream answer of ``total`` bytes, written as fast as it is taken."""

    total: int = 128 * 1024 * 1024
    sent: int = 0

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.total)
        piece = b"x" * 65536
        while self.sent < self.total:
            w.write(piece)
            self.sent += len(piece)
            await w.drain()

    async def stalled(self) -> None:
        """Return once the upstream is held back: nothing more sent for 0.5s."""
        await asyncio.sleep(0.5)
        stalled_at = self.sent
        await asyncio.sleep(0.5)
        assert self.sent == stalled_at, "the proxy kept reading for a slow client"
        # Within a bound set by socket buffers, not by how much the answer holds.
        assert self.sent < 32 * 1024 * 1024, self.sent


async def slow_client(
    running: RunningProxy,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A client with a small receive buffer that sent its request and read once."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, running.proxy.proxy_address)
    reader, writer = await asyncio.open_connection(sock=client)
    writer.write(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    )
    return reader, writer, len(await reader.read(65536))


async def test_a_slow_reader_holds_back_the_upstream_not_the_proxy_socket(
    upstream: RawUpstream, start_proxy: ProxyFactory
) -> None:
    firehose = Firehose()
    upstream.scripts = [firehose]
    running = await start_proxy(config(upstream.url))
    before = Snapshot.take()
    reader, writer, received = await slow_client(running)
    await firehose.stalled()  # the client reads nothing more

    # And every byte still arrives once the client reads again.
    while piece := await reader.read(1 << 20):
        received += len(piece)
        if received >= firehose.total:
            break
    writer.close()
    head = received - firehose.total
    assert 0 < head < 1024  # the response head, then exactly the body
    ex = await last_exchange(running)
    assert ex.bytes_out == firehose.total and ex.error_type is None
    assert upstream.hung_up == 0
    await back_to(before, slack=2, task_slack=1)  # the pooled one remains


async def test_a_stalled_slow_reader_that_leaves_closes_the_upstream_socket(
    upstream: RawUpstream, start_proxy: ProxyFactory
) -> None:
    firehose = Firehose()
    upstream.scripts = [firehose]
    running = await start_proxy(config(upstream.url))
    before = Snapshot.take()
    for round_ in range(1, 3):
        _, writer, _ = await slow_client(running)
        await firehose.stalled()
        writer.close()  # with unread bytes in its buffer: a reset
        await upstream.wait_hung_up(round_)
        ex = await last_exchange(running, round_)
        assert ex.error_type == "client_disconnect" and ex.client_disconnected
        assert ex.bytes_out < firehose.total
        firehose.sent = 0
    assert upstream.requests == 2
    await back_to(before)


async def disconnect_while_sending_the_body(url: str, port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        + b"{" * 10
    )
    await asyncio.sleep(0.2)
    writer.close()


async def disconnect_while_waiting(url: str, port: int) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.3):
            await request(url + CHAT)


async def disconnect_mid_stream(url: str, port: int) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url + CHAT, data=STREAM_REQUEST)
        await resp.content.readany()
        resp.close()


async def half_close_after_the_request(url: str, port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    )
    writer.write_eof()
    # aiohttp takes the end of the request stream for the client going away.
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()


async def slow_events(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(SSE_HEAD)
    for event in EVENTS:
        w.write(chunk(event))
        await w.drain()
        await asyncio.sleep(0.2)
    w.write(b"0\r\n\r\n")
    await hold(r)


DISCONNECTS = {
    "while sending the body": (disconnect_while_sending_the_body, 0),
    "while waiting for the answer": (disconnect_while_waiting, 1),
    "mid-stream": (disconnect_mid_stream, 1),
    "half-close after the request": (half_close_after_the_request, None),
}


@pytest.mark.parametrize(
    ("client", "upstream_requests"), DISCONNECTS.values(), ids=list(DISCONNECTS)
)
async def test_client_disconnect_closes_the_upstream_and_leaks_nothing_socket(
    upstream: RawUpstream,
    start_proxy: ProxyFactory,
    client: Callable[[str, int], Awaitable[None]],
    upstream_requests: int | None,
) -> None:
    upstream.scripts = [slow_events]
    running = await start_proxy(config(upstream.url))
    before = Snapshot.take()
    port = running.proxy.proxy_address[1]

    for round_ in range(1, 3):
        await client(running.url, port)
        if upstream_requests is None:
            # Forwarded or not, depending on when the end of the stream lands.
            if upstream.requests >= round_:
                await upstream.wait_hung_up(round_)
        else:
            assert upstream.requests == upstream_requests * round_
            if upstream_requests:
                await upstream.wait_hung_up(round_)
        if running.exchanges or upstream_requests:
            ex = await last_exchange(running, round_)
            assert ex.error_type == "client_disconnect" and ex.client_disconnected
    await back_to(before)


async def test_a_client_leaving_the_queue_frees_its_place_socket(
    upstream: RawUpstream, start_proxy: ProxyFactory
) -> None:
    upstream.scripts = [slow_events]
    running = await start_proxy(config(upstream.url, max_concurrency=1, max_queue=1))
    before = Snapshot.take()
    first = asyncio.create_task(request(running.url + CHAT))
    await asyncio.sleep(0.1)
    for _ in range(3):  # queued, then gone, three times over
        await disconnect_while_waiting(running.url, 0)
    outcome = await first
    assert outcome.body.count(b"data: ") == len(EVENTS)
    assert upstream.requests == 1
    await running.settle()
    errors = [e.error_type for e in running.exchanges]
    assert errors.count("client_disconnect") == 3 and errors.count(None) == 1
    limiter = running.proxy.dispatcher.limiters["openai"]  # type: ignore[union-attr]
    assert limiter.inflight == 0 and limiter.queued == 0
    await back_to(before)
