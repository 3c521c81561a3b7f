"""The Redis cache store, for replicas that share their cached answers.

Redis is an optimisation, never a dependency: every command is bounded by the
configured timeout, is not retried, and any failure (refused, reset, slow) makes
a lookup a miss. After a failure the store leaves Redis alone for ``backoff``
seconds, so a dead Redis costs one timeout per back-off period, not one per
request. Writes run in the background, after the client has its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .cache import Entry

log = logging.getLogger(__name__)

KEY_PREFIX = "llmproxy:cache:"


class RedisStore:
    """Entries as Redis strings with a TTL; Redis's own policy evicts."""

    stored_bytes = None  # Redis knows: INFO memory

    def __init__(
        self,
        url: str,
        timeout: float,
        backoff: float,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.backoff = backoff
        self.on_error = on_error
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
        )
        self._down_until = 0.0
        self._failing = False
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def available(self) -> bool:
        """Not in a back-off after a failure."""
        return not self._down_until or time.monotonic() >= self._down_until

    async def get(self, key: str) -> Entry | None:
        if not self.available:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                data = await self._client.get(KEY_PREFIX + key)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        self._succeeded()
        return Entry.loads(data) if isinstance(data, bytes) else None

    def put(self, key: str, entry: Entry, ttl: float) -> None:
        if not self.available:
            return
        task = asyncio.create_task(self._set(KEY_PREFIX + key, entry.dumps(), ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=self.timeout * 2)
        for task in self._writes:
            task.cancel()
        await self._client.aclose()

    async def _set(self, key: str, value: bytes, ttl: float) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.set(key, value, px=max(int(ttl * 1000), 1))
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        self._succeeded()

    def _failed(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.backoff
        if self.on_error is not None:
            self.on_error()
        if not self._failing:
            self._failing = True
            log.warning(
                "cache.redis_unavailable",
                extra={
                    "fields": {
                        "error": type(exc).__name__,
                        "backoff_s": self.backoff,
                    }
                },
            )

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            self._down_until = 0.0
            log.info("cache.redis_recovered")
