"""The tap over every recorded provider response, cut at random byte boundaries."""

from __future__ import annotations

import gzip
import random
import zlib

import orjson
import pytest
from conftest import FIXTURES, Recording, split_randomly

from llmproxy.anomalies import anomalies
from llmproxy.dialects import common, dialect_for
from llmproxy.dialects.common import MAX_HELD_CHARS
from llmproxy.exchange import Exchange
from llmproxy.tap import Tap

# name, api, path, expected (input, output, cached, cache_creation, reasoning),
# finish reasons, response model
EXPECTED = [
    (
        "openai/chat_completions_stream_include_usage",
        "openai",
        "/v1/chat/completions",
        (12, 5, 0, None, 0),
        ["stop"],
        "gpt-4-0613",
    ),
    (
        "openai/responses_stream",
        "openai",
        "/v1/responses",
        (22, 6, 0, None, 0),
        ["stop"],
        "gpt-4o-mini-2024-07-18",
    ),
    (
        "openai/chat_completion",
        "openai",
        "/v1/chat/completions",
        (15, 31, 0, None, 0),
        ["stop"],
        "gpt-3.5-turbo-0125",
    ),
    (
        "openai/embeddings.reformatted",
        "openai",
        "/v1/embeddings",
        (6, 0, None, None, None),
        [],
        "text-embedding-3-small",
    ),
    (
        "anthropic/messages_stream",
        "anthropic",
        "/v1/messages",
        (17, 10, 0, 0, None),
        ["end_turn"],
        "claude-sonnet-4-5-20250929",
    ),
    (
        "anthropic/messages_stream_thinking",
        "anthropic",
        "/v1/messages",
        (46, 84, 0, 0, None),
        ["end_turn"],
        "claude-sonnet-4-5-20250929",
    ),
    (
        "anthropic/messages_stream_tool_use",
        "anthropic",
        "/v1/messages",
        (542, 62, 0, 0, None),
        ["tool_use"],
        "claude-haiku-4-5-20251001",
    ),
    (
        "anthropic/message",
        "anthropic",
        "/v1/messages",
        (17, 220, None, None, None),
        ["end_turn"],
        "claude-3-opus-20240229",
    ),
    (
        "vllm/chat_completions_stream",
        "openai",
        "/v1/chat/completions",
        (None, None, None, None, None),
        ["length"],
        "facebook/opt-125m",
    ),
]


def run_tap(
    rec: Recording, api: str, path: str, chunks: list[bytes], complete: bool = True
) -> Exchange:
    ex = Exchange("t", "POST", path)
    ex.status = rec.status
    ex.operation, dialect = dialect_for(api, path)
    tap = Tap(
        ex,
        dialect,
        rec.headers.get("Content-Type", ""),
        rec.headers.get("Content-Encoding", ""),
    )
    for chunk in chunks:
        tap.feed(chunk)
    tap.close(complete)
    return ex


def usage(ex: Exchange) -> tuple[int | None, ...]:
    return (
        ex.input_tokens,
        ex.output_tokens,
        ex.cached_input_tokens,
        ex.cache_creation_input_tokens,
        ex.reasoning_tokens,
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("name", "api", "path", "tokens", "finish", "model"), EXPECTED)
def test_recording_read_at_random_splits(
    name: str,
    api: str,
    path: str,
    tokens: tuple[int | None, ...],
    finish: list[str],
    model: str,
    seed: int,
) -> None:
    rec = Recording.load(name)
    max_piece = [1, 7, 64, 500, len(rec.body)][seed]
    chunks = split_randomly(rec.body, random.Random(seed), max_piece)
    ex = run_tap(rec, api, path, chunks)
    assert usage(ex) == tokens
    assert ex.finish_reasons == finish
    assert ex.response_model == model
    assert ex.error_type is None and ex.parse_error is None
    assert ex.usage_source == ("provider" if tokens[0] is not None else None)


def test_gzip_recording_is_decoded_for_parsing() -> None:
    rec = Recording.load(
        "anthropic/messages_stream_tool_use",
        "anthropic/messages_stream_tool_use.sse.gz",
    )
    assert rec.headers["Content-Encoding"] == "gzip"
    for seed in range(3):
        chunks = split_randomly(rec.body, random.Random(seed), 40)
        ex = run_tap(rec, "anthropic", "/v1/messages", chunks)
        assert usage(ex) == (542, 62, 0, 0, None)
        assert ex.terminal and ex.parse_error is None


def test_deflate_body_is_decoded() -> None:
    rec = Recording.load("openai/chat_completion")
    rec.headers["Content-Encoding"] = "deflate"
    rec.body = zlib.compress(rec.body)
    ex = run_tap(rec, "openai", "/v1/chat/completions", [rec.body])
    assert (ex.input_tokens, ex.output_tokens) == (15, 31)


def test_invalid_gzip_costs_only_telemetry() -> None:
    rec = Recording.load("anthropic/messages_stream")
    rec.headers["Content-Encoding"] = "gzip"
    ex = run_tap(rec, "anthropic", "/v1/messages", [rec.body])
    assert ex.parse_error == "content-encoding does not decode"
    assert ex.input_tokens is None and ex.error_type is None


def test_unreadable_coding_is_noted() -> None:
    rec = Recording.load("anthropic/messages_stream")
    rec.headers["Content-Encoding"] = "br"
    ex = run_tap(rec, "anthropic", "/v1/messages", [rec.body])
    assert ex.parse_error == "unreadable content-encoding 'br'"


@pytest.mark.parametrize(
    ("name", "api", "path"),
    [
        (
            "openai/chat_completions_stream_include_usage",
            "openai",
            "/v1/chat/completions",
        ),
        ("openai/responses_stream", "openai", "/v1/responses"),
        ("anthropic/messages_stream", "anthropic", "/v1/messages"),
    ],
)
def test_stream_without_terminal_event_is_truncated(
    name: str, api: str, path: str
) -> None:
    rec = Recording.load(name)
    cut = rec.body[: len(rec.body) * 2 // 3]
    ex = run_tap(rec, api, path, [cut])
    assert ex.error_type == "stream_truncated"
    assert ex.t_first_token is not None


def test_cumulative_usage_on_every_chunk_is_not_summed() -> None:
    chunk = (
        b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"x"},'
        b'"finish_reason":null}],"usage":{"prompt_tokens":9,"completion_tokens":%d}}\n\n'
    )
    body = b"".join(chunk % n for n in range(1, 6)) + b"data: [DONE]\n\n"
    rec = Recording(
        "x", 200, Recording.load("vllm/chat_completions_stream").headers, body
    )
    ex = run_tap(rec, "openai", "/v1/chat/completions", [body])
    assert (ex.input_tokens, ex.output_tokens) == (9, 5)


def test_anthropic_message_delta_usage_supersedes_start() -> None:
    body = (
        b'event: message_start\ndata: {"type":"message_start",'
        b'"message":{"id":"m","model":"c",'
        b'"usage":{"input_tokens":5,"cache_read_input_tokens":100,'
        b'"cache_creation_input_tokens":20,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"max_tokens"},"usage":{"output_tokens":7}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{},'
        b'"usage":{"output_tokens":12}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    rec = Recording("x", 200, Recording.load("anthropic/messages_stream").headers, body)
    ex = run_tap(rec, "anthropic", "/v1/messages", [body])
    # input per the semconv: uncached + cache read + cache write
    assert usage(ex) == (125, 12, 100, 20, None)
    assert ex.finish_reasons == ["max_tokens"]


@pytest.mark.parametrize(
    ("body", "error_type"),
    [
        (
            b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
            b'"message":"Overloaded"}}\n\n',
            "overloaded",
        ),
        (
            b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error",'
            b'"message":"slow down"}}\n\n',
            "rate_limited",
        ),
    ],
)
def test_anthropic_mid_stream_error_event(body: bytes, error_type: str) -> None:
    start = Recording.load("anthropic/messages_stream").body.split(b"\n\n")[0] + b"\n\n"
    rec = Recording(
        "x", 200, Recording.load("anthropic/messages_stream").headers, start + body
    )
    ex = run_tap(rec, "anthropic", "/v1/messages", [rec.body])
    assert ex.error_type == error_type
    assert ex.input_tokens == 17


def test_openai_mid_stream_error_chunk() -> None:
    first = (
        Recording.load("openai/chat_completions_stream_include_usage").body.split(
            b"\n\n"
        )[1]
        + b"\n\n"
    )
    body = (
        first + b'data: {"error":{"message":"server overloaded","type":"server_error",'
        b'"code":"server_is_overloaded"}}\n\n'
    )
    rec = Recording(
        "x", 200, Recording.load("vllm/chat_completions_stream").headers, body
    )
    ex = run_tap(rec, "openai", "/v1/chat/completions", [body])
    assert ex.error_type == "overloaded"


def test_responses_incomplete_and_failed() -> None:
    headers = Recording.load("openai/responses_stream").headers
    incomplete = (
        b'event: response.incomplete\ndata: {"type":"response.incomplete",'
        b'"response":{"id":"r","model":"m","status":"incomplete",'
        b'"incomplete_details":{"reason":"max_output_tokens"},'
        b'"usage":{"input_tokens":3,"output_tokens":16}}}\n\n'
    )
    ex = run_tap(
        Recording("x", 200, headers, incomplete),
        "openai",
        "/v1/responses",
        [incomplete],
    )
    assert ex.finish_reasons == ["max_output_tokens"] and ex.output_tokens == 16
    assert ex.error_type is None and ex.terminal
    failed = (
        b'event: response.failed\ndata: {"type":"response.failed","response":'
        b'{"id":"r","status":"failed","error":{"code":"server_error",'
        b'"message":"boom"}}}\n\n'
    )
    ex = run_tap(
        Recording("x", 200, headers, failed), "openai", "/v1/responses", [failed]
    )
    assert ex.error_type == "upstream_5xx"


def test_error_body_is_classified() -> None:
    rec = Recording.load("openai/error_404_model_not_found")
    ex = run_tap(rec, "openai", "/v1/chat/completions", [rec.body])
    assert ex.error_type == "upstream_4xx"
    assert ex.error_message is not None and "deprecated" in ex.error_message


def test_malformed_sse_costs_only_telemetry() -> None:
    body = b"data: {not json}\n\ndata: [DONE]\n\n"
    rec = Recording(
        "x", 200, Recording.load("vllm/chat_completions_stream").headers, body
    )
    ex = run_tap(
        rec, "openai", "/v1/chat/completions", split_randomly(body, random.Random(0), 3)
    )
    assert ex.parse_error == "invalid JSON in response"
    assert ex.terminal and ex.error_type is None


def test_event_larger_than_limit_gives_up_parsing() -> None:
    ex = Exchange("t", "POST", "/v1/chat/completions")
    ex.operation, dialect = dialect_for("openai", "/v1/chat/completions")
    tap = Tap(ex, dialect, "text/event-stream", "", max_bytes=1024)
    tap.feed(b"data: " + b"x" * 4096)
    tap.feed(b"\n\ndata: [DONE]\n\n")
    tap.close(True)
    assert ex.parse_error is not None and "max_event_bytes" in ex.parse_error
    assert ex.error_type is None  # cannot judge truncation once parsing gave up


def test_fixture_directory_present() -> None:
    assert (FIXTURES / "SOURCES.md").exists()
    assert (
        gzip.decompress(
            (FIXTURES / "anthropic/messages_stream_tool_use.sse.gz").read_bytes()
        )
        == (FIXTURES / "anthropic/messages_stream_tool_use.sse").read_bytes()
    )


def test_event_over_limit_started_by_a_chunk_that_also_ends_one() -> None:
    ex = Exchange("t", "POST", "/v1/chat/completions")
    ex.operation, dialect = dialect_for("openai", "/v1/chat/completions")
    tap = Tap(ex, dialect, "text/event-stream", "", max_bytes=1024)
    first = (
        b'data: {"id":"c","model":"m","choices":[{"index":0,'
        b'"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    )
    tap.feed(first + b"data: " + b"x" * 5000)
    tap.close(True)
    assert ex.events == 1 and ex.t_first_token is not None
    assert ex.parse_error == "SSE: event exceeds max_event_bytes"
    assert ex.parse_error_kind == "event_too_large"
    assert ex.error_type is None  # not stream_truncated: the stream was not judged


@pytest.mark.parametrize(
    ("content_type", "coding", "chunks", "kind"),
    [
        ("application/json", "", [b"{not json"], "invalid_json"),
        ("text/event-stream", "", [b"data: {not json\n\n"], "invalid_json"),
        ("application/json", "", [b"x" * 2048], "body_too_large"),
        ("application/json", "gzip", [b"not gzip"], "undecodable"),
        ("application/json", "br", [b"{}"], "unsupported_encoding"),
    ],
)
def test_parse_failures_have_a_kind(
    content_type: str, coding: str, chunks: list[bytes], kind: str
) -> None:
    ex = Exchange("t", "POST", "/v1/chat/completions")
    ex.operation, dialect = dialect_for("openai", "/v1/chat/completions")
    tap = Tap(ex, dialect, content_type, coding, max_bytes=1024)
    for chunk in chunks:
        tap.feed(chunk)
    tap.close(True)
    assert ex.parse_error_kind == kind and ex.parse_error is not None


LEGACY_STREAM = b"".join(
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,'
    b'"model":"gpt-3.5-turbo-instruct","choices":[{"text":"%s","index":0,'
    b'"logprobs":null,"finish_reason":%s}]}\n\n' % (text, finish)
    for text, finish in ((b"Hello", b"null"), (b" there", b"null"), (b"", b'"length"'))
) + (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,'
    b'"model":"gpt-3.5-turbo-instruct","choices":[],"usage":{"prompt_tokens":4,'
    b'"completion_tokens":2,"total_tokens":6}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("seed", range(3))
def test_legacy_completions_stream(seed: int) -> None:
    headers = Recording.load("vllm/chat_completions_stream").headers
    rec = Recording("x", 200, headers, LEGACY_STREAM)
    chunks = split_randomly(LEGACY_STREAM, random.Random(seed), [1, 13, 400][seed])
    ex = run_tap(rec, "openai", "/v1/completions", chunks)
    assert ex.operation == "text_completion"
    assert (ex.input_tokens, ex.output_tokens) == (4, 2)
    assert ex.finish_reasons == ["length"] and ex.terminal
    assert ex.response_model == "gpt-3.5-turbo-instruct" and ex.output_seen
    assert ex.error_type is None and ex.parse_error is None


def test_legacy_completions_body() -> None:
    body = (
        b'{"id":"cmpl-2","object":"text_completion","created":1,'
        b'"model":"gpt-3.5-turbo-instruct","choices":[{"text":"4","index":0,'
        b'"logprobs":null,"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}'
    )
    rec = Recording("x", 200, Recording.load("openai/chat_completion").headers, body)
    ex = run_tap(rec, "openai", "/v1/completions", [body])
    assert (ex.input_tokens, ex.output_tokens) == (7, 1)
    assert ex.finish_reasons == ["stop"] and ex.output_seen
    assert ex.response_id == "cmpl-2" and ex.error_type is None


def test_responses_error_event() -> None:
    rec = Recording.load("openai/responses_stream")
    created = rec.body.split(b"\n\n")[0] + b"\n\n"
    assert created.startswith(b"event: response.created")
    error = (
        b'event: error\ndata: {"type":"error","code":"rate_limit_exceeded",'
        b'"message":"Rate limit reached for gpt-4o-mini","param":null,'
        b'"sequence_number":2}\n\n'
    )
    body = created + error
    ex = run_tap(
        Recording("x", 200, rec.headers, body), "openai", "/v1/responses", [body]
    )
    assert ex.error_type == "rate_limited" and ex.terminal
    assert ex.error_message == "Rate limit reached for gpt-4o-mini"
    assert ex.response_model == "gpt-4o-mini-2024-07-18"
    assert ex.parse_error is None


def delta_event(text: str) -> bytes:
    obj = {
        "id": "c",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def test_held_answer_text_is_capped() -> None:
    ex = Exchange("t", "POST", "/v1/chat/completions")
    ex.operation, dialect = dialect_for("openai", "/v1/chat/completions")
    ex.status, ex.wants_json, ex.capture = 200, True, True
    tap = Tap(ex, dialect, "text/event-stream", "")
    piece = "x" * 65536  # not JSON: judged whole, it would be invalid_json
    for _ in range(MAX_HELD_CHARS // len(piece) + 8):
        tap.feed(delta_event(piece))
    tap.feed(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    tap.feed(b"data: [DONE]\n\n")
    tap.close(True)
    assert ex.output_capped and ex.parse_error is None and ex.error_type is None
    assert sum(len(p) for p in ex.output_parts) <= MAX_HELD_CHARS
    assert ex.finish_reasons == ["stop"]
    assert anomalies(ex) == []  # skipped, not reported as invalid
    assert ex.as_log()["output_capped"] is True


def test_held_tool_arguments_share_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "MAX_HELD_CHARS", 10)
    ex = Exchange("t", "POST", "/v1/messages")
    ex.operation, dialect = dialect_for("anthropic", "/v1/messages")
    ex.status, ex.wants_tools, ex.capture = 200, True, True
    for partial in ('{"city":', ' "Par', 'is"}'):
        data = orjson.dumps(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": partial},
            }
        )
        dialect.stream_event(ex, "content_block_delta", data)
    assert ex.output_capped and "".join(ex.tool_args[1]) == '{"city":'
    assert "invalid_tool_arguments" not in anomalies(ex)
