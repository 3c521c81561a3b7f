"""The response cache end to end: SDK and raw clients, proxy, fake provider, and a
real redis-server started here (skipped only where redis-server is not installed).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
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
    split_randomly,
)
from prometheus_client.parser import text_string_to_metric_families

from llmproxy.headers import SECRET_HEADERS

CHAT = "/v1/chat/completions"
STREAM = "openai/chat_completions_stream_include_usage"
# gpt-3.5-turbo answers with 15 input and 31 output tokens in the recording.
PRICING = {"gpt-3.5-turbo": {"input": 1.0, "output": 2.0}}
SAVED_PER_HIT = (15 * 1.0 + 31 * 2.0) / 1e6


def cached_config(
    url: str, route_cache: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """Both routes cache; ``top`` sets top-level keys such as ``cache``."""
    raw = proxy_config(url, pricing=PRICING, **top)
    for route in raw["routes"]:
        route["cache"] = dict(route_cache or {})
    return raw


def chat(**extra: Any) -> bytes:
    body = {
        "model": "gpt-3.5-turbo",
        "messages": [{"role": "user", "content": "a joke"}],
        "temperature": 0,
    }
    return orjson.dumps(body | extra)


async def post(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(url, data=body, headers=headers or {}) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def scrape(running: RunningProxy) -> dict[tuple[str, frozenset[Any]], float]:
    await running.settle()
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.admin_url + "/metrics") as resp,
    ):
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(
    samples: dict[tuple[str, frozenset[Any]], float], name: str, **want: str
) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and set(want.items()) <= set(labels)
    )


async def test_openai_sdk_miss_then_hit_saves_dollars_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    running = await start_proxy(cached_config(provider.url))
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="sk-tenant-a")

    async def ask() -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "a joke"}],
            temperature=0,
        )
        answer = raw.parse()
        return raw.headers["x-llmproxy-cache"], answer.model_dump_json()

    first, second, third = await ask(), await ask(), await ask()
    assert [first[0], second[0], third[0]] == ["miss", "hit", "hit"]
    assert first[1] == second[1] == third[1]
    assert len(provider.received) == 1

    samples = await scrape(running)
    assert total(samples, "llmproxy_cache_requests_total", result="miss") == 1
    assert total(samples, "llmproxy_cache_requests_total", result="hit") == 2
    saved = total(samples, "llmproxy_cache_saved_usd_total", route="/v1")
    assert saved == pytest.approx(2 * SAVED_PER_HIT)
    # Only the answer that was bought counts as provider tokens and cost.
    assert total(samples, "llmproxy_cost_usd_total") == pytest.approx(SAVED_PER_HIT)
    assert total(samples, "llmproxy_tokens_total", type="output") == 31
    assert total(samples, "llmproxy_requests_total", status_class="2xx") == 3
    assert total(samples, "llmproxy_cache_stored_bytes") > 0
    hit = running.exchanges[-1]
    assert hit.cache_result == "hit" and not hit.attempts
    assert hit.input_tokens is None and hit.response_model == "gpt-3.5-turbo-0125"


async def test_field_order_and_whitespace_do_not_matter_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    running = await start_proxy(cached_config(provider.url))
    a = (
        b'{"model":"gpt-3.5-turbo","temperature":0,'
        b'"messages":[{"role":"user","content":"a joke"}]}'
    )
    b = (
        b'{ "messages": [ {"content": "a joke", "role": "user"} ],\n'
        b' "temperature": 0,\n "model": "gpt-3.5-turbo" }'
    )
    assert (await post(running.url + CHAT, a))[1]["x-llmproxy-cache"] == "miss"
    status, headers, _ = await post(running.url + CHAT, b)
    assert (status, headers["x-llmproxy-cache"]) == (200, "hit")
    # A different question, path or query is a different entry.
    other = chat(messages=[{"role": "user", "content": "another"}])
    assert (await post(running.url + CHAT, other))[1]["x-llmproxy-cache"] == "miss"
    query = running.url + CHAT + "?api-version=2"
    assert (await post(query, a))[1]["x-llmproxy-cache"] == "miss"
    assert len(provider.received) == 3


async def test_stream_replay_is_byte_exact_and_unpaced_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    rec = Recording.load(STREAM)
    events = [e + b"\n\n" for e in rec.body.split(b"\n\n") if e]
    provider.reply(rec, chunks=events, pace=0.03)
    running = await start_proxy(cached_config(provider.url))
    body = chat(stream=True, stream_options={"include_usage": True})

    started = time.perf_counter()
    status, headers, original = await post(running.url + CHAT, body)
    paced = time.perf_counter() - started
    assert (status, headers["x-llmproxy-cache"], original) == (200, "miss", rec.body)

    started = time.perf_counter()
    status, headers, replayed = await post(running.url + CHAT, body)
    assert (status, headers["x-llmproxy-cache"]) == (200, "hit")
    assert replayed == original
    assert headers["Content-Type"] == rec.headers["Content-Type"]
    assert time.perf_counter() - started < paced / 3
    assert len(provider.received) == 1


async def test_stream_with_injected_usage_replays_what_the_client_got_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    # Without include_usage the proxy asks for usage and strips it again; the
    # cache must keep the stripped bytes, and still know the usage it saved.
    rec = Recording.load(STREAM)
    provider.reply(rec, chunks=split_randomly(rec.body, random.Random(2), 40))
    running = await start_proxy(cached_config(provider.url))
    body = chat(model="gpt-4", stream=True)
    _, headers, original = await post(running.url + CHAT, body)
    assert headers["x-llmproxy-cache"] == "miss"
    assert b'"usage"' not in original and original.endswith(b"data: [DONE]\n\n")
    _, headers, replayed = await post(running.url + CHAT, body)
    assert headers["x-llmproxy-cache"] == "hit"
    assert replayed == original

    samples = await scrape(running)
    # gpt-4-0613 at the shipped gpt-4 price: 12 input and 5 output tokens.
    saved = total(samples, "llmproxy_cache_saved_usd_total")
    assert saved == pytest.approx((12 * 30.0 + 5 * 60.0) / 1e6)


async def test_gzip_answer_replayed_only_to_clients_that_accept_it_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    rec = Recording.load(
        "anthropic/messages_stream_tool_use",
        "anthropic/messages_stream_tool_use.sse.gz",
    )
    provider.reply(rec)
    running = await start_proxy(cached_config(provider.url))
    url = running.url + "/anthropic/v1/messages"
    body = orjson.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                         "messages": [], "stream": True, "temperature": 0})  # fmt: skip
    gzip_ok = {"Accept-Encoding": "gzip"}
    assert (await post(url, body, gzip_ok))[1]["x-llmproxy-cache"] == "miss"
    _, headers, replayed = await post(url, body, gzip_ok)
    assert headers["x-llmproxy-cache"] == "hit"
    assert headers["Content-Encoding"] == "gzip" and replayed == rec.body
    # A client that does not take gzip is a different entry.
    _, headers, _ = await post(url, body, {"Accept-Encoding": "identity"})
    assert headers["x-llmproxy-cache"] == "miss"


async def test_nondeterministic_and_no_store_requests_bypass_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    running = await start_proxy(cached_config(provider.url))
    url = running.url + CHAT
    sampled = orjson.dumps({"model": "gpt-3.5-turbo", "messages": []})
    cases = [
        (chat(temperature=0.7), {}),
        (chat(n=2), {}),
        (sampled, {}),  # no temperature: providers sample at 1
        (chat(), {"Cache-Control": "no-store"}),
        (b"not json", {}),
    ]
    for body, headers in cases:
        for _ in range(2):
            status, got, _ = await post(url, body, headers)
            assert (status, got["x-llmproxy-cache"]) == (200, "bypass"), body
    assert len(provider.received) == 10
    # no-store kept nothing: the plain request is a miss.
    assert (await post(url, chat()))[1]["x-llmproxy-cache"] == "miss"
    # no-cache asks the provider again, and keeps its fresh answer.
    assert (await post(url, chat(), {"Cache-Control": "no-cache"}))[1][
        "x-llmproxy-cache"
    ] == "bypass"
    assert len(provider.received) == 12
    samples = await scrape(running)
    assert total(samples, "llmproxy_cache_requests_total", result="bypass") == 11


async def test_route_may_cache_nondeterministic_answers_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    raw = cached_config(provider.url, {"allow_nondeterministic": True})
    running = await start_proxy(raw)
    body = chat(temperature=1.2, n=3)
    assert (await post(running.url + CHAT, body))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(running.url + CHAT, body))[1]["x-llmproxy-cache"] == "hit"


async def test_embeddings_cache_without_a_temperature_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    rec = Recording.load("openai/embeddings.reformatted")
    provider.reply(rec)
    running = await start_proxy(cached_config(provider.url))
    body = orjson.dumps({"model": "text-embedding-3-small", "input": "hello"})
    url = running.url + "/v1/embeddings"
    assert (await post(url, body))[1]["x-llmproxy-cache"] == "miss"
    status, headers, replayed = await post(url, body)
    assert (status, headers["x-llmproxy-cache"], replayed) == (200, "hit", rec.body)


async def test_tenants_never_share_answers_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    running = await start_proxy(cached_config(provider.url))
    url, body = running.url + CHAT, chat()

    async def result(headers: dict[str, str]) -> str:
        return (await post(url, body, headers))[1]["x-llmproxy-cache"]

    alice = {"Authorization": "Bearer sk-alice"}
    bob = {"Authorization": "Bearer sk-bob"}
    assert await result(alice) == "miss"
    assert await result(bob) == "miss"
    assert await result({}) == "miss"
    assert await result({"api-key": "azure-key"}) == "miss"
    assert await result(alice) == "hit"
    assert await result(bob) == "hit"
    assert len(provider.received) == 4
    # The credential is part of a hash; nothing about it is kept in clear.
    store = running.proxy.cache.store  # type: ignore[union-attr]
    for key, (entry, _) in store._entries.items():
        assert "alice" not in key and b"sk-alice" not in entry.dumps()


async def test_proxy_key_scopes_entries_when_upstream_sets_credentials_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    raw = cached_config(provider.url)
    raw["server"]["auth"] = {"keys": ["team-a-key-0123456789", "team-b-key-0123456789"]}
    raw["upstreams"]["openai"]["headers"] = {"Authorization": "Bearer sk-shared"}
    running = await start_proxy(raw)
    a = {"x-llmproxy-key": "team-a-key-0123456789"}
    b = {"x-llmproxy-key": "team-b-key-0123456789"}
    assert (await post(running.url + CHAT, chat(), a))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(running.url + CHAT, chat(), b))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(running.url + CHAT, chat(), a))[1]["x-llmproxy-cache"] == "hit"


PROXY_KEYS = ["team-a-key-0123456789", "team-b-key-0123456789"]


@pytest.mark.parametrize("header", sorted(SECRET_HEADERS | {"x-llmproxy-tenant"}))
async def test_callers_differing_in_one_scope_header_never_share_socket(
    header: str, provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    raw = cached_config(provider.url)
    raw["server"]["auth"] = {"keys": PROXY_KEYS}
    running = await start_proxy(raw)
    url, body = running.url + CHAT, chat()
    same = {"x-llmproxy-key": PROXY_KEYS[0], "Authorization": "Bearer sk-same"}

    async def result(value: str) -> str:
        headers = same | {header: value}
        return (await post(url, body, headers))[1]["x-llmproxy-cache"]

    one, two = (
        PROXY_KEYS if header == "x-llmproxy-key" else ("caller-one-0123", "caller-two")
    )
    assert await result(one) == "miss"
    assert await result(two) == "miss"
    assert await result(one) == "hit"
    assert await result(two) == "hit"
    assert len(provider.received) == 2


async def test_entries_expire_after_their_ttl_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    running = await start_proxy(cached_config(provider.url, {"ttl": "300ms"}))
    url, body = running.url + CHAT, chat()
    assert (await post(url, body))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(url, body))[1]["x-llmproxy-cache"] == "hit"
    await asyncio.sleep(0.4)
    assert (await post(url, body))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(url, body))[1]["x-llmproxy-cache"] == "hit"


async def test_least_recently_used_is_evicted_under_the_byte_budget_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    rec = Recording.load("openai/chat_completion")
    provider.reply(rec)
    # Room for three answers of this size, not four.
    budget = 3 * (len(rec.body) + 300) + 100
    running = await start_proxy(
        cached_config(provider.url, cache={"max_bytes": budget})
    )
    url = running.url + CHAT
    questions = [chat(seed=i) for i in range(4)]
    for body in questions[:3]:
        assert (await post(url, body))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(url, questions[0]))[1]["x-llmproxy-cache"] == "hit"
    assert (await post(url, questions[3]))[1]["x-llmproxy-cache"] == "miss"
    # questions[1] was the least recently used: it made room for questions[3].
    assert (await post(url, questions[1]))[1]["x-llmproxy-cache"] == "miss"
    assert (await post(url, questions[0]))[1]["x-llmproxy-cache"] == "hit"

    samples = await scrape(running)
    assert total(samples, "llmproxy_cache_evictions_total") == 2
    assert 0 < total(samples, "llmproxy_cache_stored_bytes") <= budget


async def test_only_whole_successful_answers_are_kept_socket(
    provider: FakeProvider, start_proxy: ProxyFactory
) -> None:
    raw = cached_config(provider.url, {"max_entry_bytes": 2048})
    running = await start_proxy(raw)
    url = running.url + CHAT

    async def twice(body: bytes) -> list[str]:
        results = []
        for _ in range(2):
            try:
                results.append((await post(url, body))[1]["x-llmproxy-cache"])
            except aiohttp.ClientPayloadError:
                results.append("cut")
        return results

    provider.reply(Recording.load("openai/error_404_model_not_found"))
    assert await twice(chat(seed=1)) == ["miss", "miss"]

    rec = Recording.load(STREAM)
    no_done = rec.body.replace(b"data: [DONE]\n\n", b"")
    provider.reply(Recording(rec.name, 200, rec.headers, no_done), chunks=[no_done])
    assert await twice(chat(seed=2, stream=True)) == ["miss", "miss"]

    async def cut_short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(rec.body[:900])
        request.transport.close()  # type: ignore[union-attr]
        return resp

    provider.handler = cut_short
    assert await twice(chat(seed=3, stream=True)) == ["cut", "cut"]

    big = Recording.load("openai/embeddings.reformatted")  # over max_entry_bytes
    assert len(big.body) > 2048
    provider.reply(big)
    assert await twice(chat(seed=4)) == ["miss", "miss"]
    assert len(running.proxy.cache.store) == 0  # type: ignore[union-attr, arg-type]


async def test_routes_without_a_cache_block_show_no_cache_socket(
    provider: FakeProvider, proxy: RunningProxy
) -> None:
    provider.reply(Recording.load("openai/chat_completion"))
    for _ in range(2):
        _, headers, _ = await post(proxy.url + CHAT, chat())
        assert "x-llmproxy-cache" not in headers
    assert len(provider.received) == 2
    assert proxy.proxy.cache is None
    samples = await scrape(proxy)
    assert not [name for name, _ in samples if name.startswith("llmproxy_cache_")]


# Redis: a real redis-server on a free port in a temporary directory.


class RedisServer:
    """One redis-server process that a test can stop, pause and start again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(5)
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Die at once, paused or not: its connections are closed by the kernel."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(5)
        self.process = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def redis_config(url: str, redis: RedisServer, **cache: Any) -> dict[str, Any]:
    settings = {"backend": "redis", "redis_url": redis.url, "timeout": "100ms"}
    return cached_config(url, cache=settings | cache)


@pytest.fixture
async def chat_reply(provider: FakeProvider) -> AsyncIterator[FakeProvider]:
    provider.reply(Recording.load("openai/chat_completion"))
    yield provider


async def wait_for(condition: Any, seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_replicas_share_answers_through_redis_socket(
    chat_reply: FakeProvider, start_proxy: ProxyFactory, redis_server: RedisServer
) -> None:
    raw = redis_config(chat_reply.url, redis_server)
    first, second = await start_proxy(raw), await start_proxy(raw)
    rec = Recording.load("openai/chat_completion")
    status, headers, body = await post(first.url + CHAT, chat())
    assert (status, headers["x-llmproxy-cache"], body) == (200, "miss", rec.body)
    await wait_for(lambda: not first.proxy.cache.store._writes)  # type: ignore[union-attr]

    for replica in (second, first):
        status, headers, body = await post(replica.url + CHAT, chat())
        assert (status, headers["x-llmproxy-cache"], body) == (200, "hit", rec.body)
    assert len(chat_reply.received) == 1

    stream = Recording.load(STREAM)
    chat_reply.reply(stream, chunks=split_randomly(stream.body, random.Random(4)))
    body = chat(stream=True, stream_options={"include_usage": True})
    _, _, original = await post(first.url + CHAT, body)
    await wait_for(lambda: not first.proxy.cache.store._writes)  # type: ignore[union-attr]
    _, headers, replayed = await post(second.url + CHAT, body)
    assert headers["x-llmproxy-cache"] == "hit" and replayed == original == stream.body


async def test_redis_entries_expire_after_their_ttl_socket(
    chat_reply: FakeProvider, start_proxy: ProxyFactory, redis_server: RedisServer
) -> None:
    raw = redis_config(chat_reply.url, redis_server)
    for route in raw["routes"]:
        route["cache"]["ttl"] = "300ms"
    running = await start_proxy(raw)
    store = running.proxy.cache.store  # type: ignore[union-attr]
    assert (await post(running.url + CHAT, chat()))[1]["x-llmproxy-cache"] == "miss"
    await wait_for(lambda: not store._writes)
    assert (await post(running.url + CHAT, chat()))[1]["x-llmproxy-cache"] == "hit"
    await asyncio.sleep(0.4)
    assert (await post(running.url + CHAT, chat()))[1]["x-llmproxy-cache"] == "miss"


async def test_redis_going_away_costs_nothing_and_comes_back_socket(
    chat_reply: FakeProvider, start_proxy: ProxyFactory, redis_server: RedisServer
) -> None:
    running = await start_proxy(
        redis_config(chat_reply.url, redis_server, backoff="1s")
    )
    store = running.proxy.cache.store  # type: ignore[union-attr]
    url = running.url + CHAT
    assert (await post(url, chat()))[1]["x-llmproxy-cache"] == "miss"
    await wait_for(lambda: not store._writes)
    assert (await post(url, chat()))[1]["x-llmproxy-cache"] == "hit"

    redis_server.stop()  # mid-run: refused connections from now on
    started = time.perf_counter()
    status, headers, _ = await post(url, chat())
    assert (status, headers["x-llmproxy-cache"]) == (200, "miss")
    assert time.perf_counter() - started < 1.0
    assert not store.available  # backing off: the next requests skip Redis
    sent = len(chat_reply.received)
    started = time.perf_counter()
    for _ in range(20):
        status, headers, _ = await post(url, chat())
        assert (status, headers["x-llmproxy-cache"]) == (200, "miss")
    assert len(chat_reply.received) == sent + 20
    assert time.perf_counter() - started < 5.0
    samples = await scrape(running)
    # One failure for the lookup after the stop; none while backing off.
    assert total(samples, "llmproxy_cache_backend_errors_total") == 1

    redis_server.start()  # same port, empty
    await asyncio.sleep(1.1)  # the back-off runs out
    assert (await post(url, chat()))[1]["x-llmproxy-cache"] == "miss"
    await wait_for(lambda: not store._writes)
    assert (await post(url, chat()))[1]["x-llmproxy-cache"] == "hit"


async def test_slow_redis_is_served_around_within_the_timeout_socket(
    chat_reply: FakeProvider, start_proxy: ProxyFactory, redis_server: RedisServer
) -> None:
    running = await start_proxy(redis_config(chat_reply.url, redis_server))
    url = running.url + CHAT
    assert (await post(url, chat(seed=1)))[1]["x-llmproxy-cache"] == "miss"
    store = running.proxy.cache.store  # type: ignore[union-attr]
    await wait_for(lambda: not store._writes)
    redis_server.pause()  # accepts nothing, answers nothing
    try:
        started = time.perf_counter()
        status, headers, _ = await post(url, chat())
        elapsed = time.perf_counter() - started
        assert (status, headers["x-llmproxy-cache"]) == (200, "miss")
        assert elapsed < 0.5  # the 100ms timeout, not a hang
        assert not store.available
        for _ in range(5):  # backing off: Redis is not asked, so no more timeouts
            status, headers, _ = await post(url, chat())
            assert (status, headers["x-llmproxy-cache"]) == (200, "miss")
        samples = await scrape(running)
        assert total(samples, "llmproxy_cache_backend_errors_total") == 1
    finally:
        redis_server.resume()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reached the event loop's exception handler: an exception nobody awaited."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield errors
    loop.set_exception_handler(old)


async def test_redis_dying_during_a_lookup_serves_uncached_socket(
    chat_reply: FakeProvider,
    start_proxy: ProxyFactory,
    redis_server: RedisServer,
    loop_errors: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A timeout far above how long the test takes: an answer in time proves the
    # failure was seen as such, not waited out.
    running = await start_proxy(
        redis_config(chat_reply.url, redis_server, timeout="3s")
    )
    store = running.proxy.cache.store  # type: ignore[union-attr]
    url = running.url + CHAT
    assert (await post(url, chat(seed=1)))[1]["x-llmproxy-cache"] == "miss"
    await wait_for(lambda: not store._writes)  # a pooled connection to Redis

    redis_server.pause()
    lookup = asyncio.create_task(post(url, chat()))
    await asyncio.sleep(0.3)
    assert not lookup.done() and len(chat_reply.received) == 1  # still asking Redis
    redis_server.kill()
    started = time.perf_counter()
    status, headers, _ = await lookup
    assert (status, headers["x-llmproxy-cache"]) == (200, "miss")
    assert time.perf_counter() - started < 1.0
    assert len(chat_reply.received) == 2 and not store.available
    samples = await scrape(running)
    assert total(samples, "llmproxy_cache_backend_errors_total") == 1
    assert loop_errors == [] and not [r for r in caplog.records if r.exc_info]


async def test_redis_dying_during_the_write_after_a_miss_costs_nothing_socket(
    chat_reply: FakeProvider,
    start_proxy: ProxyFactory,
    redis_server: RedisServer,
    loop_errors: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = await start_proxy(
        redis_config(chat_reply.url, redis_server, timeout="3s")
    )
    store = running.proxy.cache.store  # type: ignore[union-attr]
    url = running.url + CHAT
    recording = Recording.load("openai/chat_completion")

    async def pause_then_answer(request: web.Request) -> web.StreamResponse:
        # The lookup is done; the write that follows the answer will hang.
        redis_server.pause()
        return await chat_reply.write(request, recording, None, 0.0)

    chat_reply.handler = pause_then_answer
    status, headers, body = await post(url, chat())
    assert (status, headers["x-llmproxy-cache"], body) == (200, "miss", recording.body)
    await asyncio.sleep(0.2)
    assert store._writes  # the write is waiting on Redis
    redis_server.kill()
    started = time.perf_counter()
    await wait_for(lambda: not store._writes)
    assert time.perf_counter() - started < 1.0
    assert not store.available
    samples = await scrape(running)
    assert total(samples, "llmproxy_cache_backend_errors_total") == 1
    # Backing off: the next request goes straight to the provider, uncached.
    chat_reply.reply(recording)
    status, headers, _ = await post(url, chat())
    assert (status, headers["x-llmproxy-cache"]) == (200, "miss")
    await running.proxy.stop()  # closing the store finds nothing left to wait for
    assert loop_errors == [] and not [r for r in caplog.records if r.exc_info]
