"""The proxy port's HTTP/1.1 server: llhttp (httptools) behind an asyncio protocol.

One ``_Connection`` per client connection parses requests as they arrive and
runs the handler for one at a time, in order (pipelined requests wait their
turn). The handler gets a ``Request`` and answers with a ``Reply`` (a whole
body) or a ``StreamReply`` (a body written as it arrives). Writes made in one
turn of the event loop leave in one system call.

Refused before any handler runs, with 400 and a closed connection: whatever
llhttp rejects (smuggling shapes among them: Content-Length with
Transfer-Encoding, repeated lengths, bad chunk sizes), a request line or header
over 8 KiB, more than 128 headers, two Host headers, and any version but 1.x.

Cancellation: a client that disconnects cancels its running handler, as
aiohttp's ``handler_cancellation`` does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .headers import from_wire

log = logging.getLogger(__name__)

_MAX_LINE = 8190  # as aiohttp, nginx and most servers
_MAX_HEADERS = 128
_QUEUE = 8  # parsed requests waiting before the connection stops reading
_BODY_HIGH_WATER = 1024 * 1024  # unread body bytes before reading pauses


class Request:
    """A client's request: the head parsed, the body arriving or arrived."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_eof",
        "_queued",
        "_waiter",
        "content_length",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "version",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        raw_path: str,
        version: str,
        headers: CIMultiDict[str],
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = CIMultiDictProxy(headers)
        self.keep_alive = keep_alive
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None else None
        self.expect_continue = headers.get("expect", "").lower() == "100-continue"
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    def body_complete(self) -> bool:
        return self._eof

    def take_body(self) -> bytes:
        """What has arrived of the body, all in one piece."""
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._queued = 0
        return body

    async def read(self) -> bytes:
        """The next piece of the body; ``b""`` at its end (or if the client
        left: the handler is then being cancelled)."""
        if self.expect_continue:
            self.expect_continue = False
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self._chunks:
            if self._eof or self._conn.lost:
                return b""
            self._waiter = waiter = self._conn.loop.create_future()
            self._conn.resume()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        return chunk

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._queued += len(chunk)
        if self._queued > _BODY_HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _end(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Reply:
    """A whole answer, written at once after the handler returns."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        self.status = status
        self.reason = reason or _phrase(status)
        self.headers: CIMultiDict[str] = CIMultiDict(headers or {})
        self.body = body


class StreamReply:
    """An answer whose body is written as it arrives.

    ``prepare`` fixes the head; ``write`` sends a piece (chunked, unless the
    headers give a Content-Length); ``write_eof`` ends the body. A reply left
    without ``write_eof`` ends its connection, so the client sees it cut.
    """

    __slots__ = (
        "_chunked",
        "_conn",
        "_head",
        "closes",
        "finished",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, status: int, reason: str | None, headers: CIMultiDict[str]
    ) -> None:
        self.status = status
        self.reason = reason or _phrase(status)
        self.headers = headers
        self._conn: _Connection | None = None
        self._head = b""
        self._chunked = False
        self.closes = False
        self.finished = False

    async def prepare(self, request: Request) -> None:
        conn = request._conn
        self._conn = conn
        self._head, self._chunked, self.closes = conn.head(
            request, self.status, self.reason, self.headers
        )
        # Sent with the first piece of the body, in one write.

    async def write(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        head, self._head = self._head, b""
        if self._chunked:
            conn.write(b"%s%x\r\n%s\r\n" % (head, len(data), data))
        else:
            conn.write(head + data if head else data)
        if conn.write_paused:
            await conn.drain()

    async def write_eof(self) -> None:
        conn = self._conn
        assert conn is not None
        head, self._head = self._head, b""
        conn.write(head + b"0\r\n\r\n" if self._chunked else head)
        self.finished = True
        if conn.write_paused:
            await conn.drain()


Handler = Callable[[Request], Awaitable[Reply | StreamReply]]


class ProxyServer:
    """Serves ``handler`` on connections made by ``loop.create_server(server)``."""

    def __init__(self, handler: Handler, client_timeout: float) -> None:
        self.handler = handler
        self.client_timeout = client_timeout
        self.connections: set[_Connection] = set()
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> _Connection:
        if self._sweeper is None:
            self._sweep()
        return _Connection(self)

    def _sweep(self) -> None:
        """Close connections idle or stuck in a request's head past the timeout:
        one timer for the server, not one per request."""
        now = time.monotonic()
        for conn in list(self.connections):
            if (
                conn.idle_since is not None
                and now - conn.idle_since > self.client_timeout
            ):
                conn.close()
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(min(self.client_timeout / 4, 1.0), self._sweep)

    async def shutdown(self, grace: float) -> None:
        """Close idle connections, let running handlers finish within ``grace``,
        then cancel the rest and close everything."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + grace
        while True:
            busy = [c for c in self.connections if c.task is not None]
            for conn in list(self.connections):
                if conn.task is None:
                    conn.close()
            if not busy or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for conn in list(self.connections):
            conn.close()


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, run the handler, write."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.task: asyncio.Task[None] | None = None
        self.queue: deque[Request | None] = deque()  # None: a malformed request
        self.current: Request | None = None  # the request being parsed
        self.idle_since: float | None = time.monotonic()
        self.lost = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._read_paused = False
        self._url = b""
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._refused = False
        self._why = ""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        if self.server.closing:
            self.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # after a request the connection will not serve: dropped
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse("HttpParserUpgrade")
        except httptools.HttpParserError as exc:
            self._refuse(self._why or type(exc).__name__)
        if self.task is None and self.queue:
            self._next()
        if len(self.queue) > _QUEUE:
            self.pause()

    def eof_received(self) -> bool | None:
        # The end of what the client sends is taken as the client leaving, as
        # aiohttp does: a generation nobody will read must stop at once.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self.current is not None:
            self.current._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))
            self._drain.exception()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._names, self._values = [], []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > _MAX_LINE:
            self._why = "request line too long"
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > _MAX_LINE or len(self._names) >= _MAX_HEADERS:
            self._why = "headers too large"
            raise _Refused
        self._names.append(name)
        self._values.append(value)

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._why = "unsupported HTTP version"
            raise _Refused
        headers = from_wire(self._names, self._values)
        if len(headers.getall("host", ())) > 1:
            self._why = "two Host headers"
            raise _Refused
        codings = headers.getall("transfer-encoding", ())
        if codings and [c.strip().lower() for c in codings] != ["chunked"]:
            # Only chunked is a framing both ends agree on; anything else is how
            # a request gets read two ways (RFC 9112 section 6.1).
            self._why = "unsupported transfer coding"
            raise _Refused
        request = Request(
            self,
            parser.get_method().decode("latin-1"),
            self._url.decode("utf-8", "surrogateescape"),
            version,
            headers,
            parser.should_keep_alive(),
        )
        self.current = request
        # Served once this read is parsed: a body that came with the head is
        # whole by then, and a malformed one is refused before anyone acts on it.
        self.queue.append(request)

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current._feed(body)

    def on_message_complete(self) -> None:
        if self.current is not None:
            self.current._end()
            self.current = None

    # serving

    def _refuse(self, why: str) -> None:
        """A malformed request: answered 400 in its turn, and nothing after."""
        self._refused = True
        # The kind of error only: the bytes may hold a credential.
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.info(
            "request.malformed",
            extra={"fields": {"remote": peer and peer[0], "status": 400, "error": why}},
        )
        current, self.current = self.current, None
        if current is not None and current in self.queue:
            self.queue.remove(current)  # its body is bad: it is never served
        elif current is not None:
            # Its handler is reading the body: nothing has gone upstream yet.
            # Answering ends the connection, which cancels the handler.
            self._bad_request()
            self.close()
            return
        self.queue.append(None)

    def _next(self) -> None:
        if self.lost:
            return
        if not self.queue:
            self.task = None
            self.idle_since = time.monotonic()
            self.resume()
            return
        request = self.queue.popleft()
        self.idle_since = None
        if request is None:
            self._bad_request()
            self.close()
            return
        self.task = self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        keep = False
        try:
            reply = await self.server.handler(request)
            keep = self._finish(request, reply)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("server.handler_failed")
        self.task = None
        if not keep or self.lost:
            self.close()
        else:
            self._next()

    def _finish(self, request: Request, reply: Reply | StreamReply) -> bool:
        """Write a whole reply; True if the connection can serve another."""
        if isinstance(reply, StreamReply):
            return reply.finished and not reply.closes
        body = b"" if request.method == "HEAD" else reply.body
        reply.headers["Content-Length"] = str(len(reply.body))
        keep = (
            request.keep_alive
            and not self._closes(reply.headers)
            and request.body_complete()
        )
        head = self.head_bytes(reply.status, reply.reason, reply.headers, not keep)
        self.write(head + body)
        return keep

    def _closes(self, headers: Mapping[str, str]) -> bool:
        return self.server.closing or headers.get("connection", "").lower() == "close"

    def head(
        self, request: Request, status: int, reason: str, headers: CIMultiDict[str]
    ) -> tuple[bytes, bool, bool]:
        """A streamed reply's head, whether its body is chunked, and whether the
        connection closes after it."""
        no_body = request.method == "HEAD" or status in (204, 304) or status < 200
        chunked = not no_body and "content-length" not in headers
        close = not request.keep_alive or self._closes(headers)
        if chunked and request.version == "1.0":
            chunked, close = False, True  # the end of the body is the close
        head = self.head_bytes(status, reason, headers, close, chunked)
        return head, chunked, close

    def head_bytes(
        self,
        status: int,
        reason: str,
        headers: Mapping[str, str],
        close: bool,
        chunked: bool = False,
    ) -> bytes:
        """A reply's head, with chunked transfer coding if ``chunked``."""
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in _OWN]
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        if close:
            lines.append("Connection: close\r\n")
        if "date" not in headers:
            lines.append(f"Date: {_date()}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _bad_request(self) -> None:
        self.write(self.head_bytes(400, "Bad Request", _BAD_REQUEST, True))

    # writing

    def write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in this loop turn leaves together."""
        if self.lost:
            raise ConnectionResetError("the client went away")
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if out and self.transport is not None and not self.lost:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client went away")
        if self._drain is None:
            self._drain = self.loop.create_future()
        await self._drain

    def pause(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if (
            self._read_paused
            and self.transport is not None
            and len(self.queue) <= _QUEUE
        ):
            self._read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()


class _Refused(Exception):
    """Raised inside a parser callback: llhttp stops and the request gets 400."""


# Set by the server from what it sends, never copied from a handler's headers.
_OWN = frozenset({"connection", "transfer-encoding", "keep-alive"})
_BAD_REQUEST = CIMultiDict({"Content-Type": "text/plain", "Content-Length": "0"})
_date_cache = (0, "")


def _date() -> str:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
