"""The upstream client: pooled HTTP/1.1 connections, one pool per upstream.

``UpstreamClient.send`` returns an ``UpstreamResponse`` once the upstream's
response headers are in, or raises a typed ``ProxyError``:
``UpstreamConnectError`` (no connection could be made),
``UpstreamDisconnectError`` (the connection closed after the request went out),
``UpstreamTimeoutError`` (phase ``connect``, ``first_byte`` or ``total``) or
``MalformedResponseError``. The caller owns the response and must ``close`` it.
``Watchdog`` then enforces the idle and total deadlines on the body without a
timer per chunk.

The connection is an asyncio protocol around llhttp (httptools): body bytes are
queued as the parser yields them, with no per-chunk future unless the reader is
waiting, which is what lets the relay afford telemetry. The body reaches the
reader exactly as the upstream sent it; only the transfer framing (chunked or
not) is the connection's own. A response whose body has been read whole frees
its connection for the next request at once.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Upstream
from .errors import (
    MalformedResponseError,
    UpstreamConnectError,
    UpstreamDisconnectError,
    UpstreamTimeoutError,
)
from .exchange import Exchange
from .headers import from_wire

# Idle pooled connections are closed after this long: most servers close theirs
# after 60 s or more, so a reused connection is rarely one being closed.
_KEEPALIVE = 30.0
# A response's header block may not exceed this: a lying upstream cannot grow
# the proxy's memory with endless headers.
_MAX_HEAD = 64 * 1024
# Body bytes queued for a slow reader before the upstream is paused.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class UpstreamClient:
    """Pooled HTTP/1.1 connections to one upstream, with its timeouts."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        parts = urlsplit(upstream.url)
        tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if tls else 80)
        self._base = parts.path.rstrip("/")
        # What aiohttp, curl and the SDKs send: the port only when not default.
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_line = (
            f"Host: {host}:{self.port}\r\n" if parts.port else f"Host: {host}\r\n"
        )
        self._ssl = ssl.create_default_context() if tls else None
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._closed = False

    async def send(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        ex: Exchange,
    ) -> UpstreamResponse:
        """Send a request; return when the response headers have arrived."""
        name = self.upstream.name
        t = self.upstream.timeouts
        remaining = t.total - (time.perf_counter() - ex.started) if t.total else None
        wait = _smallest(t.first_byte, remaining)
        head = _request_head(method, self._base + target, self._host_line, headers)
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n"
        data = (head + "\r\n").encode("utf-8", "surrogateescape") + body
        resp: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(wait):
                conn = self._take() or await self._connect(t.connect)
                resp = conn.request(data, method == "HEAD")
                await resp.headers_in()
                return resp
        except BaseException as exc:
            if resp is not None:
                resp.close()  # abandoned before its headers: the connection goes
            if not isinstance(exc, TimeoutError) or isinstance(
                exc, UpstreamTimeoutError
            ):
                raise
            phase = "first_byte" if wait == t.first_byte else "total"
            raise UpstreamTimeoutError(
                phase, f"no response headers within {wait:g}s", upstream=name
            ) from exc

    async def _connect(self, within: float) -> _Connection:
        name = self.upstream.name
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        try:
            async with asyncio.timeout(within or None):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                "connect", "timed out connecting to the upstream", upstream=name
            ) from exc
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamConnectError(
                f"cannot connect to the upstream: {reason}", upstream=name
            ) from exc
        if self._closed:
            conn.close()
            raise UpstreamConnectError("the proxy is shutting down", upstream=name)
        self._open.add(conn)
        return conn

    def _take(self) -> _Connection | None:
        """The most recently used idle connection that is still good, if any."""
        idle = self._idle
        now = time.monotonic()
        while idle and now - idle[0].idle_since > _KEEPALIVE:
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
        else:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


class UpstreamResponse:
    """An upstream's answer: status and headers, then the body as it arrives."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_eof",
        "_exc",
        "_head",
        "_queued",
        "_waiter",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exc: BaseException | None = None
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS

    async def headers_in(self) -> None:
        await self._head

    def at_eof(self) -> bool:
        """The whole body is here: no read will wait for the upstream."""
        return self._eof

    async def read(self) -> bytes:
        """The next body chunk as it arrived; ``b""`` at the end.

        Raises ``UpstreamDisconnectError`` (a ``ConnectionError``) if the body
        broke off, or what ``fail`` was given.
        """
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._queued -= len(chunk)
                if self._queued < _LOW_WATER and self._conn is not None:
                    self._conn.resume()
                return chunk
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = waiter = self._conn_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def fail(self, exc: BaseException) -> None:
        """End the body with ``exc`` (the watchdog's deadline) and drop the
        connection."""
        if not self._eof and self._exc is None:
            self._exc = exc
            self._wake()
        self.close()

    def close(self) -> None:
        """Done with the response: an unfinished body's connection is closed."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._eof:
            conn.close()

    # Called by the connection.

    def _conn_loop(self) -> asyncio.AbstractEventLoop:
        return self._head.get_loop()

    def _started(self, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        self.status, self.reason = status, reason
        self.headers = CIMultiDictProxy(headers)
        if not self._head.done():
            self._head.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._queued += len(chunk)
        if self._queued > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finished(self) -> None:
        self._eof = True
        self._conn = None
        self._wake()

    def _broke(self, exc: BaseException) -> None:
        if not self._head.done():
            self._head.set_exception(exc)
            # Retrieved by the sender, or nobody: never "never retrieved".
            self._head.exception()
        elif not self._eof and self._exc is None:
            self._exc = exc
            self._wake()
        self._conn = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time, reused when clean."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: UpstreamResponse | None = None
        self.idle_since = 0.0
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._reason = b""
        self._head_bytes = 0
        self._in_body = False
        self._until_close = False  # the body is framed by the connection closing
        self._head_only = False
        self._complete = False
        self._broken = False
        self._paused = False
        self._keep_alive = False

    def usable(self) -> bool:
        transport = self.transport
        return not self._broken and transport is not None and not transport.is_closing()

    def request(self, data: bytes, head_only: bool) -> UpstreamResponse:
        resp = self.resp = UpstreamResponse(self)
        self._in_body = self._complete = self._until_close = False
        self._head_only = head_only
        self._head_bytes = 0
        assert self.transport is not None
        self.transport.write(data)
        return resp

    def close(self) -> None:
        self._broken = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:
            # Bytes nobody asked for: the connection cannot be trusted again.
            self.close()
            return
        in_head = not self._in_body
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._complete:
                self._broken = True  # junk after the answer; the answer stands
            else:
                self._fail(str(exc) or type(exc).__name__)
        except httptools.HttpParserUpgrade:
            self._fail("the upstream switched protocols")
        if self._complete:
            self._done()
        elif in_head and not self._in_body:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD:
                self._fail("response headers too large")

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken = True
        self.client._forget(self)
        resp = self.resp
        if resp is None:
            return
        self.resp = None
        if self._until_close and exc is None and not self._complete:
            resp._finished()
        elif not self._complete:
            if resp.status:
                error = UpstreamDisconnectError(
                    "the upstream broke off the response",
                    upstream=self.client.upstream.name,
                )
            else:
                error = UpstreamDisconnectError(
                    "the upstream closed the connection before responding",
                    upstream=self.client.upstream.name,
                )
            resp._broke(error)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            self._broken = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._names.append(name)
        self._values.append(value)

    def on_headers_complete(self) -> None:
        if self._complete:
            return  # a second answer to one request: never anyone's
        status = self.parser.get_status_code()
        names, values = self._names, self._values
        self._names, self._values = [], []
        reason = self._reason.decode("latin-1")
        self._reason = b""
        if 100 <= status < 200 and status != 101:
            return  # informational: the real answer follows on this connection
        headers = from_wire(names, values)
        self._in_body = True
        # Read now: llhttp resets what it knows once the message is complete.
        self._keep_alive = self.parser.should_keep_alive()
        self._until_close = (
            status >= 200
            and status not in (204, 304)
            and "content-length" not in headers
            and "transfer-encoding" not in headers
        )
        resp = self.resp
        if resp is not None:
            resp._started(status, reason, headers)
            if self._head_only:
                # No body follows an answer to HEAD, whatever its headers say;
                # the parser cannot know, so this connection is not reused.
                self._broken = True
                self._complete = True

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is not None and not self._complete:
            resp._feed(body)

    def on_message_complete(self) -> None:
        if not self._in_body:
            return  # the end of an informational answer
        self._complete = True

    # internal

    def _done(self) -> None:
        resp = self.resp
        if resp is None:
            return
        self.resp = None
        resp._finished()
        self.resume()
        if self._broken or not self._keep_alive:
            self.close()
        else:
            self.client._release(self)

    def _fail(self, message: str) -> None:
        resp = self.resp
        self.resp = None
        name = self.client.upstream.name
        if resp is not None:
            exc: Exception
            if resp.status:
                exc = UpstreamDisconnectError(
                    f"the upstream broke off the response: {message}", upstream=name
                )
            else:
                exc = MalformedResponseError(
                    f"the upstream sent an invalid response: {message}", upstream=name
                )
            resp._broke(exc)
        self.close()


def _request_head(
    method: str, target: str, host_line: str, headers: Mapping[str, str]
) -> str:
    lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    # A value holding a line break would end the header early and let the rest
    # pose as headers of the proxy's own making.
    if lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
        raise MalformedRequestHeaders("a header holds a line break")
    return f"{method} {target or '/'} HTTP/1.1\r\n{host_line}{lines}"


class MalformedRequestHeaders(ValueError):
    """A header that cannot be written on the wire as it is."""


class Watchdog:
    """Idle-gap and total deadlines for a response body being relayed.

    The relay loop stamps ``ex.t_last_byte`` on every chunk anyway; the watchdog
    wakes rarely and compares against it, so the per-chunk path has no timer to
    reset. On expiry it fails the response's body with ``UpstreamTimeoutError``,
    which the pending read then raises.
    """

    __slots__ = ("_ex", "_handle", "_idle", "_loop", "_name", "_resp", "_total_at")

    def __init__(
        self,
        ex: Exchange,
        resp: UpstreamResponse,
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
        self._resp.fail(UpstreamTimeoutError(phase, message, upstream=self._name))


def _smallest(*values: float | None) -> float | None:
    present = [v for v in values if v]
    return min(present) if present else None


def new_clients(upstreams: Mapping[str, Upstream]) -> dict[str, UpstreamClient]:
    """A client per upstream; must be called with the event loop running."""
    return {name: UpstreamClient(u) for name, u in upstreams.items()}
