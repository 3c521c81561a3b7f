"""End to end on real sockets: SDKs and raw clients, proxy, fake provider."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from conftest import FakeProvider, Recording, RunningProxy, split_randomly
from test_tap import EXPECTED, usage


def chat_stream() -> Recording:
    return Recording.load("openai/chat_completions_stream_include_usage")


async def raw_post(
    url: str, body: bytes = b"{}", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes, list[float]]:
    """POST; return status, headers, raw body and each chunk's arrival time."""
    times: list[float] = []
    chunks: list[bytes] = []
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(url, data=body, headers=headers or {}) as resp,
    ):
        async for chunk in resp.content.iter_any():
            times.append(time.perf_counter())
            chunks.append(chunk)
        return resp.status, dict(resp.headers), b"".join(chunks), times


async def test_openai_sdk_stream_same_through_proxy_as_direct_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    rec = chat_stream()
    provider.reply(rec, chunks=split_randomly(rec.body, random.Random(1)))

    async def collect(base_url: str) -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-test")
        stream = await client.chat.completions.create(
            model="gpt-4",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        return [chunk.model_dump_json() async for chunk in stream]

    direct = await collect(provider.url + "/v1")
    through = await collect(proxy.url + "/v1")
    assert through == direct
    assert len(through) > 3

    await proxy.settle()
    ex = proxy.exchanges[-1]
    assert (ex.route, ex.upstream, ex.operation) == ("/v1", "openai", "chat")
    assert ex.request_model == "gpt-4" and ex.response_model == "gpt-4-0613"
    assert ex.stream and ex.terminal and ex.error_type is None
    assert ex.finish_reasons == ["stop"]
    assert ex.t_headers is not None and ex.t_first_token is not None
    assert ex.t_first_byte <= ex.t_first_token <= ex.t_last_byte  # type: ignore[operator]


async def test_raw_bytes_identical_for_every_recording_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    cases = [
        ("openai/chat_completions_stream_include_usage", "/v1/chat/completions"),
        ("openai/responses_stream", "/v1/responses"),
        ("openai/chat_completion", "/v1/chat/completions"),
        ("openai/embeddings.reformatted", "/v1/embeddings"),
        ("anthropic/messages_stream", "/anthropic/v1/messages"),
        ("anthropic/messages_stream_thinking", "/anthropic/v1/messages"),
        ("anthropic/message", "/anthropic/v1/messages"),
        ("vllm/chat_completions_stream", "/v1/chat/completions"),
    ]
    rng = random.Random(7)
    for name, path in cases:
        rec = Recording.load(name)
        provider.reply(rec, chunks=split_randomly(rec.body, rng, 200))
        status, headers, body, _ = await raw_post(proxy.url + path)
        assert status == rec.status, name
        assert body == rec.body, name
        assert headers["Content-Type"] == rec.headers["Content-Type"], name


async def test_gzip_stream_reaches_client_compressed_and_is_read_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    rec = Recording.load(
        "anthropic/messages_stream_tool_use",
        "anthropic/messages_stream_tool_use.sse.gz",
    )
    provider.reply(rec, chunks=split_randomly(rec.body, random.Random(3), 50))
    status, headers, body, _ = await raw_post(
        proxy.url + "/anthropic/v1/messages", headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert body == rec.body
    assert gzip.decompress(body).startswith(b"event: message_start")
    await proxy.settle()
    ex = proxy.exchanges[-1]
    assert ex.parse_error is None
    assert ex.finish_reasons == ["tool_use"] and ex.terminal
    assert ex.output_tokens is not None and ex.input_tokens is not None


async def test_paced_stream_stays_paced_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    rec = chat_stream()
    events = [e + b"\n\n" for e in rec.body.split(b"\n\n") if e]
    provider.reply(rec, chunks=events, pace=0.05)
    _, _, body, times = await raw_post(proxy.url + "/v1/chat/completions")
    assert body == rec.body
    assert len(times) == len(events)  # no coalescing
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.03, gaps


async def test_anthropic_sdk_stream_through_proxy_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    rec = Recording.load("anthropic/messages_stream")
    provider.reply(rec, chunks=split_randomly(rec.body, random.Random(5)))

    async def collect(base_url: str) -> tuple[str, int]:
        client = anthropic.AsyncAnthropic(base_url=base_url, api_key="sk-ant-test")
        async with client.messages.stream(
            model="claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        return text, final.usage.output_tokens

    assert await collect(proxy.url + "/anthropic") == await collect(provider.url)
    await proxy.settle()
    ex = proxy.exchanges[-1]
    assert ex.upstream == "anthropic" and provider.received[-1].path == "/v1/messages"
    assert (ex.input_tokens, ex.output_tokens) == (17, 10)


async def test_unknown_path_is_404_and_never_forwarded_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    for path in ("/admin", "/v10/chat", "/v1/../etc/passwd", "/v1/%2e%2e/x"):
        status, _, body, _ = await raw_post(proxy.url + path)
        assert status == 404, path
        assert b'"no_route"' in body
    assert provider.received == []


async def test_oversize_body_is_413_socket(
    provider: FakeProvider, start_proxy, proxy_config_small
) -> None:
    running = await start_proxy(proxy_config_small)
    status, _, body, _ = await raw_post(
        running.url + "/v1/chat/completions", b"x" * 2048
    )
    assert status == 413 and b'"payload_too_large"' in body
    assert provider.received == []


@pytest.fixture
def proxy_config_small(provider: FakeProvider):
    from conftest import proxy_config

    raw = proxy_config(provider.url)
    raw["server"]["max_body_bytes"] = 1024
    return raw


async def test_invalid_json_body_forwarded_unchanged_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    status, _, _, _ = await raw_post(proxy.url + "/v1/chat/completions", b"{not json")
    assert status == 200
    assert provider.received[-1].body == b"{not json"
    await proxy.settle()
    assert proxy.exchanges[-1].request_model is None


async def test_upstream_refusing_connections_is_502_socket(start_proxy) -> None:
    from conftest import proxy_config

    running = await start_proxy(proxy_config("http://127.0.0.1:1"))
    status, _, body, _ = await raw_post(running.url + "/v1/chat/completions")
    assert status == 502 and b'"connect_error"' in body
    await running.settle()
    assert running.exchanges[-1].error_type == "connect_error"


async def test_upstream_closing_mid_stream_truncates_client_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    async def half_then_close(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chat_stream().body[:900])
        request.transport.close()  # type: ignore[union-attr]
        return resp

    provider.handler = half_then_close
    with pytest.raises(aiohttp.ClientPayloadError):
        await raw_post(proxy.url + "/v1/chat/completions")
    await proxy.settle()
    assert proxy.exchanges[-1].error_type == "stream_truncated"
    # and the proxy keeps serving
    provider.reply(Recording.load("openai/chat_completion"))
    status, _, _, _ = await raw_post(proxy.url + "/v1/chat/completions")
    assert status == 200


async def test_client_vanishing_closes_upstream_and_is_recorded_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    rec = chat_stream()
    events = [e + b"\n\n" for e in rec.body.split(b"\n\n") if e]
    provider.reply(rec, chunks=events, pace=0.2)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + "/v1/chat/completions", data=b"{}")
        await resp.content.readany()
        resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(provider.closed_early.wait(), 2)
    await asyncio.sleep(0.05)
    await proxy.settle()
    ex = proxy.exchanges[-1]
    assert ex.client_disconnected and ex.error_type == "client_disconnect"
    assert ex.response_model == "gpt-4-0613"


@pytest.mark.parametrize(("name", "api", "path", "tokens", "finish", "model"), EXPECTED)
async def test_every_recording_through_the_proxy_bytes_and_usage_socket(
    provider: FakeProvider,
    proxy: RunningProxy,
    name: str,
    api: str,
    path: str,
    tokens: tuple[int | None, ...],
    finish: list[str],
    model: str,
) -> None:
    """Each recording, split at random byte boundaries, reaches the client byte
    for byte, and the proxy reads from it the usage the recording states."""
    gz = name.endswith("_tool_use")
    rec = Recording.load(name, name + ".sse.gz") if gz else Recording.load(name)
    provider.reply(rec, chunks=split_randomly(rec.body, random.Random(name), 97))
    prefix = "/anthropic" if api == "anthropic" else ""
    headers = {"Accept-Encoding": "gzip"} if gz else {}
    status, got, body, _ = await raw_post(proxy.url + prefix + path, headers=headers)
    assert (status, body) == (rec.status, rec.body)
    assert got.get("Content-Encoding") == rec.headers.get("Content-Encoding")

    await proxy.settle()
    ex = proxy.exchanges[-1]
    assert ex.parse_error is None and ex.error_type is None
    assert ex.response_model == model and ex.finish_reasons == finish
    if tokens[0] is not None:
        assert ex.usage_source == "provider"
        assert usage(ex) == tokens


async def test_provider_error_reaches_the_client_unchanged_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    rec = Recording.load("openai/error_404_model_not_found")
    provider.reply(rec)
    status, _, body, _ = await raw_post(proxy.url + "/v1/chat/completions")
    assert (status, body) == (404, rec.body)
    await proxy.settle()
    assert proxy.exchanges[-1].error_type == "upstream_4xx"


async def same_through_proxy(
    provider: FakeProvider,
    direct: Any,
    through: Any,
    cases: list[tuple[str, Callable[[Any], Awaitable[object]]]],
) -> None:
    """Each recording, split at random, reads the same to an SDK client of the
    provider (``direct``) as to one of the proxy (``through``)."""
    for name, call in cases:
        rec = Recording.load(name)
        provider.reply(rec, chunks=split_randomly(rec.body, random.Random(name), 300))
        expected = await call(direct)
        assert expected, name
        assert await call(through) == expected, name


async def test_openai_sdk_unary_embeddings_and_responses_same_as_direct_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    async def chat(client: openai.AsyncOpenAI) -> str:
        reply = await client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}]
        )
        return reply.model_dump_json()

    async def embeddings(client: openai.AsyncOpenAI) -> str:
        reply = await client.embeddings.create(
            model="text-embedding-3-small", input="hi"
        )
        return reply.model_dump_json()

    async def responses(client: openai.AsyncOpenAI) -> list[str]:
        stream = await client.responses.create(
            model="gpt-4o-mini", input="hi", stream=True
        )
        return [event.model_dump_json() async for event in stream]

    cases = [
        ("openai/chat_completion", chat),
        ("openai/embeddings.reformatted", embeddings),
        ("openai/responses_stream", responses),
    ]

    def client(base_url: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="k")

    await same_through_proxy(provider, client(provider.url), client(proxy.url), cases)


async def test_anthropic_sdk_every_event_and_unary_same_as_direct_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    async def events(client: anthropic.AsyncAnthropic) -> list[str]:
        stream = await client.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        return [event.model_dump_json() async for event in stream]

    async def unary(client: anthropic.AsyncAnthropic) -> list[str]:
        reply = await client.messages.create(
            model="claude-3-opus-20240229",
            max_tokens=256,
            messages=[{"role": "user", "content": "hi"}],
        )
        return [reply.model_dump_json()]

    cases = [
        ("anthropic/messages_stream", events),
        ("anthropic/messages_stream_thinking", events),
        ("anthropic/message", unary),
    ]
    await same_through_proxy(
        provider,
        anthropic.AsyncAnthropic(base_url=provider.url, api_key="k"),
        anthropic.AsyncAnthropic(base_url=proxy.url + "/anthropic", api_key="k"),
        cases,
    )
