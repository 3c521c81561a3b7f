"""Metrics end to end: known traffic through the proxy, then the exact exposition."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from typing import Any

import aiohttp
import anthropic
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
    split_randomly,
)
from prometheus_client.parser import text_string_to_metric_families

USAGE_STREAM = "openai/chat_completions_stream_include_usage"


def without_usage(body: bytes) -> bytes:
    """The stream the provider sends when usage was not asked for."""
    events = [e for e in body.split(b"\n\n") if e]
    kept = [e for e in events if not (b'"choices":[]' in e and b'"usage":{' in e)]
    return b"".join(e.replace(b',"usage":null', b"") + b"\n\n" for e in kept)


async def scrape(
    running: RunningProxy,
) -> tuple[str, dict[tuple[str, frozenset[Any]], float]]:
    await running.settle()
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.admin_url + "/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(
    samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str
) -> float:
    """The sum of samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def usage_aware(stream_rec: Recording) -> Any:
    """A provider handler that streams usage only when it was asked for."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        asked = (body.get("stream_options") or {}).get("include_usage") is True
        data = stream_rec.body if asked else without_usage(stream_rec.body)
        resp = web.StreamResponse(headers=stream_rec.headers)
        await resp.prepare(request)
        for piece in split_randomly(data, random.Random(len(data)), 90):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    return handle


@pytest.fixture
async def metered(provider: FakeProvider, start_proxy: ProxyFactory) -> RunningProxy:
    raw = proxy_config(provider.url)
    raw["upstreams"]["vllm"] = {
        "url": provider.url,
        "api": "openai",
        "provider": "vllm",
        "inject_stream_usage": False,
        "health": {"path": "off"},
    }
    raw["routes"].append({"prefix": "/vllm", "upstream": "vllm", "strip_prefix": True})
    raw["telemetry"] = {"max_models": 4}
    return await start_proxy(raw)


async def openai_stream(base_url: str, usage: bool, model: str = "gpt-4") -> bytes:
    """Stream through the SDK; returns nothing useful, the metrics are the point."""
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="sk-test", max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            **extra,
        )
        return b"".join([c.model_dump_json().encode() async for c in stream])


async def test_known_traffic_gives_exact_metrics_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    rec = Recording.load(USAGE_STREAM)
    provider.handler = usage_aware(rec)
    await openai_stream(metered.url + "/v1", usage=True)  # provider usage
    await openai_stream(metered.url + "/v1", usage=False)  # injected usage

    anthropic_rec = Recording.load("anthropic/messages_stream")
    events = [e + b"\n\n" for e in anthropic_rec.body.split(b"\n\n") if e]
    provider.reply(anthropic_rec, chunks=events, pace=0.01)
    async with (
        anthropic.AsyncAnthropic(base_url=metered.url + "/anthropic", api_key="k") as c,
        c.messages.stream(
            model="claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream,
    ):
        await stream.get_final_message()

    provider.reply(Recording.load("vllm/chat_completions_stream"))
    await openai_stream(metered.url + "/vllm/v1", usage=False, model="opt")

    _, m = await scrape(metered)
    tok = "llmproxy_tokens_total"
    assert value(m, tok, route="/v1", type="input", usage_source="provider") == 12
    assert value(m, tok, route="/v1", type="output", usage_source="provider") == 5
    assert value(m, tok, route="/v1", type="input", usage_source="injected") == 12
    assert value(m, tok, route="/v1", type="output", usage_source="injected") == 5
    assert value(m, tok, route="/anthropic", type="input") == 17
    assert value(m, tok, route="/anthropic", type="output") == 10
    assert value(m, tok, route="/anthropic", type="cached_input") == 0
    assert value(m, tok, route="/vllm", usage_source="estimated", type="output") > 0
    assert value(m, tok, route="/vllm", usage_source="estimated", type="input") > 0
    assert value(m, "llmproxy_usage_missing_total", route="/vllm") == 1
    assert value(m, "llmproxy_usage_missing_total", route="/v1") == 0

    # gpt-4: $30 / $60 per million; claude-sonnet-4-5: $3 / $15 per million
    assert value(m, "llmproxy_cost_usd_total", route="/v1") == pytest.approx(
        2 * (12 * 30 + 5 * 60) / 1e6
    )
    assert value(m, "llmproxy_cost_usd_total", route="/anthropic") == pytest.approx(
        (17 * 3 + 10 * 15) / 1e6
    )
    assert value(m, "llmproxy_unpriced_requests_total", route="/vllm") == 1

    assert (
        value(
            m,
            "llmproxy_requests_total",
            route="/v1",
            status_class="2xx",
            stream="true",
            model="gpt-4",
        )
        == 2
    )
    assert (
        value(m, "llmproxy_response_anomalies_total", route="/vllm", kind="truncated")
        == 1
    )
    assert (
        value(
            m,
            "gen_ai_client_token_usage_count",
            gen_ai_token_type="input",
            gen_ai_provider_name="anthropic",
        )
        == 1
    )
    assert (
        value(
            m,
            "gen_ai_client_token_usage_sum",
            gen_ai_token_type="output",
            route="/v1",
            gen_ai_response_model="gpt-4-0613",
        )
        == 10
    )
    assert (
        value(
            m,
            "gen_ai_client_operation_duration_seconds_count",
            gen_ai_operation_name="chat",
        )
        == 4
    )
    assert (
        value(
            m, "gen_ai_client_operation_time_to_first_chunk_seconds_count", route="/v1"
        )
        == 2
    )
    assert (
        value(
            m,
            "gen_ai_client_operation_time_per_output_chunk_seconds_count",
            route="/anthropic",
        )
        >= 1
    )
    assert value(m, "llmproxy_time_to_first_token_seconds_count", route="/v1") == 2
    assert value(m, "llmproxy_overhead_seconds_count", route="/v1") == 2
    assert (
        value(m, "llmproxy_time_to_response_headers_seconds_count", upstream="openai")
        == 2
    )


async def test_injected_usage_is_invisible_to_the_client_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    rec = Recording.load(USAGE_STREAM)
    provider.handler = usage_aware(rec)
    body = b'{"model":"gpt-4","stream":true,"messages":[]}'
    async with aiohttp.ClientSession() as session:
        async with session.post(provider.url + "/v1/chat/completions", data=body) as r:
            direct = await r.read()
        async with session.post(metered.url + "/v1/chat/completions", data=body) as r:
            through = await r.read()
    assert direct == without_usage(rec.body)
    assert through == direct
    sent = orjson.loads(provider.received[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    await metered.settle()
    ex = metered.exchanges[-1]
    assert ex.usage_injected and (ex.input_tokens, ex.output_tokens) == (12, 5)


async def test_server_rejecting_stream_options_gets_the_original_request_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    rec = Recording.load("vllm/chat_completions_stream")

    async def strict(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if "stream_options" in body:
            return web.json_response(
                {"error": {"message": "unknown field"}}, status=400
            )
        return web.Response(body=rec.body, headers=rec.headers)

    provider.handler = strict
    body = b'{"model":"m","stream":true,"messages":[]}'
    for _ in range(2):
        async with (
            aiohttp.ClientSession() as session,
            session.post(metered.url + "/v1/chat/completions", data=body) as r,
        ):
            assert r.status == 200
            assert await r.read() == rec.body
    # The second request was not injected: the upstream is known to refuse.
    assert [orjson.loads(r.body).get("stream_options") for r in provider.received] == [
        {"include_usage": True},
        None,
        None,
    ]


async def test_rate_limit_headers_and_errors_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    anthropic_rec = Recording.load(
        "anthropic/messages_stream_tool_use", "anthropic/messages_stream_tool_use.sse"
    )
    provider.reply(anthropic_rec)
    async with (
        aiohttp.ClientSession() as session,
        session.post(metered.url + "/anthropic/v1/messages", data=b"{}") as r,
    ):
        await r.read()

    async def limited(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "code": "rate_limit_exceeded",
                }
            },
            status=429,
            headers={
                "x-ratelimit-limit-requests": "10000",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "6m0s",
                "x-ratelimit-limit-tokens": "-1",
                "retry-after": "20",
            },
        )

    provider.handler = limited
    async with openai.AsyncOpenAI(
        base_url=metered.url + "/v1", api_key="k", max_retries=0
    ) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=[])

    _, m = await scrape(metered)
    assert (
        value(m, "llmproxy_ratelimit_remaining", upstream="openai", resource="requests")
        == 0
    )
    assert (
        value(m, "llmproxy_ratelimit_limit", upstream="openai", resource="requests")
        == 10000
    )
    assert (
        value(
            m,
            "llmproxy_ratelimit_reset_seconds",
            upstream="openai",
            resource="requests",
        )
        == 360
    )
    # a negative limit is unknown, not a value
    assert (
        "llmproxy_ratelimit_limit",
        frozenset({"upstream": "openai", "resource": "tokens"}.items()),
    ) not in m
    assert value(m, "llmproxy_ratelimit_retry_after_seconds", upstream="openai") == 20
    assert (
        value(m, "llmproxy_errors_total", upstream="openai", error_type="rate_limited")
        == 1
    )
    assert (
        value(
            m, "llmproxy_ratelimit_limit", upstream="anthropic", resource="input_tokens"
        )
        == 4000000
    )
    assert (
        value(
            m,
            "llmproxy_ratelimit_remaining",
            upstream="anthropic",
            resource="output_tokens",
        )
        == 800000
    )


async def test_labels_stay_bounded_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    async with aiohttp.ClientSession() as session:
        for i in range(30):
            async with session.get(metered.url + f"/scan/{i}/wp-login.php") as r:
                assert r.status == 404
        for i in range(8):
            body = orjson.dumps({"model": f"model-{i}", "messages": []})
            async with session.post(
                metered.url + "/v1/chat/completions", data=body
            ) as r:
                assert r.status == 200
    _, m = await scrape(metered)
    models = {dict(ls).get("model") for (n, ls) in m if n == "llmproxy_requests_total"}
    # The cap of 4 counts response models too: gpt-3.5-turbo-0125 took a place.
    assert models == {"", "model-0", "model-1", "model-2", "other"}
    assert value(m, "llmproxy_label_overflow_total", label="model") >= 4
    assert value(m, "llmproxy_errors_total", error_type="no_route") == 30
    paths = [ls for (n, ls) in m if "scan" in str(ls) or "wp-login" in str(ls)]
    assert paths == []


async def test_disconnect_at_last_byte_is_still_counted_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    rec = Recording.load(USAGE_STREAM)
    provider.reply(rec, chunks=[rec.body[:-14], rec.body[-14:]], pace=0.2)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(metered.url + "/v1/chat/completions", data=b"{}")
        while len(await resp.content.read(1)) and not resp.content.is_eof():
            if resp.content.total_bytes >= len(rec.body) - 14:
                break
        resp.close()
    await provider.closed_early.wait()
    _, m = await scrape(metered)
    assert value(m, "llmproxy_errors_total", error_type="client_disconnect") == 1
    assert value(m, "llmproxy_tokens_total", route="/v1", type="output") == 5


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
async def test_exposition_passes_promtool_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    provider.reply(Recording.load(USAGE_STREAM))
    await openai_stream(metered.url + "/v1", usage=True)
    text, _ = await scrape(metered)
    result = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        check=False,
    )
    # promtool lints naming; it must find nothing to complain about.
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_spans_dropped_when_the_export_queue_is_full_socket(
    provider: FakeProvider,
) -> None:
    import threading

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from llmproxy.app import Proxy
    from llmproxy.config import build_config
    from llmproxy.telemetry.tracing import Tracer

    release = threading.Event()

    class Stuck(SpanExporter):
        """A collector that never answers until the test ends."""

        def export(self, spans: Any) -> SpanExportResult:
            release.wait(10)
            return SpanExportResult.SUCCESS

    # A queue of two spans and a stuck exporter: the queue stays full.
    tracer = Tracer(Stuck(), max_queue_size=2, schedule_delay=0.01)
    proxy = Proxy(build_config(proxy_config(provider.url)), tracer=tracer)
    await proxy.start()
    try:
        provider.reply(Recording.load("openai/chat_completion"))
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(
                    proxy.proxy_url + "/v1/chat/completions", data=b"{}"
                ) as r:
                    assert r.status == 200
            proxy.recorder.flush()
            async with session.get(proxy.admin_url + "/metrics") as r:
                text = await r.text()
    finally:
        release.set()
        await proxy.stop()
    # Each request makes a SERVER and a CLIENT span: 6 spans, at most 4 queued
    # (2 taken by the stuck export, 2 waiting), so at least 2 were dropped.
    assert tracer.dropped >= 2
    assert f"llmproxy_spans_dropped_total {float(tracer.dropped)}" in text


def completion(content: str | None, finish: str = "stop", **message: Any) -> bytes:
    """A non-streamed chat completion with one choice."""
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, **message},
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
    )


ANSWERS = {
    "filtered": completion("partial", "content_filter"),
    "refused": completion(None, refusal="I can't help with that."),
    "empty": completion(""),
    "not_json": completion("Sure! {not json"),
    "bad_tool": completion(
        None,
        "tool_calls",
        tool_calls=[
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Par'},
            }
        ],
    ),
}


async def test_anomaly_kinds_are_counted_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    async def answer(request: web.Request) -> web.Response:
        asked = orjson.loads(await request.read())
        body = ANSWERS[asked["messages"][0]["content"]]
        return web.Response(body=body, content_type="application/json")

    provider.handler = answer
    json_format = {"response_format": {"type": "json_object"}}
    tools = {"tools": [{"type": "function", "function": {"name": "weather"}}]}
    extra = {"not_json": json_format, "bad_tool": tools}
    async with aiohttp.ClientSession() as session:
        for name in ANSWERS:
            request = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": name}],
                **extra.get(name, {}),
            }
            async with session.post(
                metered.url + "/v1/chat/completions", data=orjson.dumps(request)
            ) as r:
                assert r.status == 200 and await r.read() == ANSWERS[name]

    _, m = await scrape(metered)
    counted = {
        dict(ls)["kind"]: v
        for (n, ls), v in m.items()
        if n == "llmproxy_response_anomalies_total"
    }
    assert counted == {
        "content_filter": 1,
        "refusal": 1,
        "empty": 1,
        "invalid_json": 1,
        "invalid_tool_arguments": 1,
    }
    assert [ex.anomalies for ex in metered.exchanges] == [
        ["content_filter"],
        ["refusal"],
        ["empty"],
        ["invalid_json"],
        ["invalid_tool_arguments"],
    ]


STREAM_START = (
    b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"a"},'
    b'"finish_reason":null}]}\n\n'
)


async def test_parse_failures_are_counted_socket(
    provider: FakeProvider, metered: RunningProxy
) -> None:
    huge = b'data: {"choices":[{"delta":{"content":"' + b"x" * (3 << 20) + b'"}}]}\n\n'
    bodies = [
        (b"{not json", "application/json"),
        (STREAM_START + huge + b"data: [DONE]\n\n", "text/event-stream"),
    ]

    async def answer(request: web.Request) -> web.Response:
        body, content_type = bodies[len(provider.received) - 1]
        return web.Response(body=body, content_type=content_type)

    provider.handler = answer
    async with aiohttp.ClientSession() as session:
        for body, _ in bodies:
            async with session.post(
                metered.url + "/v1/chat/completions", data=b'{"model":"gpt-4"}'
            ) as r:
                assert r.status == 200 and await r.read() == body  # passed through

    _, m = await scrape(metered)
    errors = "llmproxy_parse_errors_total"
    assert value(m, errors, route="/v1", upstream="openai", kind="invalid_json") == 1
    assert value(m, errors, route="/v1", kind="event_too_large") == 1
    assert sum(v for (n, _), v in m.items() if n == errors) == 2
    stream = metered.exchanges[-1]
    assert stream.parse_error == "SSE: event exceeds max_event_bytes"
    assert stream.error_type is None  # the unread stream is not called truncated
