"""Traces end to end: SDK client, proxy, fake provider, and a real OTLP/HTTP export."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import openai
import pytest
from conftest import FakeProvider, Recording, proxy_config
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes import (
    http_attributes,
    server_attributes,
    url_attributes,
)
from otlp_receiver import GrpcOtlpReceiver, OtlpReceiver

from llmproxy.app import Proxy
from llmproxy.config import build_config
from llmproxy.telemetry.tracing import Tracer

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
_OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)

StartProxy = Callable[[Tracer | None], Awaitable[Proxy]]
TracingEnv = Callable[..., Tracer]


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = OtlpReceiver()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def tracing_env(monkeypatch: pytest.MonkeyPatch) -> TracingEnv:
    """Point the standard variables at ``endpoint``; return ``Tracer.from_env()``."""

    def configure(endpoint: str, protocol: str | None = None) -> Tracer:
        for name in _OTEL_VARS:
            monkeypatch.delenv(name, raising=False)
        if protocol is not None:
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "5")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        tracer = Tracer.from_env()
        assert tracer is not None
        return tracer

    return configure


@pytest.fixture
async def start_traced(provider: FakeProvider) -> AsyncIterator[StartProxy]:
    started: list[Proxy] = []

    async def start(tracer: Tracer | None) -> Proxy:
        proxy = Proxy(build_config(proxy_config(provider.url)), tracer=tracer)
        await proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.tracer is not None:
            # Off the loop: the receiver on this loop must answer the last export.
            await asyncio.to_thread(proxy.tracer.shutdown, 1.0)
        await proxy.stop()


async def test_stream_is_traced_and_context_forwarded_socket(
    provider: FakeProvider,
    receiver: OtlpReceiver,
    tracing_env: Callable[[str], Tracer],
    start_traced: StartProxy,
) -> None:
    provider.reply(Recording.load("openai/chat_completions_stream_include_usage"))
    proxy = await start_traced(tracing_env(receiver.traces_url))

    client = openai.AsyncOpenAI(base_url=proxy.proxy_url + "/v1", api_key="sk-secret")
    stream = await client.chat.completions.create(
        model="gpt-4",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={
            "traceparent": f"00-{TRACE}-{PARENT}-01",
            "x-llmproxy-tenant": "acme",
        },
    )
    assert [chunk async for chunk in stream]
    await client.close()

    spans = await receiver.wait_for(2)
    (server,) = [s for s in spans if s.kind == "SPAN_KIND_SERVER"]
    (span,) = [s for s in spans if s.kind == "SPAN_KIND_CLIENT"]
    assert server.trace_id == span.trace_id == TRACE
    assert server.parent_span_id == PARENT
    assert span.parent_span_id == server.span_id
    assert server.resource["service.name"] == "llmproxy"
    assert server.scope == "llmproxy"

    forwarded = provider.received[-1].headers.getall("traceparent")
    assert forwarded == [f"00-{TRACE}-{span.span_id}-01"]

    assert server.name == "POST /v1"
    assert server.attributes[http_attributes.HTTP_RESPONSE_STATUS_CODE] == 200
    assert server.attributes[url_attributes.URL_PATH] == "/v1/chat/completions"
    assert span.name == "chat gpt-4"
    attrs = span.attributes
    assert attrs[gen_ai.GEN_AI_OPERATION_NAME] == "chat"
    assert attrs[gen_ai.GEN_AI_PROVIDER_NAME] == "openai"
    assert attrs[gen_ai.GEN_AI_REQUEST_MODEL] == "gpt-4"
    assert attrs[gen_ai.GEN_AI_RESPONSE_MODEL] == "gpt-4-0613"
    assert attrs[gen_ai.GEN_AI_USAGE_INPUT_TOKENS] == 12
    assert attrs[gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS] == 5
    assert attrs[gen_ai.GEN_AI_RESPONSE_FINISH_REASONS] == ["stop"]
    assert attrs[gen_ai.GEN_AI_REQUEST_STREAM] is True
    assert 0 < attrs[gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] < 5
    assert attrs[server_attributes.SERVER_ADDRESS] == "127.0.0.1"
    assert attrs[server_attributes.SERVER_PORT] == int(provider.url.rsplit(":", 1)[1])
    assert attrs["llmproxy.tenant"] == "acme"
    assert span.status == "STATUS_CODE_UNSET"
    assert server.start_ns <= span.start_ns <= span.end_ns <= server.end_ns
    assert "sk-secret" not in repr(spans)


async def post_many(url: str, count: int) -> float:
    """POST ``count`` requests one after another; return the seconds taken."""
    async with aiohttp.ClientSession() as session:
        began = time.perf_counter()
        for _ in range(count):
            async with session.post(url, json={"model": "gpt-4"}) as resp:
                assert resp.status == 200
                await resp.read()
        return time.perf_counter() - began


@pytest.mark.parametrize("sickness", ["slow", "503", "absent"])
async def test_sick_collector_never_slows_a_request_socket(
    provider: FakeProvider,
    receiver: OtlpReceiver,
    tracing_env: Callable[[str], Tracer],
    start_traced: StartProxy,
    sickness: str,
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    plain = await start_traced(None)
    baseline = await post_many(plain.proxy_url + "/v1/chat/completions", 20)

    endpoint = receiver.traces_url
    if sickness == "slow":
        receiver.delay = 2.0
    elif sickness == "503":
        receiver.status = 503
    else:
        endpoint = "http://127.0.0.1:1/v1/traces"  # nothing listens on port 1
    traced = await start_traced(tracing_env(endpoint))
    url = traced.proxy_url + "/v1/chat/completions"
    if sickness != "absent":
        # Time the requests while an export is stuck at the collector.
        await post_many(url, 1)
        async with asyncio.timeout(5):
            await receiver.posted.wait()
    elapsed = await post_many(url, 20)

    assert elapsed < baseline + 1.5


async def test_spans_reach_a_grpc_collector_socket(
    provider: FakeProvider,
    tracing_env: TracingEnv,
    start_traced: StartProxy,
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc exports over OTLP/gRPC, for real."""
    receiver = GrpcOtlpReceiver()
    await receiver.start()
    try:
        tracer = tracing_env(receiver.url, "grpc")
        provider.reply(Recording.load("openai/chat_completion"))
        proxy = await start_traced(tracer)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                proxy.proxy_url + "/v1/chat/completions",
                data=b'{"model":"gpt-3.5-turbo"}',
                headers={"traceparent": f"00-{TRACE}-{PARENT}-01"},
            ) as resp:
                assert resp.status == 200
                await resp.read()
        spans = await receiver.wait_for(2)
        kinds = sorted(s.kind for s in spans)
        assert kinds == ["SPAN_KIND_CLIENT", "SPAN_KIND_SERVER"]
        assert {s.trace_id for s in spans} == {TRACE}
        (client,) = [s for s in spans if s.kind == "SPAN_KIND_CLIENT"]
        assert client.attributes[gen_ai.GEN_AI_REQUEST_MODEL] == "gpt-3.5-turbo"
    finally:
        await receiver.stop()
