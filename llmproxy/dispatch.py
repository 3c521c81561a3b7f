"""Dispatch: which upstream answers a request, after how many tries.

``Dispatcher.send`` tries the route's upstream, then its fallbacks in order
(only those speaking the same dialect, which can serve the request unchanged).
On each upstream: the breaker admits the request or refuses it at once, the
concurrency limiter gives it a slot or a place in a bounded queue, and failures
that are safe to retry are retried within the retry budget. It returns a
``Lease``: the response whose headers have arrived, which the caller relays and
then ``finish``es, releasing the slot and telling the breaker how it went.

Nothing has been sent to the client while this runs, which is what makes
retries and fallbacks safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy

from .breaker import Breaker
from .classify import classify_status
from .config import Route
from .errors import ProxyError
from .exchange import Attempt, Exchange
from .headers import upstream_request_headers
from .injection import inject_usage
from .limiter import Limiter
from .retry import RetryBudget, error_delay, retry_delay
from .upstream import UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    from .telemetry.tracing import Tracer

log = logging.getLogger(__name__)

# Responses worth trying the next upstream for, once this one's tries are spent.
_FALL_BACK_STATUS = frozenset({429, 500, 502, 503, 504, 529})


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What the client asked for, ready to send to any upstream of the route."""

    method: str
    path: str  # the upstream path and query, after any strip_prefix
    client_headers: CIMultiDictProxy[str]
    body: bytes
    payload: Any  # the parsed JSON body, or None


class Lease:
    """A response being relayed, holding its upstream's concurrency slot."""

    __slots__ = ("attempt", "breaker", "client", "limiter", "resp", "trial")

    def __init__(
        self,
        client: UpstreamClient,
        resp: UpstreamResponse,
        attempt: Attempt,
        trial: bool,
        limiter: Limiter,
        breaker: Breaker,
    ) -> None:
        self.client = client
        self.resp = resp
        self.attempt = attempt
        self.trial = trial
        self.limiter = limiter
        self.breaker = breaker

    def finish(self, ex: Exchange, error_type: str | None) -> None:
        """The relay is over: close, free the slot, tell the breaker."""
        attempt = self.attempt
        if attempt.ended is None:
            attempt.ended = time.perf_counter()
        attempt.error_type = error_type
        self.resp.close()
        self.limiter.release()
        self.breaker.record(self.trial, error_type, attempt.status)


class Dispatcher:
    """Breakers, limits, retries and fallbacks across the configured upstreams."""

    def __init__(
        self,
        clients: Mapping[str, UpstreamClient],
        tracer: Tracer | None = None,
        on_breaker_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.clients = clients
        self.tracer = tracer
        self.breakers = {
            name: Breaker(name, c.upstream.breaker, on_breaker_change)
            for name, c in clients.items()
        }
        self.limiters = {
            name: Limiter(name, c.upstream.max_concurrency, c.upstream.max_queue)
            for name, c in clients.items()
        }
        self.budgets = {name: RetryBudget() for name in clients}
        # Upstreams seen to reject stream_options: usage is not injected there.
        self.no_injection: set[str] = set()

    def candidates(self, route: Route) -> list[UpstreamClient]:
        """The route's upstream, then its fallbacks (of the same dialect: the
        configuration refuses any other), each once."""
        found = [self.clients[route.upstream]]
        for name in route.fallbacks:
            client = self.clients[name]
            if client not in found:
                found.append(client)
        return found

    async def send(self, ex: Exchange, route: Route, out: Outgoing) -> Lease:
        """The response to relay; the last ``ProxyError`` if none could be had.

        An upstream's 429 or 5xx answer is held, unread, while the fallbacks are
        tried: if none of them answers at all, the client gets that answer, as it
        would have without fallbacks, rather than a proxy error.
        """
        candidates = self.candidates(route)
        error: ProxyError | None = None
        held: tuple[Lease, int] | None = None
        try:
            for position, client in enumerate(candidates):
                _select(ex, client)
                try:
                    lease = await self._upstream(ex, client, out)
                except ProxyError as exc:
                    error = exc
                    continue
                last = position == len(candidates) - 1
                if last or lease.resp.status not in _FALL_BACK_STATUS:
                    ex.fallback = position > 0
                    if held is not None:
                        held[0].finish(ex, classify_status(held[0].resp.status))
                        held = None
                    return lease
                if held is not None:
                    held[0].finish(ex, classify_status(held[0].resp.status))
                held = (lease, position)
                lease.attempt.ended = time.perf_counter()
                lease.attempt.error_type = classify_status(lease.resp.status)
        except BaseException:
            if held is not None:
                held[0].finish(ex, classify_status(held[0].resp.status))
            raise
        if held is not None:
            lease, position = held
            _select(ex, lease.client)
            _restore(ex, lease)
            lease.attempt.ended = lease.attempt.error_type = None
            # The attempt that answered is the last, as telemetry expects.
            ex.attempts.remove(lease.attempt)
            ex.attempts.append(lease.attempt)
            ex.fallback = position > 0
            return lease
        assert error is not None
        raise error

    async def _upstream(
        self, ex: Exchange, client: UpstreamClient, out: Outgoing
    ) -> Lease:
        """Try one upstream, retrying what is safe to retry."""
        name = client.upstream.name
        breaker, limiter, budget = (
            self.breakers[name],
            self.limiters[name],
            self.budgets[name],
        )
        settings = client.upstream.retries
        budget.deposit()
        number = 0
        while True:
            number += 1
            trial = breaker.admit()
            try:
                waited = await _acquire(limiter)
            except BaseException:
                breaker.record(trial, "queue_full", 0)  # neutral: frees the trial
                raise
            try:
                resp = await self._attempt(ex, client, out, waited)
            except ProxyError as exc:
                limiter.release()
                breaker.record(trial, exc.error_type, 0)
                delay = error_delay(settings, number, exc)
                if delay is None or not budget.withdraw():
                    raise
                await asyncio.sleep(delay)
                continue
            except BaseException:
                limiter.release()
                breaker.record(trial, "client_disconnect", 0)
                raise
            lease = Lease(client, resp, ex.attempts[-1], trial, limiter, breaker)
            if resp.status < 400:
                return lease
            delay = retry_delay(settings, number, None, resp.status, resp.headers)
            if delay is None or not budget.withdraw():
                return lease
            lease.finish(ex, classify_status(resp.status))
            await asyncio.sleep(delay)

    async def _attempt(
        self, ex: Exchange, client: UpstreamClient, out: Outgoing, waited: float
    ) -> UpstreamResponse:
        """One request to one upstream, with usage injected where it applies."""
        upstream = client.upstream
        headers = upstream_request_headers(out.client_headers, upstream.headers)
        body = out.body
        ex.usage_injected = False
        if upstream.name not in self.no_injection:
            injected = inject_usage(ex, upstream, out.payload)
            if injected is not None:
                body = injected
                headers["Accept-Encoding"] = "identity"
        resp = await self._send(ex, client, out, headers, body, waited)
        if not ex.usage_injected or resp.status != 400:
            return resp
        # Some OpenAI-compatible servers refuse stream_options. The client must
        # not get an error it would not have had without the proxy; a 400 costs
        # nothing, so resend its own request, and if that works, stop injecting.
        resp.close()
        ex.attempts[-1].ended = time.perf_counter()
        ex.attempts[-1].error_type = "upstream_4xx"
        ex.usage_injected = False
        headers = upstream_request_headers(out.client_headers, upstream.headers)
        resp = await self._send(ex, client, out, headers, out.body, 0.0)
        if resp.status < 400:
            self.no_injection.add(upstream.name)
            _log_injection_rejected(upstream.name)
        return resp

    async def _send(
        self,
        ex: Exchange,
        client: UpstreamClient,
        out: Outgoing,
        headers: CIMultiDict[str],
        body: bytes,
        waited: float,
    ) -> UpstreamResponse:
        attempt = Attempt(client.upstream.name, client.host, client.port)
        attempt.queue_wait = waited
        ex.attempts.append(attempt)
        if self.tracer is not None:
            self.tracer.inject(ex, attempt, headers)
        ex.t_sent = attempt.started
        try:
            resp = await client.send(out.method, out.path, headers, body, ex)
        except ProxyError as exc:
            attempt.ended = time.perf_counter()
            attempt.error_type = exc.error_type
            raise
        attempt.t_headers = ex.t_headers = time.perf_counter()
        attempt.status = ex.status = resp.status
        ex.response_headers = resp.headers
        ex.upstream_request_id = resp.headers.get("x-request-id") or resp.headers.get(
            "request-id"
        )
        return resp

    def close(self) -> None:
        for breaker in self.breakers.values():
            breaker.close()


def _select(ex: Exchange, client: UpstreamClient) -> None:
    upstream = client.upstream
    ex.upstream, ex.provider, ex.api = upstream.name, upstream.provider, upstream.api


def _restore(ex: Exchange, lease: Lease) -> None:
    """Make a held answer the exchange's response again."""
    resp = lease.resp
    ex.status = resp.status
    ex.t_headers = lease.attempt.t_headers
    ex.response_headers = resp.headers
    ex.upstream_request_id = resp.headers.get("x-request-id") or resp.headers.get(
        "request-id"
    )


async def _acquire(limiter: Limiter) -> float:
    """Take a concurrency slot; return how long the request waited for it."""
    if limiter.try_acquire():
        return 0.0
    started = time.perf_counter()
    await limiter.acquire()
    return time.perf_counter() - started


def _log_injection_rejected(upstream: str) -> None:
    log.warning("usage.injection_rejected", extra={"fields": {"upstream": upstream}})
