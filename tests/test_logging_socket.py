"""Logs and captures on real sockets: the facts are there, credentials never are."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import FakeProvider, ProxyFactory, Recording, proxy_config

from llmproxy.telemetry.capture import REDACTED, Redactor, cap
from llmproxy.telemetry.logging import setup_logging


def logging_writer() -> Any:
    from llmproxy.telemetry import logging as log_module

    assert log_module._writer is not None
    return log_module._writer


SECRETS = {
    "Authorization": "Bearer sk-proj-SECRETabcdefghijklmnop1234",
    "x-api-key": "sk-ant-api03-SECRETqrstuvwxyz567890",
    "api-key": "azure-SECRET-0123456789abcdef",
    "OpenAI-Organization": "org-SECRET-ORG",
    "Cookie": "session=SECRET-COOKIE",
}


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    listener = setup_logging("info", stream)
    yield stream
    listener.stop()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines() if line]


async def test_request_line_has_the_facts_and_no_credentials_socket(
    provider: FakeProvider,
    start_proxy: ProxyFactory,
    log_stream: io.StringIO,
    tmp_path: Path,
) -> None:
    raw = proxy_config(provider.url)
    raw["routes"][1]["capture"] = True
    raw["telemetry"] = {
        "capture_path": str(tmp_path / "capture.jsonl"),
        "capture_max_bytes": 400,
    }
    running = await start_proxy(raw)
    provider.reply(Recording.load("openai/chat_completions_stream_include_usage"))
    async with openai.AsyncOpenAI(
        base_url=running.url + "/v1",
        api_key=SECRETS["Authorization"][7:],
        default_headers={
            **SECRETS,
            "x-llmproxy-tenant": "acme",
            "x-llmproxy-prompt-version": "v7",
        },
    ) as client:
        stream = await client.chat.completions.create(
            model="gpt-4",
            stream=True,
            stream_options={"include_usage": True},
            messages=[
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": "mail bob@example.com key sk-live-"
                    "abcdefghijklmnopqrstuv and " + "x" * 1000,
                },
            ],
        )
        async for _ in stream:
            pass
    await running.settle()
    await running.proxy.stop()  # flushes the capture file
    logging_writer().flush()

    # The provider did get the credentials: they pass through untouched.
    assert provider.received[-1].headers["x-api-key"] == SECRETS["x-api-key"]

    records = [r for r in lines(log_stream) if r["event"] == "request"]
    assert len(records) == 1
    rec = records[0]
    assert rec["route"] == "/v1" and rec["status"] == 200
    assert rec["request_model"] == "gpt-4" and rec["response_model"] == "gpt-4-0613"
    assert (rec["input_tokens"], rec["output_tokens"]) == (12, 5)
    assert rec["tenant"] == "acme" and rec["prompt_version"] == "v7"
    assert len(rec["prompt_fingerprint"]) == 12
    assert rec["upstream_request_id"] == "req_c367cf360ee88481fb7cd6c5d45bf9dc"
    assert rec["finish_reasons"] == ["stop"]
    # gpt-4: $30 / $60 per million tokens, as in the metrics
    assert rec["cost_usd"] == pytest.approx((12 * 30 + 5 * 60) / 1e6)
    assert "anomalies" not in rec  # none found: left out like every empty field

    capture_text = (tmp_path / "capture.jsonl").read_text()
    everything = log_stream.getvalue() + capture_text
    assert "SECRET" not in everything
    assert "bob@example.com" not in everything
    assert "sk-live-" not in everything

    captured = orjson.loads(capture_text.splitlines()[0])
    assert captured["event"] == "capture" and captured["model"] == "gpt-4-0613"
    assert "Be brief." in captured["request"]
    assert REDACTED in captured["request"]
    assert "bytes cut]" in captured["request"]  # capped at 400 bytes
    assert captured["completion"] == '"This is a test."'


async def test_capture_is_off_by_default_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    raw = proxy_config(provider.url)
    raw["telemetry"] = {"capture_path": str(tmp_path / "capture.jsonl")}
    running = await start_proxy(raw)
    provider.reply(Recording.load("openai/chat_completion"))
    async with aiohttp.ClientSession() as session:
        async with session.post(running.url + "/v1/chat/completions", data=b"{}") as r:
            await r.read()
    await running.settle()
    await running.proxy.stop()
    assert (tmp_path / "capture.jsonl").read_text() == ""


async def test_attribution_labels_only_when_allowed_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    raw = proxy_config(provider.url)
    raw["telemetry"] = {"labels": ["tenant"], "max_models": 2}
    running = await start_proxy(raw)
    provider.reply(Recording.load("openai/chat_completion"))
    async with aiohttp.ClientSession() as session:
        for tenant in ("a", "b", "c", "d"):
            async with session.post(
                running.url + "/v1/chat/completions",
                data=b"{}",
                headers={
                    "x-llmproxy-tenant": tenant,
                    "x-llmproxy-prompt-version": "v1",
                },
            ) as r:
                await r.read()
        await running.settle()
        async with session.get(running.admin_url + "/metrics") as r:
            text = await r.text()
    assert 'tenant="a"' in text and 'tenant="b"' in text
    assert 'tenant="other"' in text and 'tenant="c"' not in text
    assert "prompt_version" not in text  # not allowed by the operator
    assert 'llmproxy_label_overflow_total{label="tenant"} 2.0' in text


def test_redactor_and_cap() -> None:
    redact = Redactor([r"(?i)password=\S+"])
    text = (
        "token Bearer abc.def-ghi key sk-ant-api03-0123456789abcdefgh "
        "jwt eyJhbGciOi.eyJzdWIiOiIx.SflKxwRJSM card 4111 1111 1111 1111 "
        "password=hunter2 AKIAABCDEFGHIJKLMNOP"
    )
    out = redact(text)
    for secret in ("abc.def", "sk-ant", "eyJ", "4111", "hunter2", "AKIA"):
        assert secret not in out
    assert out.count(REDACTED) == 6
    assert cap("é" * 10, 5) == "éé...[15 bytes cut]"
    assert cap("short", 10) == "short"


def test_capture_route_needs_a_path() -> None:
    from llmproxy.config import build_config
    from llmproxy.errors import ConfigError

    raw = proxy_config("http://127.0.0.1:1")
    raw["routes"][0]["capture"] = True
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    assert info.value.problems == ["routes[0].capture: needs telemetry.capture_path"]


async def test_request_line_has_anomalies_and_no_cost_when_unpriced_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, log_stream: io.StringIO
) -> None:
    running = await start_proxy(proxy_config(provider.url))
    provider.reply(Recording.load("vllm/chat_completions_stream"))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            running.url + "/v1/chat/completions",
            data=b'{"model":"facebook/opt-125m","stream":true}',
        ) as r:
            await r.read()
    await running.settle()
    logging_writer().flush()
    [rec] = [r for r in lines(log_stream) if r["event"] == "request"]
    assert rec["anomalies"] == ["truncated"] and rec["finish_reasons"] == ["length"]
    assert "cost_usd" not in rec  # no price for the model: unknown, not $0


async def test_client_trace_id_is_logged_without_tracing_socket(
    provider: FakeProvider, start_proxy: ProxyFactory, log_stream: io.StringIO
) -> None:
    """With no exporter configured the proxy starts no trace of its own, but the
    client's trace id still reaches the log line, and its traceparent reaches
    the upstream untouched."""
    running = await start_proxy(proxy_config(provider.url))
    assert running.proxy.tracer is None
    provider.reply(Recording.load("openai/chat_completion"))
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = [f"00-{trace}-00f067aa0ba902b7-01", "00-not-a-trace-id-01", None]
    async with aiohttp.ClientSession() as session:
        for value in sent:
            headers = {"traceparent": value} if value else {}
            async with session.post(
                running.url + "/v1/chat/completions", data=b"{}", headers=headers
            ) as r:
                await r.read()
    await running.settle()
    logging_writer().flush()
    logged = [r.get("trace_id") for r in lines(log_stream) if r["event"] == "request"]
    assert logged == [trace, None, None]
    assert [r.headers.get("traceparent") for r in provider.received] == sent
