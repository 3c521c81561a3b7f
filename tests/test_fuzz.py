"""Fuzzing: arbitrary bytes, splits and documents at every reader of untrusted input.

Property tests throw arbitrary and half-valid input at the response tap (SSE
reader, content decoding, the dialects' usage extractors), the usage stripper
and the config loader: nothing but the documented ``ConfigError`` escapes, a
failed parse is noted on the exchange, and no reader holds more than its bound
for a line that never ends. One property runs on real sockets: whatever the
provider sends, in whatever pieces, the client receives byte for byte.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import os
import re
import tempfile
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Coroutine, Iterator
from itertools import pairwise, zip_longest
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import FakeProvider, Recording, proxy_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from llmproxy.app import Proxy
from llmproxy.config import Config, build_config, load_config
from llmproxy.dialects import dialect_for
from llmproxy.errors import ERROR_TYPES, ConfigError
from llmproxy.exchange import TOKEN_FIELDS, Exchange
from llmproxy.injection import _NULL_USAGE, MAX_PENDING, UsageStripper
from llmproxy.sse import DEFAULT_MAX_EVENT_BYTES, SSEReader
from llmproxy.tap import Tap

FAST = settings(max_examples=300, deadline=None)
T = TypeVar("T")

# --- input strategies ------------------------------------------------------------

_RECORDED = [
    Recording.load(name).body
    for name in (
        "openai/chat_completions_stream_include_usage",
        "openai/responses_stream",
        "anthropic/messages_stream_thinking",
        "vllm/chat_completions_stream",
    )
]
# Whole lines of real streams, so that the readers get past their cheap scans.
_REAL_LINES = sorted(
    {line + b"\n" for body in _RECORDED for line in body.split(b"\n") if line}
)
_FRAGMENTS = [
    b"data: ",
    b"event: ",
    b"event: message_start\n",
    b"event: message_delta\n",
    b"event: error\n",
    b"event: response.completed\n",
    b"data: [DONE]\n",
    b": ping\n",
    b"\n",
    b"\r\n",
    b"\r",
    b"\n\n",
    b'{"usage":{"prompt_tokens":',
    b'"usage":null,',
    b'"choices":[]',
    b'"finish_reason":"stop"',
    b'{"error":{"type":"overloaded_error"}}',
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"{",
    b"}",
]
stream_bytes = st.lists(
    st.one_of(
        st.binary(max_size=48),
        st.sampled_from(_FRAGMENTS),
        st.sampled_from(_REAL_LINES),
    ),
    max_size=40,
).map(b"".join)

_KEYS = [
    "usage", "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
    "cache_read_input_tokens", "cache_creation_input_tokens", "prompt_tokens_details",
    "completion_tokens_details", "cached_tokens", "reasoning_tokens", "choices",
    "delta", "content", "text", "refusal", "tool_calls", "function", "arguments",
    "index", "finish_reason", "stop_reason", "model", "id", "object", "message",
    "error", "type", "response", "status", "output", "incomplete_details", "reason",
]  # fmt: skip
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["stop", "response", "text_delta", "failed", "incomplete"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(_KEYS) | st.text(max_size=6), inner, max_size=5
        )
    ),
    max_leaves=30,
)
_EVENT_NAMES = [
    "message", "message_start", "message_delta", "message_stop",
    "content_block_delta", "error", "response.created", "response.completed",
    "response.incomplete", "response.failed", "response.output_text.delta",
]  # fmt: skip
# (api, path): every dialect and operation the tap reads.
_ENDPOINTS = [
    ("openai", "/v1/chat/completions"),
    ("openai", "/v1/completions"),
    ("openai", "/v1/responses"),
    ("openai", "/v1/embeddings"),
    ("anthropic", "/v1/messages"),
]


def split_at(blob: bytes, data: st.DataObject) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=16)))
    return [blob[a:b] for a, b in pairwise([0, *cuts, len(blob)])]


def exchange_for(api: str, path: str, capture: bool = False) -> Exchange:
    ex = Exchange("fuzz", "POST", path)
    ex.operation, _ = dialect_for(api, path)
    ex.capture = capture
    ex.status = 200
    return ex


def assert_sane(ex: Exchange) -> None:
    """The record stays well typed whatever the response said."""
    for _, attr in TOKEN_FIELDS:
        value = getattr(ex, attr)
        assert value is None or (type(value) is int), (attr, value)
    assert ex.error_type is None or ex.error_type in ERROR_TYPES
    assert ex.parse_error is None or isinstance(ex.parse_error, str)
    assert all(isinstance(r, str) for r in ex.finish_reasons)
    assert ex.response_model is None or isinstance(ex.response_model, str)


# --- the tap and the dialects ----------------------------------------------------


@FAST
@given(
    body=stream_bytes,
    endpoint=st.sampled_from(_ENDPOINTS),
    content_type=st.sampled_from(["text/event-stream", "application/json", ""]),
    coding=st.sampled_from(["", "gzip", "deflate", "gzip-garbage", "br"]),
    capture=st.booleans(),
    complete=st.booleans(),
    data=st.data(),
)
def test_tap_never_raises_at_any_split(
    body: bytes,
    endpoint: tuple[str, str],
    content_type: str,
    coding: str,
    capture: bool,
    complete: bool,
    data: st.DataObject,
) -> None:
    api, path = endpoint
    sent = body
    if coding == "gzip":
        sent = gzip.compress(body)
    elif coding == "deflate":
        sent = zlib.compress(body)
    elif coding == "gzip-garbage":
        sent, coding = b"\x1f\x8b\x08" + body, "gzip"
    ex = exchange_for(api, path, capture)
    _, dialect = dialect_for(api, path)
    tap = Tap(ex, dialect if ex.operation else None, content_type, coding)

    for chunk in split_at(sent, data):
        tap.feed(chunk)
    tap.close(complete)

    assert_sane(ex)
    if coding == "br" and ex.operation:
        assert ex.parse_error == "unreadable content-encoding 'br'"


@FAST
@given(
    endpoint=st.sampled_from(_ENDPOINTS),
    events=st.lists(st.tuples(st.sampled_from(_EVENT_NAMES), json_values), max_size=8),
    final=json_values,
    status=st.sampled_from([200, 400, 401, 429, 500, 529]),
    capture=st.booleans(),
)
def test_usage_extractors_accept_any_json(
    endpoint: tuple[str, str],
    events: list[tuple[str, Any]],
    final: Any,
    status: int,
    capture: bool,
) -> None:
    api, path = endpoint
    _, dialect = dialect_for(api, path)

    streamed = exchange_for(api, path, capture)
    for name, value in events:
        dialect.stream_event(streamed, name, orjson.dumps(value))
    dialect.end_stream(streamed)
    assert_sane(streamed)

    whole = exchange_for(api, path, capture)
    whole.status = status
    dialect.body(whole, orjson.dumps(final))
    assert_sane(whole)


@FAST
@given(
    endpoint=st.sampled_from(_ENDPOINTS),
    garbage=st.binary(min_size=1, max_size=40).filter(
        lambda b: not _is_json(b) and b != b"[DONE]"
    ),
)
def test_parse_failures_are_noted_never_raised(
    endpoint: tuple[str, str], garbage: bytes
) -> None:
    api, path = endpoint
    _, dialect = dialect_for(api, path)
    # The first event of each dialect is always parsed: a failure must show.
    name = {"anthropic": "message_start"}.get(api, "response.created")
    name = "message" if path.endswith("completions") else name
    ex = exchange_for(api, path)
    dialect.stream_event(ex, name, garbage)
    dialect.end_stream(ex)
    assert ex.parse_error == "invalid JSON in response"
    assert ex.error_type == "stream_truncated"  # and no terminal event was seen

    ex = exchange_for(api, path)
    dialect.body(ex, garbage)
    assert ex.parse_error == "invalid JSON in response"
    assert ex.error_type == "malformed_response"


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def test_recorded_streams_parse_without_error_at_any_split() -> None:
    """The control for the properties above: real streams do parse."""
    for body, (api, path) in zip(
        _RECORDED,
        [_ENDPOINTS[0], _ENDPOINTS[2], _ENDPOINTS[4], _ENDPOINTS[0]],
        strict=True,
    ):
        ex = exchange_for(api, path)
        tap = Tap(ex, dialect_for(api, path)[1], "text/event-stream", "")
        for i in range(0, len(body), 7):
            tap.feed(body[i : i + 7])
        tap.close(True)
        assert ex.parse_error is None and ex.error_type is None, path
        assert ex.terminal and ex.finish_reasons and ex.response_model


# --- the usage stripper ----------------------------------------------------------


@FAST
@given(body=stream_bytes, data=st.data())
def test_stripper_passes_streams_without_usage_unchanged(
    body: bytes, data: st.DataObject
) -> None:
    body = body.replace(b'"usage"', b'"usagE"')
    stripper = UsageStripper()
    out = [stripper.feed(chunk) for chunk in split_at(body, data)]
    assert b"".join(out) + stripper.flush() == body


@FAST
@given(body=stream_bytes, data=st.data())
def test_stripper_only_ever_removes_bytes(body: bytes, data: st.DataObject) -> None:
    stripper = UsageStripper()
    out = b"".join(stripper.feed(chunk) for chunk in split_at(body, data))
    out += stripper.flush()
    assert len(out) <= len(body)


def test_stripper_removes_what_injection_added_at_any_split() -> None:
    body = Recording.load("openai/chat_completions_stream_include_usage").body
    expected = UsageStripper()
    whole = expected.feed(body) + expected.flush()
    assert b'"usage"' not in whole
    # The usage-only chunk is gone, every other event stays.
    assert whole.count(b"\n\n") == body.count(b"\n\n") - 1
    for size in (1, 2, 3, 5, 64):
        stripper = UsageStripper()
        out = b"".join(
            stripper.feed(body[i : i + size]) for i in range(0, len(body), size)
        )
        assert out + stripper.flush() == whole, size


def strip_each_event(events: bytes) -> bytes:
    """The stripper's rule applied event by event: the reference for its one-pass
    form."""
    out = []
    parts = re.split(rb"(\r\n\r\n|\n\n|\r\r)", events)
    for text, end in zip_longest(parts[::2], parts[1::2], fillvalue=b""):
        event = text + end
        if b'"choices":[]' in event and b'"usage":{' in event:
            continue
        out.append(_NULL_USAGE.sub(b"", event))
    return b"".join(out)


EVENT_PIECES = st.sampled_from(
    [
        b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}',
        b'data: {"usage":null,"id":"c","choices":[{"delta":{}}]}',
        b'data: {"id":"c","choices":[{"delta":{"content":"\\"usage\\":null"}}]}',
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3}}',
        b'data: {"usage" : null , "id":1,"usage":null,"usage":null}',
        b'data: {"a":1 ,"usage":null}',
        b"data: [DONE]",
        b": ping",
        b"event: x\ndata: {}",
    ]
)


@FAST
@given(
    st.lists(
        st.tuples(EVENT_PIECES, st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r"])),
        max_size=12,
    )
)
def test_stripper_one_pass_equals_event_by_event(
    events: list[tuple[bytes, bytes]],
) -> None:
    block = b"".join(text + end for text, end in events)
    assert UsageStripper._strip(block) == strip_each_event(block)


# --- a line that never ends ------------------------------------------------------

ENDLESS_CHUNK = b"x" * 65536
ENDLESS_TOTAL = 24 * 1024 * 1024
BOUND = 3 * DEFAULT_MAX_EVENT_BYTES + 2 * len(ENDLESS_CHUNK)


def peak_while(feed: Callable[[bytes], object], chunks: Iterator[bytes]) -> int:
    """The most memory Python allocated while ``feed`` took every chunk."""
    tracemalloc.start()
    try:
        for chunk in chunks:
            feed(chunk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def endless(prefix: bytes = b"data: ") -> Iterator[bytes]:
    yield prefix
    for _ in range(ENDLESS_TOTAL // len(ENDLESS_CHUNK)):
        yield ENDLESS_CHUNK


@pytest.mark.parametrize(
    "content_type", ["text/event-stream", "application/json", "text/plain"]
)
def test_an_endless_line_costs_bounded_memory_in_the_tap(content_type: str) -> None:
    ex = exchange_for("openai", "/v1/chat/completions")
    tap = Tap(ex, dialect_for("openai", ex.path)[1], content_type, "")
    assert peak_while(tap.feed, endless()) < BOUND
    tap.close(True)
    if content_type == "text/event-stream":
        assert ex.parse_error == "SSE: event exceeds max_event_bytes"
    else:
        assert ex.parse_error == "response body larger than the parse limit"


def test_an_endless_line_costs_bounded_memory_in_the_reader() -> None:
    reader = SSEReader()
    assert peak_while(reader.feed, endless()) < BOUND
    assert reader.failed is not None and reader._buf == b""


def test_an_endless_event_costs_bounded_memory_in_the_stripper() -> None:
    stripper = UsageStripper()
    passed: list[int] = []
    assert peak_while(lambda c: passed.append(len(stripper.feed(c))), endless()) < (
        BOUND
    )
    # Held up to the bound, then everything passed on unedited.
    assert sum(passed) + len(stripper.flush()) == ENDLESS_TOTAL + len(b"data: ")
    assert max(passed) <= MAX_PENDING + len(ENDLESS_CHUNK)


def test_a_decompression_bomb_costs_bounded_memory() -> None:
    bomb = gzip.compress(b"data: " + b"\x00" * (64 * 1024 * 1024), 9)
    for content_type in ("text/event-stream", "application/json"):
        ex = exchange_for("anthropic", "/v1/messages")
        tap = Tap(ex, dialect_for("anthropic", ex.path)[1], content_type, "gzip")
        pieces = (bomb[i : i + 4096] for i in range(0, len(bomb), 4096))
        assert peak_while(tap.feed, pieces) < BOUND
        tap.close(True)
        assert ex.parse_error is not None, content_type


# --- relayed bytes on real sockets -----------------------------------------------


class Relay:
    """A fake provider and the proxy on an event loop of their own thread.

    Hypothesis drives examples synchronously; each one is a real request
    through real sockets, run on this loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.exchanges: list[Exchange] = []
        self.recorded = asyncio.Event()
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        self.provider = FakeProvider()
        self.runner = web.ServerRunner(web.Server(self.provider.handle))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.provider.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        raw = proxy_config(self.provider.url)
        for upstream in raw["upstreams"].values():
            # Most fuzzed streams end without their terminal event, which counts
            # against the breaker; these tests are not about the breaker.
            upstream["breaker"] = {"failures": 10**9}
        self.proxy = Proxy(build_config(raw), sinks=[self._record])
        await self.proxy.start()
        self.session = aiohttp.ClientSession(auto_decompress=False)

    def _record(self, ex: Exchange) -> None:
        self.exchanges.append(ex)
        self.recorded.set()

    async def post(self, path: str, request: bytes) -> tuple[bytes, Exchange]:
        """The body the client received, and the proxy's record of the exchange."""
        self.recorded.clear()
        async with self.session.post(self.proxy.proxy_url + path, data=request) as r:
            body = await r.read()
        await asyncio.wait_for(self.recorded.wait(), 5)
        return body, self.exchanges[-1]

    def close(self) -> None:
        async def stop() -> None:
            await self.session.close()
            await self.proxy.stop()
            await self.runner.cleanup()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    running = Relay()
    yield running
    running.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=stream_bytes,
    endpoint=st.sampled_from([*_ENDPOINTS, ("openai", "/v1/models")]),
    content_type=st.sampled_from(["text/event-stream", "application/json"]),
    asks_usage=st.booleans(),
    data=st.data(),
)
def test_relayed_bytes_are_identical_whatever_the_provider_sends_socket(
    relay: Relay,
    body: bytes,
    endpoint: tuple[str, str],
    content_type: str,
    asks_usage: bool,
    data: st.DataObject,
) -> None:
    api, path = endpoint
    if not asks_usage:
        # Usage is injected and its traces stripped: only what injection adds
        # may be edited, so the body carries none of it.
        body = body.replace(b'"usage"', b'"usagE"')
    path = "/anthropic" + path if api == "anthropic" else path
    request = {"model": "m", "stream": True}
    if asks_usage:
        request["stream_options"] = {"include_usage": True}
    recording = Recording(
        "fuzz", 200, CIMultiDict({"Content-Type": content_type}), body
    )
    relay.provider.reply(recording, chunks=split_at(body, data))

    received, ex = relay.run(relay.post(path, orjson.dumps(request)))

    assert received == body
    assert ex.status == 200 and ex.bytes_out == len(body)
    assert ex.error_type != "proxy_internal"
    assert_sane(ex)


# --- the config loader -----------------------------------------------------------

_PROBLEM = re.compile(r": \S")  # path: what is wrong


def _paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a key or item of ``value``."""
    found = [at]
    if isinstance(value, dict):
        for key, item in value.items():
            found.extend(_paths(item, (*at, key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_paths(item, (*at, index)))
    return found


def _base_config() -> dict[str, Any]:
    raw = copy.deepcopy(proxy_config("https://api.openai.com"))
    raw["server"]["auth"] = {"keys": ["0123456789abcdef0123"]}
    raw["upstreams"]["openai"].update(
        headers={"Authorization": "Bearer ${FUZZ_KEY:-sk-x}"},
        timeouts={"connect": "5s", "idle": 60},
        breaker={"failures": 4, "window": "1s"},
        retries={"attempts": 2, "backoff": "250ms"},
    )
    raw["upstreams"]["azure"] = {"url": "https://azure.example", "api": "openai"}
    raw["routes"][1].update(models=["gpt-*"], fallbacks=["azure"])
    raw["pricing"] = {"gpt-4o": {"input": 2.5, "output": 10}}
    raw["telemetry"] = {"labels": ["tenant"], "redact": ["x+"], "max_models": 5}
    return raw


config_values = json_values | st.sampled_from(
    ["${FUZZ_UNSET}", "${1bad}", "5x", "-1s", "1e999", "http://", "[::1", "/v1", ""]
)


@FAST
@given(data=st.data())
def test_config_mutations_load_or_fail_with_config_error(data: st.DataObject) -> None:
    raw = _base_config()
    assert isinstance(build_config(copy.deepcopy(raw)), Config)  # the control
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(_paths(raw)))
        if not path:
            raw = data.draw(config_values)
            continue
        parent = raw
        for step in path[:-1]:
            parent = parent[step]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(config_values)
    try:
        config = build_config(raw)
    except ConfigError as exc:
        assert exc.problems
        assert all(_PROBLEM.search(p) for p in exc.problems), exc.problems
    else:
        assert isinstance(config, Config)


@FAST
@given(
    text=st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.sampled_from(
                [b"server:", b"\n", b"  ", b"listen: ", b"- ", b"&a ", b"*a", b"!!",
                 b"python/object", b"{", b"[", b"]", b"}", b": ", b"'", b'"', b"\t",
                 b"upstreams:", b"routes:", b"prefix: /v1", b"${X}", b"\xff", b"#"]
            ),
            max_size=40,
        ).map(b"".join),
    )
)  # fmt: skip
def test_config_files_of_any_bytes_load_or_fail_with_config_error(
    text: bytes,
) -> None:
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        load_config(f.name)
    except ConfigError as exc:
        assert all(_PROBLEM.search(p) for p in exc.problems), exc.problems
    finally:
        os.unlink(f.name)


@pytest.mark.parametrize("depth", [40, 5000, 20_000])
def test_deeply_nested_config_is_a_config_error(depth: int, tmp_path: Any) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("server: " + "[" * depth + "]" * depth)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "nested too deeply" in info.value.problems[0]

    nested: Any = "x"
    for _ in range(min(depth, 5000)):
        nested = [nested]
    with pytest.raises(ConfigError) as info:
        build_config({"server": {"listen": nested}})
    assert info.value.problems == ["(top level): nested too deeply"]
