"""Concurrency limits per upstream, with a bounded wait queue.

At most ``max_concurrency`` requests are relayed to an upstream at once; up to
``max_queue`` more wait their turn in arrival order, and any beyond that are
refused at once with ``QueueFullError`` (503 ``queue_full``). So a slow provider
fills a bounded queue, visible in ``llmproxy_queue_wait_seconds``, instead of
the proxy's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import QueueFullError


class Limiter:
    """A FIFO semaphore with a cap on waiters."""

    __slots__ = ("_max", "_max_queue", "_name", "_waiters", "inflight")

    def __init__(self, name: str, max_concurrency: int, max_queue: int) -> None:
        self._name = name
        self._max = max_concurrency
        self._max_queue = max_queue
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.inflight = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is waiting (the fast path)."""
        if self.inflight < self._max and not self._waiters:
            self.inflight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in line; ``QueueFullError`` if the line is full."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self._max_queue:
            raise QueueFullError(
                f"upstream {self._name!r} has {self.inflight} requests in flight and "
                f"{len(self._waiters)} waiting",
                upstream=self._name,
                retry_after=1.0,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as we were cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give the slot back, or hand it straight to the next in line."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: inflight unchanged
                return
        self.inflight -= 1
