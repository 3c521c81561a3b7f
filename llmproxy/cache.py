"""The response cache: exact repeats answered without asking the provider again.

Off unless a route has a ``cache`` block. ``ResponseCache.lookup`` decides for
each request on such a route: ``bypass`` (not cacheable, or the client said
``Cache-Control: no-cache`` / ``no-store``), ``hit`` (an ``Entry`` to replay) or
``miss`` (a ``Fill`` to which the relay loop adds the forwarded chunks).
``ResponseCache.keep`` stores a fill after its exchange ended well: status 200,
no error, a stream that saw its terminal event, answered by the route's own
upstream rather than a fallback.

The key is a hash of all that selects the answer: route, upstream, method, path
and query, the body as canonical JSON, the headers that pick a response format,
the content codings the client accepts, and the caller's scope: every header
that carries a credential or names an account (``headers.SECRET_HEADERS``), the
declared tenant, the proxy key when inbound auth checks it, and the upstream's
configured headers, so one tenant never sees another's answers. None of it is
stored in clear.

Stores: ``MemoryStore``, an LRU within a byte budget, or ``RedisStore`` (in
``cache_redis``) shared by replicas. A store never raises into a request: a
failing Redis makes lookups miss and stores do nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from multidict import CIMultiDict

from .headers import SECRET_HEADERS
from .injection import UsageStripper
from .server import Reply

if TYPE_CHECKING:
    from .config import Cache, Route, RouteCache, Upstream
    from .dispatch import Outgoing
    from .exchange import Exchange

CACHE_HEADER = "x-llmproxy-cache"
# What a replayed answer keeps of the original's headers; dates, request ids,
# rate-limit readings and cookies belonged to the original exchange only.
_REPLAYED = ("content-type", "content-encoding")
# Request headers that change the shape of the answer for the same body.
_VARY = ("anthropic-version", "anthropic-beta", "openai-beta")
_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})
_GENERATIVE = frozenset({"chat", "text_completion"})
_ENTRY_OVERHEAD = 256  # bytes counted per entry beyond its body and headers
# Who is asking. The default proxy key header counts only when inbound auth reads
# it (then as ``auth_header``): otherwise it is never forwarded and names nobody.
_SCOPE = (SECRET_HEADERS - {"x-llmproxy-key"}) | {"x-llmproxy-tenant"}


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored answer: the bytes the client was sent, and the usage it cost."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    upstream: str
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    size: int = field(init=False)

    def __post_init__(self) -> None:
        headers = sum(len(k) + len(v) for k, v in self.headers)
        object.__setattr__(self, "size", len(self.body) + headers + _ENTRY_OVERHEAD)

    def dumps(self) -> bytes:
        """One blob: a JSON line of metadata, then the body as it was sent."""
        meta = [
            self.status,
            self.headers,
            self.upstream,
            self.model,
            self.input_tokens,
            self.output_tokens,
            self.cached_input_tokens,
            self.cache_creation_input_tokens,
            self.reasoning_tokens,
        ]
        return orjson.dumps(meta) + b"\n" + self.body

    @classmethod
    def loads(cls, data: bytes) -> Entry | None:
        """The entry ``dumps`` wrote, or ``None`` for anything else."""
        meta, _, body = data.partition(b"\n")
        try:
            status, headers, upstream, model, *usage = orjson.loads(meta)
            return cls(
                int(status),
                tuple((str(k), str(v)) for k, v in headers),
                body,
                str(upstream),
                model,
                *usage,
            )
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None


class Store(Protocol):
    """Where entries live; no method raises."""

    @property
    def stored_bytes(self) -> int | None:
        """What the entries take, where the store knows it."""

    async def get(self, key: str) -> Entry | None: ...

    def put(self, key: str, entry: Entry, ttl: float) -> None: ...

    async def close(self) -> None: ...


class Fill:
    """The forwarded chunks of a cacheable answer, kept up to the entry limit."""

    __slots__ = ("chunks", "key", "limit", "size", "ttl")

    def __init__(self, key: str, settings: RouteCache) -> None:
        self.key = key
        self.ttl = settings.ttl
        self.limit = settings.max_entry_bytes
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        """Called once per forwarded chunk: past the limit it only counts."""
        self.size += len(chunk)
        if self.size <= self.limit:
            self.chunks.append(chunk)


class ResponseCache:
    """The per-request decisions, in front of one store."""

    def __init__(self, store: Store, auth_header: str | None = None) -> None:
        self.store = store
        # The proxy's own key identifies the caller when upstreams set theirs.
        scope = _SCOPE | {auth_header.lower()} if auth_header else _SCOPE
        self._scope_headers = tuple(sorted(scope))

    async def lookup(
        self,
        ex: Exchange,
        route: Route,
        upstream: Upstream,
        out: Outgoing,
    ) -> tuple[Entry | None, Fill | None]:
        """A stored entry to replay, or a fill to collect the answer into."""
        settings = route.cache
        assert settings is not None
        directives = _cache_control(out.client_headers.getall("cache-control", ()))
        key = None
        if "no-store" not in directives and _cacheable(ex, out, settings):
            key = self._key(route, upstream, out)
        if key is None:
            ex.cache_result = "bypass"
            return None, None
        if "no-cache" in directives:
            # The client wants a fresh answer; the fresh answer may still be kept.
            ex.cache_result = "bypass"
            return None, Fill(key, settings)
        entry = await self.store.get(key)
        if entry is not None:
            ex.cache_result = "hit"
            return entry, None
        ex.cache_result = "miss"
        return None, Fill(key, settings)

    def keep(self, fill: Fill, ex: Exchange) -> None:
        """Store the answer ``fill`` collected, if it is whole and worth keeping."""
        headers = ex.response_headers
        if (
            ex.status != 200
            or ex.error_type is not None
            or ex.fallback
            or headers is None
            or fill.size > fill.limit
        ):
            return
        if headers.get("content-type", "").startswith("text/event-stream") and not (
            ex.terminal
        ):
            return
        body = b"".join(fill.chunks)
        if ex.usage_injected:
            # What the client was sent: the events it asked for, without usage.
            stripper = UsageStripper()
            body = stripper.feed(body) + stripper.flush()
        entry = Entry(
            ex.status,
            tuple((k, headers[k]) for k in _REPLAYED if k in headers),
            body,
            ex.upstream or "",
            ex.response_model or ex.request_model,
            ex.input_tokens,
            ex.output_tokens,
            ex.cached_input_tokens,
            ex.cache_creation_input_tokens,
            ex.reasoning_tokens,
        )
        self.store.put(fill.key, entry, fill.ttl)

    @staticmethod
    def response(ex: Exchange, entry: Entry) -> Reply:
        """The stored answer, whole: a stream replays without its original pacing."""
        ex.status = entry.status
        ex.upstream = entry.upstream
        ex.response_model = entry.model
        ex.cache_entry = entry
        ex.bytes_out = len(entry.body)
        headers = CIMultiDict(entry.headers)
        headers[CACHE_HEADER] = "hit"
        return Reply(entry.status, entry.body, headers)

    async def close(self) -> None:
        await self.store.close()

    def _key(self, route: Route, upstream: Upstream, out: Outgoing) -> str | None:
        try:
            body = orjson.dumps(out.payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # integers beyond 64 bits
            return None
        h = hashlib.sha256()
        headers = out.client_headers
        parts = [route.name, upstream.name, upstream.url, out.method, out.path]
        parts += (",".join(headers.getall(name, ())) for name in _VARY)
        parts.append(_codings(headers.getall("accept-encoding", ())))
        # The scope: whoever is asking, with whichever key the upstream sees.
        parts += (",".join(headers.getall(n, ())) for n in self._scope_headers)
        parts += (f"{k.lower()}={v}" for k, v in sorted(upstream.headers.items()))
        for part in parts:
            h.update(part.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        h.update(body)
        return h.hexdigest()


class MemoryStore:
    """An in-process LRU within ``max_bytes``; expired entries go when met."""

    def __init__(
        self,
        max_bytes: int,
        on_evict: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self.on_evict = on_evict
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> Entry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        entry, expires = item
        if expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry, ttl: float) -> None:
        if entry.size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (entry, self._clock() + ttl)
        self.stored_bytes += entry.size
        self._expire_oldest()
        evicted = 0
        while self.stored_bytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.stored_bytes -= old.size
            evicted += 1
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)

    async def close(self) -> None:
        self._entries.clear()
        self.stored_bytes = 0

    def _drop(self, key: str) -> None:
        entry, _ = self._entries.pop(key)
        self.stored_bytes -= entry.size

    def _expire_oldest(self) -> None:
        """Drop expired entries at the cold end, so they do not hold the budget."""
        now = self._clock()
        # A few at most: a full scan per store would cost as much as the cache.
        for key, (_, expires) in list(islice(self._entries.items(), 8)):
            if expires <= now:
                self._drop(key)


def new_cache(
    settings: Cache,
    auth_header: str | None = None,
    on_evict: Callable[[int], None] | None = None,
    on_error: Callable[[], None] | None = None,
) -> ResponseCache:
    """The cache the configuration asks for."""
    store: Store
    if settings.backend == "redis":
        from .cache_redis import RedisStore

        assert settings.redis_url is not None
        store = RedisStore(
            settings.redis_url, settings.timeout, settings.backoff, on_error
        )
    else:
        store = MemoryStore(settings.max_bytes, on_evict)
    return ResponseCache(store, auth_header)


def _cacheable(ex: Exchange, out: Outgoing, settings: RouteCache) -> bool:
    """A JSON request whose answer is the same every time it is asked."""
    payload = out.payload
    if out.method != "POST" or not isinstance(payload, dict):
        return False
    return settings.allow_nondeterministic or _deterministic(payload, ex.operation)


def _deterministic(payload: Mapping[str, Any], operation: str | None) -> bool:
    n = payload.get("n", 1)
    if not isinstance(n, int | float) or n > 1:
        return False
    temperature = payload.get("temperature")
    if temperature is None:
        # Providers sample at temperature 1 unless told otherwise.
        return operation not in _GENERATIVE
    return isinstance(temperature, int | float) and temperature <= 0


def _cache_control(values: Any) -> frozenset[str]:
    return frozenset(
        d.split("=", 1)[0].strip().lower() for v in values for d in v.split(",")
    )


def _codings(values: Any) -> str:
    """The readable codings the client accepts, as one canonical string."""
    accepted = {
        item.split(";", 1)[0].strip().lower() for v in values for item in v.split(",")
    }
    return ",".join(sorted(accepted & _CODINGS))
