"""The forwarding handler: where a client's request becomes an upstream request
and the upstream's response flows back, chunk by chunk.

Per request: match a route (before reading the body, so unknown paths cost
nothing), read the body within the size limit, pick the route by model, send it
upstream, then relay the response. ``_relay`` holds the only per-chunk loop:
read, write to the client, hand a copy to the tap, stamp the time.

Cancellation: the server cancels the handler when the client disconnects. The
upstream response is then closed at once (a generation stops costing tokens)
and the exchange is still recorded, marked ``client_disconnect``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .auth import Authenticator
from .cache import CACHE_HEADER, Fill, ResponseCache
from .classify import classify_status
from .config import Config
from .dialects import dialect_for, inspect_request
from .dispatch import Dispatcher, Outgoing
from .errors import (
    ClientTimeoutError,
    NoRouteError,
    PayloadTooLargeError,
    ProxyError,
    UnauthorizedError,
    UpstreamTimeoutError,
    error_body,
)
from .exchange import Exchange
from .headers import client_response_headers
from .injection import UsageStripper
from .routing import Router, upstream_path
from .server import Reply, Request, StreamReply
from .tap import Tap
from .tracecontext import adopt_client_trace
from .upstream import UpstreamResponse, Watchdog

if TYPE_CHECKING:
    from .telemetry.tracing import Tracer

log = logging.getLogger(__name__)

Recorder = Callable[[Exchange], None]
_ID_PREFIX = os.urandom(4).hex()
# Enough arrival times for the time-per-chunk metric of a long answer, bounded.
_MAX_ARRIVALS = 8192
_MAX_ATTRIBUTION = 128
# Says which upstream answered, since a fallback may have.
UPSTREAM_HEADER = "x-llmproxy-upstream"


class Forwarder:
    """The proxy port's request handler."""

    def __init__(
        self,
        config: Config,
        dispatcher: Dispatcher,
        record: Recorder,
        tracer: Tracer | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.router = Router(config.routes)
        self.dispatcher = dispatcher
        self.record = record
        self.tracer = tracer
        self.max_body = config.server.max_body_bytes
        self.client_timeout = config.server.client_timeout
        self.auth = (
            Authenticator(config.server.auth) if config.server.auth.keys else None
        )
        self._seq = 0

    async def __call__(self, request: Request) -> Reply | StreamReply:
        self._seq += 1
        path, _, query = request.raw_path.partition("?")
        ex = Exchange(f"{_ID_PREFIX}{self._seq:x}", request.method, path)
        try:
            return await self._handle(request, ex, path, query)
        except ProxyError as exc:
            return _error_response(ex, exc)
        except asyncio.CancelledError:
            _client_went_away(ex)
            raise
        except Exception as exc:
            log.exception(
                "request.internal_error",
                extra={"fields": {"request_id": ex.request_id}},
            )
            return _error_response(
                ex, ProxyError(f"internal error: {type(exc).__name__}")
            )
        finally:
            ex.ended = time.perf_counter()
            self.record(ex)

    async def _handle(
        self, request: Request, ex: Exchange, path: str, query: str
    ) -> Reply | StreamReply:
        if self.tracer is not None:
            self.tracer.start(ex, request.headers)
        elif "traceparent" in request.headers:
            adopt_client_trace(ex, request.headers)
        if self.auth is not None:
            self.auth.check(request.headers)
        candidates = self.router.candidates(path)
        if not candidates:
            raise NoRouteError(f"no route for {path[:200]!r}")
        body = await _read_body(request, self.max_body, self.client_timeout)
        ex.bytes_in = len(body)
        ex.request_headers = request.headers
        payload = inspect_request(ex, body)
        route = self.router.choose(candidates, ex.request_model)
        if route is None:
            raise NoRouteError(
                f"no route for model {ex.request_model!r} on {path[:200]!r}"
            )

        ex.route = route.name
        ex.operation, dialect = dialect_for(
            self.dispatcher.clients[route.upstream].upstream.api, path
        )
        _attribution(ex, request.headers)
        if route.capture:
            ex.capture = True
            ex.request_body = body
        target = upstream_path(route, path)
        out = Outgoing(
            request.method,
            f"{target}?{query}" if query else target,
            request.headers,
            body,
            payload,
        )
        fill: Fill | None = None
        if route.cache is not None and self.cache is not None:
            upstream = self.dispatcher.clients[route.upstream].upstream
            entry, fill = await self.cache.lookup(ex, route, upstream, out)
            if entry is not None:
                hit = self.cache.response(ex, entry)
                hit.headers[UPSTREAM_HEADER] = entry.upstream
                return hit

        lease = await self.dispatcher.send(ex, route, out)
        try:
            return await self._relay(
                request, lease.resp, ex, dialect if ex.operation else None, fill
            )
        finally:
            if ex.status >= 400 and ex.error_type is None:
                ex.fail(classify_status(ex.status) or "upstream_4xx")
            lease.finish(ex, ex.error_type)

    async def _relay(
        self,
        request: Request,
        resp: UpstreamResponse,
        ex: Exchange,
        dialect: object,
        fill: Fill | None = None,
    ) -> StreamReply:
        """Stream the upstream response to the client as it arrives."""
        headers = client_response_headers(resp.headers)
        headers[UPSTREAM_HEADER] = ex.upstream or ""
        if ex.cache_result is not None:
            headers[CACHE_HEADER] = ex.cache_result
        out = StreamReply(resp.status, resp.reason, headers)
        tap = Tap(
            ex,
            dialect,  # type: ignore[arg-type]
            resp.headers.get("content-type", ""),
            resp.headers.get("content-encoding", ""),
        )
        timeouts = self.dispatcher.clients[ex.upstream or ""].upstream.timeouts
        # A body that came whole with the headers (most unary answers) has no
        # read left to time out.
        watchdog = (
            None
            if resp.at_eof()
            else Watchdog(ex, resp, timeouts.idle, timeouts.total, ex.upstream or "")
        )

        complete = False
        read = resp.read
        write = out.write
        feed = tap.feed
        strip = UsageStripper() if ex.usage_injected else None
        arrivals = ex.arrivals = [] if tap.streaming else None
        # A copy for the cache, of cacheable answers only; stored after the end.
        keep = fill.add if fill is not None and resp.status == 200 else None
        try:
            await out.prepare(request)
            while chunk := await read():
                if strip is None:
                    await write(chunk)
                    ex.bytes_out += len(chunk)
                elif edited := strip.feed(chunk):
                    await write(edited)
                    ex.bytes_out += len(edited)
                now = time.perf_counter()
                if ex.t_first_byte is None:
                    ex.t_first_byte = now
                ex.t_last_byte = now
                if arrivals is not None and len(arrivals) < _MAX_ARRIVALS:
                    arrivals.append(now)
                feed(chunk)
                if keep is not None:
                    keep(chunk)
            if strip is not None and (rest := strip.flush()):
                await write(rest)
                ex.bytes_out += len(rest)
            complete = True
        except asyncio.CancelledError:
            _client_went_away(ex)
            raise
        except UpstreamTimeoutError as exc:
            ex.fail(exc.error_type, exc.message)
            _abort(request)
        except ConnectionError as exc:
            if _client_gone(request):
                _client_went_away(ex)
            else:
                ex.fail(
                    "stream_truncated", f"the upstream broke off: {type(exc).__name__}"
                )
                _abort(request)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            tap.close(complete)
        if complete:
            try:
                await out.write_eof()
            except ConnectionError:
                _client_went_away(ex)
        if complete and fill is not None and self.cache is not None:
            self.cache.keep(fill, ex)
        return out


async def _read_body(request: Request, limit: int, within: float) -> bytes:
    """The request body; ``PayloadTooLargeError`` once it exceeds ``limit``, and
    ``ClientTimeoutError`` if it has not all arrived within ``within`` seconds."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLargeError(f"request body of {length} bytes exceeds {limit}")
    if request.body_complete():
        # The usual case for a small body: it came with the headers, so there is
        # nothing to wait for and no deadline to arm.
        body = request.take_body()
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        # A client trickling its body would otherwise hold a connection forever.
        async with asyncio.timeout(within):
            while chunk := await request.read():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ClientTimeoutError(
            f"request body not received within {within:g}s"
        ) from exc
    return b"".join(chunks)


def _error_response(ex: Exchange, exc: ProxyError) -> Reply:
    ex.status = exc.status
    ex.fail(exc.error_type, exc.message)
    headers = {"Content-Type": "application/json"}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, PayloadTooLargeError | ClientTimeoutError):
        # The unread rest of the body makes the connection unusable.
        headers["Connection"] = "close"
    return Reply(
        exc.status, error_body(exc.error_type, exc.message, exc.upstream), headers
    )


def _attribution(ex: Exchange, headers: Mapping[str, str]) -> None:
    """Tenant and prompt version as the client declared them, length-capped;
    a value that is not printable text is dropped, as if it had not been sent."""
    ex.tenant = _printable(headers.get("x-llmproxy-tenant"))
    ex.prompt_version = _printable(headers.get("x-llmproxy-prompt-version"))


def _printable(value: str | None) -> str | None:
    # Bytes that are not UTF-8 arrive as lone surrogates, which no UTF-8 sink
    # (the JSON log, the exposition, OTLP) can write; control characters would
    # split log lines. A mangled copy could pose as another tenant, so none.
    value = value[:_MAX_ATTRIBUTION] if value else None
    return value if value and value.isprintable() else None


def _client_went_away(ex: Exchange) -> None:
    ex.client_disconnected = True
    ex.fail("client_disconnect", "the client went away")


def _client_gone(request: Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort(request: Request) -> None:
    """End the client's connection without a clean end of body.

    The upstream broke off mid-body, so the client must see an incomplete
    response too (no final chunk, or fewer bytes than Content-Length), never a
    clean end that would pass a truncated answer off as whole.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
