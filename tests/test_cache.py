"""The response cache without sockets: keys, eligibility, the LRU store, entries
and the configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from llmproxy.cache import Entry, Fill, MemoryStore, ResponseCache, new_cache
from llmproxy.config import Route, RouteCache, Upstream, build_config, load_config
from llmproxy.dispatch import Outgoing
from llmproxy.errors import ConfigError
from llmproxy.exchange import Exchange

ROUTE = Route("/v1", "openai", "/v1", cache=RouteCache())
UPSTREAM = Upstream("openai", "https://api.openai.com")
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0}  # fmt: skip


def outgoing(
    payload: Any = BODY, headers: dict[str, str] | None = None, path: str = "/v1/x"
) -> Outgoing:
    proxy = CIMultiDictProxy(CIMultiDict(headers or {}))
    return Outgoing("POST", path, proxy, orjson.dumps(payload), payload)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(body: bytes = b"{}", **usage: Any) -> Entry:
    return Entry(200, (("content-type", "application/json"),), body, "openai", **usage)


async def decide(
    cache: ResponseCache,
    out: Outgoing,
    operation: str | None = "chat",
    route: Route = ROUTE,
    upstream: Upstream = UPSTREAM,
) -> tuple[str | None, Fill | None]:
    ex = Exchange("r1", "POST", "/v1/chat/completions")
    ex.operation = operation
    _, fill = await cache.lookup(ex, route, upstream, out)
    return ex.cache_result, fill


def key_of(
    out: Outgoing, upstream: Upstream = UPSTREAM, auth: str | None = None
) -> str:
    key = ResponseCache(MemoryStore(1 << 20), auth)._key(ROUTE, upstream, out)
    assert key is not None
    return key


def test_key_ignores_field_order_but_not_content() -> None:
    reordered = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}],
                 "model": "gpt-4o"}  # fmt: skip
    assert key_of(outgoing(reordered)) == key_of(outgoing())
    assert key_of(outgoing(BODY | {"max_tokens": 5})) != key_of(outgoing())
    assert key_of(outgoing(path="/v1/y")) != key_of(outgoing())


def test_key_separates_callers_and_response_shapes() -> None:
    base = key_of(outgoing())
    others = [
        key_of(outgoing(headers={"Authorization": "Bearer a"})),
        key_of(outgoing(headers={"Authorization": "Bearer b"})),
        key_of(outgoing(headers={"x-api-key": "a"})),
        key_of(outgoing(headers={"anthropic-beta": "tools"})),
        key_of(outgoing(headers={"Accept-Encoding": "gzip"})),
        key_of(outgoing(), Upstream("openai", "https://other.example")),
        key_of(outgoing(), Upstream("openai", UPSTREAM.url, headers={"k": "v"})),
        key_of(outgoing(headers={"x-llmproxy-key": "k1"}), auth="x-llmproxy-key"),
    ]
    assert len({base, *others}) == len(others) + 1
    # Codings the proxy cannot read, and their order, do not split entries.
    assert key_of(outgoing(headers={"Accept-Encoding": "br, gzip, deflate"})) == (
        key_of(outgoing(headers={"Accept-Encoding": "deflate,gzip"}))
    )
    # Without inbound auth, the proxy key header is only forwarded noise.
    assert key_of(outgoing(headers={"x-llmproxy-key": "k1"})) == base


@pytest.mark.parametrize(
    ("change", "operation", "result"),
    [
        ({}, "chat", "miss"),
        ({"temperature": 0.2}, "chat", "bypass"),
        ({"n": 2}, "chat", "bypass"),
        ({"n": 1}, "chat", "miss"),
        ({"temperature": None}, "chat", "bypass"),
        ({"temperature": None}, "embeddings", "miss"),
        ({"temperature": "0"}, "chat", "bypass"),
    ],
)
async def test_nondeterministic_requests_bypass(
    change: dict[str, Any], operation: str, result: str
) -> None:
    payload = {k: v for k, v in (BODY | change).items() if v is not None}
    cache = ResponseCache(MemoryStore(1 << 20))
    assert (await decide(cache, outgoing(payload), operation))[0] == result


async def test_cache_control_and_non_json_requests() -> None:
    cache = ResponseCache(MemoryStore(1 << 20))
    assert await decide(cache, outgoing(headers={"Cache-Control": "no-store"})) == (
        "bypass",
        None,
    )
    result, fill = await decide(cache, outgoing(headers={"cache-control": "No-Cache"}))
    assert result == "bypass" and fill is not None  # a fresh answer is still kept
    assert (await decide(cache, outgoing(["not", "an", "object"])))[0] == "bypass"
    loose = Route("/v1", "openai", "/v1",
                  cache=RouteCache(allow_nondeterministic=True))  # fmt: skip
    sampled = outgoing(BODY | {"temperature": 1.0, "n": 4})
    assert (await decide(cache, sampled, route=loose))[0] == "miss"


async def test_memory_store_evicts_least_recently_used_within_budget() -> None:
    evicted: list[int] = []
    one = entry(b"x" * 100)
    store = MemoryStore(3 * one.size, on_evict=evicted.append)
    for key in "abc":
        store.put(key, one, 60)
    assert store.stored_bytes == 3 * one.size
    assert await store.get("a") is one  # now the most recently used
    store.put("d", one, 60)
    assert await store.get("b") is None
    assert [await store.get(k) is one for k in "acd"] == [True, True, True]
    assert evicted == [1] and store.stored_bytes == 3 * one.size
    store.put("e", entry(b"y" * 1000), 60)  # larger than the budget: not kept
    assert await store.get("e") is None and len(store) == 3


async def test_memory_store_expires_entries() -> None:
    clock = Clock()
    store = MemoryStore(1 << 20, clock=clock)
    store.put("a", entry(), 10)
    clock.now += 9.9
    assert await store.get("a") is not None
    clock.now += 0.2
    assert await store.get("a") is None
    assert store.stored_bytes == 0
    # Expired entries at the cold end give their room back when others arrive.
    store.put("b", entry(), 1)
    clock.now += 2
    store.put("c", entry(), 1)
    assert len(store) == 1 and store.stored_bytes == entry().size


def test_entry_round_trips_and_rejects_garbage() -> None:
    original = entry(b"data: x\n\ndata: [DONE]\n\n", model="gpt-4o",
                     input_tokens=3, output_tokens=4)  # fmt: skip
    assert Entry.loads(original.dumps()) == original
    for junk in (b"", b"nonsense", b"[1,2]\nbody", b'{"a":1}\n'):
        assert Entry.loads(junk) is None


def test_fill_keeps_chunks_only_up_to_its_limit() -> None:
    fill = Fill("k", RouteCache(max_entry_bytes=10))
    for chunk in (b"12345", b"6789", b"abc", b"d"):
        fill.add(chunk)
    assert fill.chunks == [b"12345", b"6789"] and fill.size == 13


def test_new_cache_picks_the_configured_store() -> None:
    raw = {"upstreams": {"o": {"url": "http://x"}},
           "routes": [{"prefix": "/v1", "upstream": "o", "cache": {}}]}  # fmt: skip
    config = build_config(raw)
    assert isinstance(new_cache(config.cache).store, MemoryStore)
    assert config.cache.max_bytes == 256 * 1024 * 1024


def test_config_reads_cache_blocks() -> None:
    raw = {
        "upstreams": {"o": {"url": "http://x"}},
        "routes": [
            {"prefix": "/a", "upstream": "o",
             "cache": {"ttl": "10m", "max_entry_bytes": 4096,
                       "allow_nondeterministic": True}},
            {"prefix": "/b", "upstream": "o", "cache": {"enabled": False}},
            {"prefix": "/c", "upstream": "o"},
        ],
        "cache": {"backend": "redis", "redis_url": "redis://cache:6379/2",
                  "timeout": "50ms", "backoff": "2s"},
    }  # fmt: skip
    config = build_config(raw)
    a, b, c = config.routes
    assert a.cache == RouteCache(600.0, 4096, True)
    assert b.cache is None and c.cache is None
    assert (config.cache.backend, config.cache.redis_url) == (
        "redis",
        "redis://cache:6379/2",
    )
    assert (config.cache.timeout, config.cache.backoff) == (0.05, 2.0)


def test_config_reports_bad_cache_settings() -> None:
    raw = {
        "upstreams": {"o": {"url": "http://x"}},
        "routes": [{"prefix": "/a", "upstream": "o",
                    "cache": {"ttl": 0, "max_entry_bytes": 0, "colour": 1}}],
        "cache": {"backend": "memcached", "timeout": "0s", "max_bytes": -1},
    }  # fmt: skip
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    problems = "\n".join(info.value.problems)
    for expected in (
        "routes[0].cache.ttl: must be more than 0",
        "routes[0].cache.max_entry_bytes: must be at least 1",
        "routes[0].cache.colour: unknown key",
        "cache.backend: expected one of memory, redis, got 'memcached'",
        "cache.timeout: must be more than 0",
        "cache.max_bytes: must be at least 1",
    ):
        assert expected in problems
    raw["routes"][0]["cache"] = {}
    raw["cache"] = {"backend": "redis"}
    with pytest.raises(ConfigError, match=r"cache\.redis_url: required"):
        build_config(raw)
    raw["cache"] = {"backend": "redis", "redis_url": "http://cache"}
    with pytest.raises(ConfigError, match=r"cache\.redis_url: expected a redis://"):
        build_config(raw)


def test_example_config_turns_the_cache_on_somewhere() -> None:
    example = Path(__file__).resolve().parents[1] / "config.example.yaml"
    config = load_config(example)
    assert any(route.cache is not None for route in config.routes)
    assert config.cache.backend == "memory"
