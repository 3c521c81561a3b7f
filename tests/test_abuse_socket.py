"""Abuse on real sockets: hostile requests reach nothing but a configured upstream.

Malformed and smuggling-shaped HTTP is written byte for byte on raw sockets;
each test checks what the client got, what the fake provider (and a second
server standing for anything else on the network) received, and that the proxy
went on serving. The last test sends credentials in every header an SDK uses
and looks for them in logs, spans and captures.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from conftest import (
    FakeProvider,
    ProxyFactory,
    Recording,
    RunningProxy,
    proxy_config,
)
from leaks import Snapshot, back_to
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from llmproxy.app import Proxy
from llmproxy.config import build_config
from llmproxy.errors import ConfigError
from llmproxy.headers import SECRET_HEADERS
from llmproxy.telemetry.logging import setup_logging
from llmproxy.telemetry.tracing import Tracer

CHAT = "/v1/chat/completions"
GOOD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


@dataclass
class Answer:
    data: bytes
    closed: bool  # the proxy closed the connection
    seconds: float  # until the first byte of the answer

    @property
    def status(self) -> int:
        if not self.data.startswith(b"HTTP/1."):
            return 0
        return int(self.data[9:12])


async def send_raw(
    port: int, data: bytes, *, wait: float = 2.0, host: str = "127.0.0.1"
) -> Answer:
    """Write ``data``; read until the proxy closes the connection or ``wait``."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    chunks: list[bytes] = []
    closed = False
    first: float | None = None
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                first = first or time.perf_counter()
                chunks.append(chunk)
            closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    finally:
        writer.close()
    seconds = (first or time.perf_counter()) - started
    return Answer(b"".join(chunks), closed, seconds)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
def proxy_port(proxy: RunningProxy, provider: FakeProvider) -> int:
    provider.reply(Recording.load("openai/chat_completion"))
    return port_of(proxy.url)


@pytest.fixture
async def bystander() -> AsyncIterator[FakeProvider]:
    """Another server on the machine: what a hostile request would like to reach."""
    fake = FakeProvider()
    runner = web.ServerRunner(web.Server(fake.handle))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()


async def still_serves(port: int, provider: FakeProvider) -> None:
    before = len(provider.received)
    answer = await send_raw(port, GOOD)
    assert answer.status == 200, answer.data[:200]
    assert len(provider.received) == before + 1


# --- malformed requests ----------------------------------------------------------

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
MALFORMED = {
    "bare LF inside a header": HEAD + b"X-A: a\nX-Injected: 1\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "bare CR inside a header": HEAD + b"X-A: a\rX-Injected: 1\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "obsolete line folding": HEAD + b"X-A: a\r\n X-Injected: 1\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "NUL in a header value": HEAD + b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "NUL in the path": b"POST /v1/chat\x00/completions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "space in the path": b"POST /v1/chat completions HTTP/1.1\r\nHost: x\r\n\r\n",
    "space before the colon": HEAD + b"Transfer-Encoding : chunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
    "Content-Length and Transfer-Encoding": HEAD + b"Content-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "conflicting Content-Lengths": HEAD + b"Content-Length: 2\r\n"
    b"Content-Length: 40\r\n\r\n{}",
    "repeated Content-Length": HEAD + b"Content-Length: 2\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    "list in Content-Length": HEAD + b"Content-Length: 2, 2\r\n\r\n{}",
    "negative Content-Length": HEAD + b"Content-Length: -1\r\n\r\n{}",
    "signed Content-Length": HEAD + b"Content-Length: +2\r\n\r\n{}",
    "unknown transfer coding": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
    "chunked not last": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n"
    b"2\r\n{}\r\n0\r\n\r\n",
    "chunk size overflow": HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff2\r\n{}\r\n0\r\n\r\n",
    "newline in a chunk extension": HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    b'2;x="a\r\n0\r\n\r\n"\r\n{}\r\n0\r\n\r\n',
    "two Host headers": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    b"Host: evil.example\r\nContent-Length: 2\r\n\r\n{}",
    "header line over 8 KiB": HEAD + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "more than 128 headers": HEAD
    + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    + b"\r\n",
    "request line over 8 KiB": b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 4,
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=list(MALFORMED))
async def test_malformed_requests_get_400_and_are_never_forwarded_socket(
    data: bytes, proxy_port: int, provider: FakeProvider
) -> None:
    answer = await send_raw(proxy_port, data)
    assert answer.status == 400, answer.data[:300]
    assert answer.closed
    assert provider.received == []
    await still_serves(proxy_port, provider)


SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "data",
    [
        # A request hidden in the body is only ever a body.
        HEAD
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(SMUGGLED)
        + SMUGGLED,
        HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
        # A chunked body whose terminator hides a request in its trailer section.
        HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"0\r\nX-T: 1\r\n\r\n",
    ],
    ids=["in a Content-Length body", "in a chunk", "chunked with a trailer"],
)
async def test_requests_inside_bodies_are_forwarded_as_one_clean_request_socket(
    data: bytes, proxy_port: int, provider: FakeProvider
) -> None:
    answer = await send_raw(proxy_port, data)
    assert answer.status == 200
    assert [r.path for r in provider.received] == [CHAT]
    forwarded = provider.received[0]
    # Re-framed by the proxy: one length, no transfer coding, the body as read.
    lengths = forwarded.headers.getall("Content-Length", ["0"])
    assert lengths == [str(len(forwarded.body))]
    assert "Transfer-Encoding" not in forwarded.headers
    assert "X-T" not in forwarded.headers


async def test_pipelined_requests_are_answered_in_order_and_stop_at_an_error_socket(
    proxy_port: int, provider: FakeProvider
) -> None:
    second = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    answer = await send_raw(proxy_port, HEAD + b"Content-Length: 2\r\n\r\n{}" + second)
    assert answer.data.count(b"HTTP/1.1 200 OK") == 2 and answer.closed
    assert [r.path for r in provider.received] == [CHAT, "/v1/embeddings"]

    # A refusal that keeps the connection: the next request is still served.
    provider.received.clear()
    answer = await send_raw(
        proxy_port, b"POST /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" + second
    )
    assert answer.status == 404 and answer.data.count(b"HTTP/1.1 200 OK") == 1
    assert [r.path for r in provider.received] == ["/v1/embeddings"]

    # After an answer that closes the connection, what follows is never read as a
    # request (aiohttp reads and drops it for a while, so the client can read
    # the answer before the connection closes).
    provider.received.clear()
    answer = await send_raw(
        proxy_port,
        HEAD + b"Content-Length: 99999999999\r\n\r\n{}" + second,
        wait=0.5,
    )
    assert answer.status == 413 and b"Connection: close" in answer.data
    assert answer.data.count(b"HTTP/1.1") == 1
    assert provider.received == []


# --- where requests go -----------------------------------------------------------


async def test_requests_reach_only_the_configured_upstream_socket(
    proxy_port: int, provider: FakeProvider, bystander: FakeProvider
) -> None:
    elsewhere = bystander.url.removeprefix("http://").encode()
    refused = [
        b"POST http://%s/v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
        b"Connection: close\r\nContent-Length: 2\r\n\r\n{}" % (elsewhere, elsewhere),
        b"CONNECT %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        % (elsewhere, elsewhere),
        b"GET //%s/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        % elsewhere,
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    for data in refused:
        answer = await send_raw(proxy_port, data)
        assert answer.status in (400, 404), (data, answer.data[:200])
        assert b"HTTP/1.1 200" not in answer.data

    # Host and forwarding headers name the bystander: still only the provider.
    for header in (b"Host", b"X-Forwarded-Host", b"Forwarded"):
        value = elsewhere if header != b"Forwarded" else b"host=" + elsewhere
        data = GOOD.replace(
            b"Host: x\r\n", b"Host: x\r\n" if header != b"Host" else b""
        )
        data = data.replace(b"\r\n\r\n", b"\r\n%s: %s\r\n\r\n" % (header, value), 1)
        answer = await send_raw(proxy_port, data)
        assert answer.status == 200, answer.data[:200]
    assert bystander.received == []
    assert len(provider.received) == 3
    upstream_host = provider.url.removeprefix("http://")
    assert all(r.headers["Host"] == upstream_host for r in provider.received)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2e/admin",
        "/anthropic/..%2Fv1/models",
        "/anthropic/..%2fv1/models",
        "/anthropic/%2e%2e%2fv1/models",
        "/anthropic/..%5Cv1/models",
        "/anthropic/..\\v1/models",
        "/anthropic/..;/v1/models",
        "/v1/chat/..",
        "/v1/./chat/completions",
        "/v1%2F..%2Fadmin",
    ],
)
async def test_dot_segments_however_spelled_are_never_forwarded_socket(
    path: str, proxy_port: int, provider: FakeProvider
) -> None:
    data = b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % path.encode()
    answer = await send_raw(proxy_port, data + b"Content-Length: 2\r\n\r\n{}")
    assert answer.status == 404 and b'"no_route"' in answer.data
    assert provider.received == []


# --- size and time limits --------------------------------------------------------


@pytest.fixture
async def limited(provider: FakeProvider, start_proxy: ProxyFactory) -> RunningProxy:
    raw = proxy_config(provider.url)
    raw["server"]["max_body_bytes"] = 1024
    raw["server"]["client_timeout"] = "600ms"
    provider.reply(Recording.load("openai/chat_completion"))
    return await start_proxy(raw)


async def test_oversized_bodies_are_refused_unread_socket(
    limited: RunningProxy, provider: FakeProvider
) -> None:
    port = port_of(limited.url)
    # Declared too large: answered from the headers alone, the body never sent.
    answer = await send_raw(
        port, HEAD + b"Content-Length: 1073741824\r\n\r\n", wait=0.5
    )
    assert answer.status == 413 and answer.seconds < 0.3
    assert b"Connection: close" in answer.data
    # Chunked: refused once the limit is passed, however much more is coming.
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    answer = await send_raw(
        port, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2, wait=0.5
    )
    assert answer.status == 413 and b'"payload_too_large"' in answer.data
    assert provider.received == []
    await limited.settle()
    assert [e.error_type for e in limited.exchanges] == ["payload_too_large"] * 2


async def trickle(
    port: int, data: bytes, every: float = 0.05, head: bytes = b""
) -> tuple[bytes, float]:
    """Send ``head``, then ``data`` a byte at a time until the proxy answers or
    hangs up.

    Returns what the proxy sent and after how many seconds it hung up.
    """
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reply = asyncio.create_task(reader.read(65536))
    writer.write(head)
    try:
        for byte in data:
            if reply.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(every)
        else:
            pytest.fail("the proxy waited for the whole trickled request")
        return await reply, time.perf_counter() - started
    except ConnectionError:
        return b"", time.perf_counter() - started
    finally:
        reply.cancel()
        writer.close()


async def test_slowloris_headers_are_cut_and_others_still_served_socket(
    limited: RunningProxy, provider: FakeProvider
) -> None:
    port = port_of(limited.url)
    await still_serves(port, provider)  # the pooled upstream connection is open
    before = Snapshot.take()
    endless = HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 20) for i in range(100))
    slow = [asyncio.create_task(trickle(port, endless)) for _ in range(50)]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.1)

    # Meanwhile, an honest client is served at once.
    started = time.perf_counter()
    await still_serves(port, provider)
    assert time.perf_counter() - started < 0.5

    results = await asyncio.gather(*slow)
    assert all(sent == b"" for sent, _ in results)
    cut_after = [seconds for _, seconds in results]
    assert all(0.5 < s < 2.0 for s in cut_after), cut_after
    assert await asyncio.wait_for(idle_reader.read(), 2) == b""  # the idle one too
    idle_writer.close()
    assert len(provider.received) == 2
    await back_to(before)


async def test_a_trickled_body_is_cut_with_408_socket(
    limited: RunningProxy, provider: FakeProvider
) -> None:
    port = port_of(limited.url)
    head = HEAD + b"Content-Length: 100\r\n\r\n"
    answer, seconds = await trickle(port, b" " * 100, head=head)
    assert 0.55 < seconds < 2
    assert answer.startswith(b"HTTP/1.1 408") and b'"client_disconnect"' in answer
    assert provider.received == []
    await limited.settle()
    assert limited.exchanges[-1].error_type == "client_disconnect"


# --- bytes that are not text ----------------------------------------------------

# obs-text (RFC 9110 section 5.5): aiohttp accepts it and hands the handler a str
# with lone surrogates, which no UTF-8 sink (JSON, exposition, OTLP) can write.
NOT_TEXT = {
    "not UTF-8": b"acme\xff",
    "a lone continuation byte": b"\x80team",
    "a C1 control": "acme\u0085".encode(),
}


@pytest.fixture
async def attributed(
    provider: FakeProvider,
    every_log: tuple[io.StringIO, Everything],
) -> AsyncIterator[tuple[Proxy, InMemorySpanExporter]]:
    raw = proxy_config(provider.url)
    raw["telemetry"] = {"labels": ["tenant", "prompt_version"]}
    exporter = InMemorySpanExporter()
    tracer = Tracer(exporter, Resource({"service.name": "test"}), batch=False)
    proxy = Proxy(build_config(raw), tracer=tracer)
    await proxy.start()
    provider.reply(Recording.load("openai/chat_completion"))
    try:
        yield proxy, exporter
    finally:
        await proxy.stop()
        tracer.shutdown()


def attributed_request(value: bytes) -> bytes:
    return GOOD.replace(
        b"Host: x\r\n",
        b"Host: x\r\nX-LLMProxy-Tenant: %s\r\nX-LLMProxy-Prompt-Version: %s\r\n"
        % (value, value),
    )


def written_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    from llmproxy.telemetry import logging as log_module

    assert log_module._writer is not None
    log_module._writer.flush()
    return [orjson.loads(line) for line in stream.getvalue().split("\n") if line]


@pytest.mark.parametrize("value", NOT_TEXT.values(), ids=list(NOT_TEXT))
async def test_attribution_that_is_not_text_is_dropped_socket(
    value: bytes,
    attributed: tuple[Proxy, InMemorySpanExporter],
    every_log: tuple[io.StringIO, Everything],
    provider: FakeProvider,
) -> None:
    proxy, _ = attributed
    port = port_of(proxy.proxy_url)
    answer = await send_raw(port, attributed_request(value))
    assert answer.status == 200, answer.data[:300]
    assert len(provider.received) == 1
    answer = await send_raw(port, attributed_request(b"team-7"))
    assert answer.status == 200
    await asyncio.sleep(0.05)

    # The client's own audit line is written, unattributed; the next one is whole.
    lines = [r for r in written_lines(every_log[0]) if r["event"] != "log.unwritable"]
    requests = [r for r in lines if r["event"] == "request"]
    assert len(requests) == 2, lines
    assert "tenant" not in requests[0] and "prompt_version" not in requests[0]
    assert requests[1]["tenant"] == requests[1]["prompt_version"] == "team-7"
    assert not any(r["event"] == "request.internal_error" for r in lines)

    # /metrics still scrapes, and has no series for the value that was not text.
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.admin_url + "/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    assert 'tenant="team-7"' in text
    assert 'tenant=""' in text


@pytest.mark.parametrize("value", NOT_TEXT.values(), ids=list(NOT_TEXT))
async def test_span_attributes_of_attribution_that_is_not_text_socket(
    value: bytes, attributed: tuple[Proxy, InMemorySpanExporter]
) -> None:
    proxy, exporter = attributed
    answer = await send_raw(port_of(proxy.proxy_url), attributed_request(value))
    assert answer.status == 200
    spans = exporter.get_finished_spans()
    assert spans
    for span in spans:
        attributes = dict(span.attributes or {})
        strings = [v for v in attributes.values() if isinstance(v, str)]
        assert all(v.isprintable() for v in strings), attributes


# --- the admin listener ----------------------------------------------------------


async def test_admin_listener_is_separate_and_bound_to_localhost_socket(
    proxy: RunningProxy, provider: FakeProvider
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    proxy_port, admin_port = port_of(proxy.url), port_of(proxy.admin_url)
    assert proxy_port != admin_port
    assert proxy.proxy.admin_address[0] == "127.0.0.1"

    # Bound to 127.0.0.1 only: the rest of 127/8 is loopback too, but refused.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.2", admin_port)

    # The admin port never proxies; the proxy port never serves admin pages.
    answer = await send_raw(admin_port, GOOD)
    assert answer.status in (404, 405)
    for path in (b"/metrics", b"/healthz", b"/health"):
        answer = await send_raw(
            proxy_port,
            b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path,
        )
        assert answer.status == 404 and b'"no_route"' in answer.data
    assert provider.received == []
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin_url + "/healthz") as resp:
            assert resp.status == 200


# --- credentials -----------------------------------------------------------------

PROXY_KEY = "SECRET-proxy-key-0123456789"
SECRETS = {
    "Authorization": "Bearer sk-SECRET-authorization-0123456789",
    "x-api-key": "sk-ant-SECRET-x-api-key-0123456789",
    "api-key": "SECRET-azure-api-key-0123456789",
    "x-goog-api-key": "SECRET-goog-api-key-0123456789",
    "Ocp-Apim-Subscription-Key": "SECRET-apim-0123456789",
    "OpenAI-Organization": "org-SECRET-0123456789",
    "OpenAI-Project": "proj_SECRET-0123456789",
    "Proxy-Authorization": "Basic SECRET-proxy-authorization",
    "Cookie": "session=SECRET-cookie-0123456789",
    "X-Amz-Security-Token": "SECRET-amz-session-token-0123456789",
}


class Everything(logging.Handler):
    """Keeps every record any logger emits, rendered with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(message)s %(fields)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not hasattr(record, "fields"):
            record.fields = ""
        self.lines.append(self.format(record))


@pytest.fixture
def every_log() -> Iterator[tuple[io.StringIO, Everything]]:
    stream = io.StringIO()
    writer = setup_logging("debug", stream)
    handler = Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream, handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        writer.stop()


async def test_credentials_never_reach_logs_spans_or_captures_socket(
    provider: FakeProvider,
    every_log: tuple[io.StringIO, Everything],
    tmp_path: Path,
) -> None:
    stream, handler = every_log
    capture = tmp_path / "capture.jsonl"
    raw = proxy_config(provider.url)
    raw["server"]["auth"] = {"keys": [PROXY_KEY]}
    raw["routes"][1]["capture"] = True
    raw["telemetry"] = {"capture_path": str(capture)}
    exporter = InMemorySpanExporter()
    tracer = Tracer(exporter, Resource({"service.name": "test"}), batch=False)
    proxy = Proxy(build_config(raw), tracer=tracer)
    await proxy.start()
    port = port_of(proxy.proxy_url)
    headers = {**SECRETS, "x-llmproxy-key": PROXY_KEY}
    assert {k.lower() for k in headers} == SECRET_HEADERS  # every one, no fewer

    async def echo_credentials(request: web.Request) -> web.StreamResponse:
        # A provider that quotes what it was sent in its error message.
        quoted = " ".join(request.headers.get(k, "") for k in SECRETS)
        return web.json_response(
            {"error": {"type": "invalid_request_error", "message": quoted}},
            status=401,
        )

    try:
        provider.reply(Recording.load("openai/chat_completions_stream_include_usage"))
        async with openai.AsyncOpenAI(
            base_url=proxy.proxy_url + "/v1",
            api_key=SECRETS["Authorization"][7:],
            default_headers=headers,
            max_retries=0,
        ) as client:
            stream_ = await client.chat.completions.create(
                model="gpt-4",
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "hi"}],
            )
            async for _ in stream_:
                pass
            provider.handler = echo_credentials
            with pytest.raises(openai.AuthenticationError) as info:
                await client.embeddings.create(model="e", input="hi")
            # The client's own answer passes through unchanged.
            assert SECRETS["x-api-key"] in str(info.value)

        lines = b"".join(
            b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()
        )
        for data in (
            # malformed after the credentials, and inside one of them
            HEAD + lines + b"X-A: a\x01\r\n\r\n",
            HEAD + lines.replace(b"0123456789\r\n", b"0123456789\x7f\r\n", 1) + b"\r\n",
            b"POST /v1/chat\x00 HTTP/1.1\r\n" + lines + b"\r\n",
            # refused by the proxy itself: wrong key, no route, too large
            HEAD
            + lines.replace(PROXY_KEY.encode(), b"SECRET-wrong-key-123456789")
            + b"Content-Length: 2\r\n\r\n{}",
            b"POST /nowhere HTTP/1.1\r\nHost: x\r\n"
            + lines
            + b"Content-Length: 2\r\n\r\n{}",
            HEAD + lines + b"Content-Length: 999999999999\r\n\r\n",
        ):
            answer = await send_raw(port, data, wait=0.3)
            assert answer.status in (400, 401, 404, 413), answer.data[:200]
        await asyncio.sleep(0.05)
    finally:
        await proxy.stop()
        tracer.shutdown()

    # The provider did get them: they pass through untouched.
    assert provider.received[0].headers["x-api-key"] == SECRETS["x-api-key"]
    assert "x-llmproxy-key" not in provider.received[0].headers

    from llmproxy.telemetry import logging as log_module

    assert log_module._writer is not None
    log_module._writer.flush()
    logged = stream.getvalue()
    records = [orjson.loads(line) for line in logged.splitlines()]
    events = [r["event"] for r in records]
    assert events.count("request") == 5
    assert events.count("request.malformed") == 3
    spans: list[Any] = exporter.get_finished_spans()
    assert len(spans) >= 5
    # Both answers on the capturing route were captured: the check below is real.
    captured = [orjson.loads(line) for line in capture.read_bytes().splitlines()]
    assert [(c["status"], '"hi"' in c["request"]) for c in captured] == [
        (200, True),
        (401, True),
    ], captured
    everything = "\n".join(
        [
            logged,
            *handler.lines,
            capture.read_text(),
            *(s.to_json() for s in spans),
        ]
    )
    assert "SECRET" not in everything


def test_client_timeout_is_a_positive_duration() -> None:
    raw = proxy_config("http://127.0.0.1:1")
    assert build_config(raw).server.client_timeout == 75.0
    raw["server"]["client_timeout"] = "0s"
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert info.value.problems == ["server.client_timeout: must be more than 0"]
