"""The upstream client: one connection pool per configured upstream.

``UpstreamClient.send`` returns once the upstream's response headers are in, or
raises a typed ``ProxyError``: ``UpstreamConnectError`` (no connection could be
made), ``UpstreamDisconnectError`` (the connection closed after the request went
out), ``UpstreamTimeoutError`` (phase ``connect`` or ``first_byte``) or
``MalformedResponseError``. The caller owns the returned response and must
close or release it. ``Watchdog`` then enforces the idle and total deadlines on
the body without a timer per chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from .config import Upstream
from .errors import (
    MalformedResponseError,
    UpstreamConnectError,
    UpstreamDisconnectError,
    UpstreamTimeoutError,
)
from .exchange import Exchange


class UpstreamClient:
    """Pooled HTTP connections to one upstream, with its timeouts."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        parts = urlsplit(upstream.url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        t = upstream.timeouts
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # concurrency is bounded by the proxy, not the pool
                ttl_dns_cache=60,
                keepalive_timeout=30,
            ),
            # Bodies reach the client exactly as sent, compressed or not.
            auto_decompress=False,
            # No defaults added: the client's own headers are what is sent.
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect or None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes,
        ex: Exchange,
    ) -> aiohttp.ClientResponse:
        """Send a request; return when the response headers have arrived."""
        name = self.upstream.name
        t = self.upstream.timeouts
        remaining = t.total - (time.perf_counter() - ex.started) if t.total else None
        wait = _smallest(t.first_byte, remaining)
        try:
            async with asyncio.timeout(wait):
                return await self._session.request(
                    method,
                    url,
                    headers=headers,
                    data=body if body else None,
                    allow_redirects=False,
                    compress=None,
                )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamTimeoutError(
                "connect", "timed out connecting to the upstream", upstream=name
            ) from exc
        except TimeoutError as exc:
            phase = "first_byte" if wait == t.first_byte else "total"
            raise UpstreamTimeoutError(
                phase, f"no response headers within {wait:g}s", upstream=name
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(
                f"cannot connect to the upstream: {exc.os_error.strerror or exc}",
                upstream=name,
            ) from exc
        except aiohttp.ClientResponseError as exc:
            raise MalformedResponseError(
                f"the upstream sent an invalid response: {exc.message}", upstream=name
            ) from exc
        except aiohttp.ClientConnectionError as exc:
            # Anything else at the connection level (a reset, a close, a broken
            # pipe) happened on a connection that was made: the request may be
            # with the provider already. aiohttp drops a pooled connection whose
            # close it has seen, and re-sends only idempotent methods itself.
            raise UpstreamDisconnectError(
                "the upstream closed the connection before responding", upstream=name
            ) from exc

    def url_for(self, path: str) -> str:
        """The absolute URL of ``path`` (with its query) on this upstream."""
        return self.upstream.url + path

    async def close(self) -> None:
        await self._session.close()


class Watchdog:
    """Idle-gap and total deadlines for a response body being relayed.

    The relay loop stamps ``ex.t_last_byte`` on every chunk anyway; the watchdog
    wakes rarely and compares against it, so the per-chunk path has no timer to
    reset. On expiry it fails the response's stream with ``UpstreamTimeoutError``,
    which the pending read then raises.
    """

    __slots__ = ("_ex", "_handle", "_idle", "_loop", "_name", "_resp", "_total_at")

    def __init__(
        self,
        ex: Exchange,
        resp: aiohttp.ClientResponse,
        idle: float,
        total: float,
        name: str,
    ) -> None:
        self._ex = ex
        self._resp = resp
        self._idle = idle
        self._total_at = ex.started + total if total else None
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._arm(time.perf_counter())

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, now: float) -> None:
        last = self._ex.t_last_byte or self._ex.t_headers or now
        due = _smallest(last + self._idle if self._idle else None, self._total_at)
        if due is not None:
            self._handle = self._loop.call_later(max(due - now, 0.0), self._check)

    def _check(self) -> None:
        self._handle = None
        now = time.perf_counter()
        last = self._ex.t_last_byte or self._ex.t_headers or now
        if self._total_at is not None and now >= self._total_at:
            self._expire("total", "the response exceeded the total timeout")
        elif self._idle and now - last >= self._idle:
            self._expire("idle", f"no data from the upstream for {self._idle:g}s")
        else:
            self._arm(now)

    def _expire(self, phase: str, message: str) -> None:
        exc = UpstreamTimeoutError(phase, message, upstream=self._name)
        self._resp.content.set_exception(exc)
        self._resp.close()


def _smallest(*values: float | None) -> float | None:
    present = [v for v in values if v]
    return min(present) if present else None


def new_clients(upstreams: Mapping[str, Upstream]) -> dict[str, UpstreamClient]:
    """A client per upstream; must be called with the event loop running."""
    return {name: UpstreamClient(u) for name, u in upstreams.items()}
