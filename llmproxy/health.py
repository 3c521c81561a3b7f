"""Upstream health: degraded is not dead.

Each upstream is ``UP``, ``DEGRADED`` or ``DOWN``, from two kinds of signal:

- active: a probe on its own schedule (with jitter, never on the request path;
  each probe runs in its own task, so a hung one never delays the next, and is
  cut by its timeout). By
  default ``GET /v1/models``, which both dialects serve and neither bills. Any
  HTTP answer below 500, even 401 from a probe without credentials, shows the
  provider is reachable. An optional streaming probe (``stream_model``) measures
  time to first token with a one-token completion; it costs tokens, so it is
  off by default;
- passive: real traffic's outcomes within ``window`` (faults, p99 latency), the
  breaker's state and the provider's rate-limit headroom.

``DOWN``: the breaker is open, or the last probe failed. ``DEGRADED``: the
breaker is half-open after opening within ``window``, the probe was slower than
``degraded_latency``, the last streaming probe failed, recent traffic failed
more than ``error_ratio``, or rate-limit headroom is under ``min_headroom``.
Signals older than ``window`` age out, so an idle upstream is not held down by
an old failure: a breaker that opened longer ago than that and waits, half-open,
for a request to try is shown in the report but no longer degrades the status.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import aiohttp

from .breaker import FAULTS, Breaker
from .config import Upstream
from .exchange import Exchange
from .ratelimits import read_rate_limits

log = logging.getLogger(__name__)

UP, DEGRADED, DOWN = "UP", "DEGRADED", "DOWN"
_RANK = {UP: 0, DEGRADED: 1, DOWN: 2}
_MAX_OUTCOMES = 2048  # recent outcomes kept per upstream, for ratio and p99
_MIN_SAMPLES = 5  # fewer recent requests than this say nothing about a ratio
EVALUATE_EVERY = 1.0  # seconds between status evaluations
_HEADROOM_EVERY = 0.25  # rate-limit headers are read at most this often


class UpstreamHealth:
    """What is known about one upstream, and the status it adds up to."""

    def __init__(self, upstream: Upstream, breaker: Breaker) -> None:
        self.upstream = upstream
        self.breaker = breaker
        self.status = UP
        self.reasons: list[str] = []
        self.since = time.time()
        # (monotonic time, fault, seconds) per finished attempt
        self.outcomes: deque[tuple[float, bool, float]] = deque(maxlen=_MAX_OUTCOMES)
        self.probe: dict[str, Any] | None = None
        self.stream_probe: dict[str, Any] | None = None
        self.headroom: dict[str, float] = {}
        self.headroom_at = 0.0
        self._headroom_checked = 0.0
        self.last_error: dict[str, Any] | None = None

    def observe(self, ex: Exchange) -> None:
        """Passive signals from one finished exchange's attempts."""
        now = time.monotonic()
        for attempt in ex.attempts:
            if attempt.upstream != self.upstream.name:
                continue
            fault = attempt.error_type in FAULTS or attempt.status >= 500
            ended = attempt.ended or ex.ended or attempt.started
            self.outcomes.append((now, fault, ended - attempt.started))
            if fault:
                self.last_error = {
                    "error_type": attempt.error_type or f"http_{attempt.status}",
                    "status": attempt.status,
                    "at": time.time(),
                }
        if (
            ex.upstream == self.upstream.name
            and ex.response_headers is not None
            and now - self._headroom_checked >= _HEADROOM_EVERY
        ):
            self._headroom_checked = now
            self._headroom(ex.response_headers, now)

    def _headroom(self, headers: Mapping[str, str], now: float) -> None:
        found = {
            resource: remaining / limit
            for resource, limit, remaining, _ in read_rate_limits(headers)
            if limit and remaining is not None
        }
        if found:
            self.headroom, self.headroom_at = found, now

    def evaluate(self) -> tuple[str, list[str]]:
        """The status and the reasons for it, from the signals still current."""
        settings = self.upstream.health
        now = time.monotonic()
        down: list[str] = []
        degraded: list[str] = []

        state = self.breaker.state
        if state == "open":
            down.append("circuit breaker open")
        elif state == "half_open" and self._recent(self.breaker.opened_at, now):
            degraded.append("circuit breaker half-open")

        self._probe_signals(now, down, degraded)

        ratio, count = self.fault_ratio(now)
        if count >= _MIN_SAMPLES and ratio > settings.error_ratio:
            degraded.append(f"{ratio:.0%} of {count} recent requests failed")

        if self.headroom and now - self.headroom_at <= settings.window:
            resource, left = min(self.headroom.items(), key=lambda item: item[1])
            if left < settings.min_headroom:
                degraded.append(f"rate limit: {left:.0%} of {resource} left")

        if down:
            return DOWN, down + degraded
        return (DEGRADED, degraded) if degraded else (UP, [])

    def _probe_signals(self, now: float, down: list[str], degraded: list[str]) -> None:
        """Reasons from the probes' last results, while they are current."""
        latency = self.upstream.health.degraded_latency
        probe = self.probe
        if probe is not None and self._recent(probe["monotonic"], now):
            if not probe["ok"]:
                down.append(f"probe failed: {probe['error']}")
            elif probe["latency_s"] > latency:
                degraded.append(
                    f"probe took {probe['latency_s']:.2f}s (over {latency:g}s)"
                )
        # A failed one-token completion with the provider reachable is a model,
        # quota or capacity problem: degraded, not down.
        stream = self.stream_probe
        if stream and not stream["ok"] and self._recent(stream["monotonic"], now):
            degraded.append(f"stream probe failed: {stream['error']}")

    def _recent(self, at: float | None, now: float) -> bool:
        return at is not None and now - at <= self.upstream.health.window

    def fault_ratio(self, now: float) -> tuple[float, int]:
        """Recent fault ratio and request count, within the window."""
        horizon = now - self.upstream.health.window
        count = faults = 0
        for at, fault, _ in reversed(self.outcomes):
            if at < horizon:
                break
            count += 1
            faults += fault
        return (faults / count if count else 0.0), count

    def traffic(self, now: float | None = None) -> tuple[float, int, float | None]:
        """Recent fault ratio, request count and p99 seconds, within the window."""
        now = time.monotonic() if now is None else now
        horizon = now - self.upstream.health.window
        recent = [o for o in self.outcomes if o[0] >= horizon]
        if not recent:
            return 0.0, 0, None
        faults = sum(1 for o in recent if o[1])
        durations = sorted(o[2] for o in recent)
        p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))]
        return faults / len(recent), len(recent), p99

    def report(self) -> dict[str, Any]:
        ratio, count, p99 = self.traffic()
        return {
            "status": self.status,
            "reasons": self.reasons,
            "since": self.since,
            "url": self.upstream.url,
            "api": self.upstream.api,
            "breaker": self.breaker.state,
            "probe": _public(self.probe),
            "stream_probe": _public(self.stream_probe),
            "recent": {
                "requests": count,
                "error_ratio": round(ratio, 4),
                "p99_s": None if p99 is None else round(p99, 4),
            },
            "ratelimit_headroom": {k: round(v, 4) for k, v in self.headroom.items()},
            "last_error": self.last_error,
        }


class HealthMonitor:
    """Health of every upstream: probes on a schedule, passive signals, status."""

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        breakers: Mapping[str, Breaker],
        on_change: Callable[[str, str], None] | None = None,
        on_probe: Callable[[str, str, float, bool], None] | None = None,
    ) -> None:
        self.upstreams = {
            name: UpstreamHealth(u, breakers[name]) for name, u in upstreams.items()
        }
        self._on_change = on_change
        self._on_probe = on_probe
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: set[asyncio.Task[None]] = set()  # probes in flight
        self._session: aiohttp.ClientSession | None = None

    def observe(self, ex: Exchange) -> None:
        """A recorder sink: note passive signals; status is re-evaluated each second."""
        if ex.upstream is None:
            return
        for name in {a.upstream for a in ex.attempts}:
            health = self.upstreams.get(name)
            if health is not None:
                health.observe(ex)

    def refresh(self, health: UpstreamHealth) -> str:
        status, reasons = health.evaluate()
        health.reasons = reasons
        if status != health.status:
            previous, health.status, health.since = health.status, status, time.time()
            level = logging.INFO if status == UP else logging.WARNING
            log.log(level, "upstream.health.changed", extra={"fields": {
                "upstream": health.upstream.name, "from": previous, "to": status,
                "reasons": reasons,
            }})  # fmt: skip
            if self._on_change is not None:
                self._on_change(health.upstream.name, status)
        return status

    def report(self) -> dict[str, Any]:
        """The ``/health`` document's upstream part, and the overall status."""
        upstreams = {}
        overall = UP
        for name, health in self.upstreams.items():
            status = self.refresh(health)
            upstreams[name] = health.report()
            if _RANK[status] > _RANK[overall]:
                overall = status
        return {"status": overall, "upstreams": upstreams}

    def start(self) -> None:
        """Start the probe schedules; needs a running event loop."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._tasks.append(asyncio.create_task(self._evaluate()))
        for health in self.upstreams.values():
            settings = health.upstream.health
            if _probe_path(health.upstream):
                run = functools.partial(self.probe, health)
                self._tasks.append(
                    asyncio.create_task(self._every(settings.interval, run))
                )
            if settings.stream_model:
                run = functools.partial(self.probe_stream, health)
                every = self._every(settings.stream_interval, run)
                self._tasks.append(asyncio.create_task(every))

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._probes]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    async def _evaluate(self) -> None:
        """Re-evaluate every upstream once a second, so transitions (an aged-out
        signal, the breaker's timed half-open) are noticed without traffic and
        without work on every request."""
        while True:
            await asyncio.sleep(EVALUATE_EVERY)
            for health in self.upstreams.values():
                self.refresh(health)

    async def _every(
        self, interval: float, run: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """Start ``run`` every ``interval`` (with 10% jitter), each in its own task.

        A probe never waits for the one before: with a timeout longer than the
        interval, a hung provider has a few probes in flight, each cut by its
        timeout, and a recovered one is seen at the next tick.
        """
        await asyncio.sleep(random.uniform(0, min(interval, 1.0)))
        while True:
            task = asyncio.create_task(run())
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def probe(self, health: UpstreamHealth) -> None:
        """One probe of one upstream; records the result, never raises."""
        upstream = health.upstream
        assert self._session is not None
        url = upstream.url + _probe_path(upstream)
        begun = time.monotonic()
        started = time.perf_counter()
        ok, error, status = True, None, 0
        try:
            async with asyncio.timeout(upstream.health.timeout):
                async with self._session.get(url, headers=dict(upstream.headers)) as r:
                    status = r.status
                    await r.read()
            if status >= 500:
                ok, error = False, f"HTTP {status}"
        except TimeoutError:
            ok, error = False, f"no answer within {upstream.health.timeout:g}s"
        except aiohttp.ClientError as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"[:200]
        latency = time.perf_counter() - started
        result = {
            "ok": ok,
            "status": status,
            "latency_s": round(latency, 4),
            "error": error,
            "at": time.time(),
            "monotonic": time.monotonic(),
        }
        if _newer(health.probe, begun):
            health.probe = {**result, "begun": begun}
        self._probed(health, "models", result)

    async def probe_stream(self, health: UpstreamHealth) -> None:
        """One streaming probe of one upstream; records the result, never raises."""
        from .probe import stream_probe  # aiohttp-sse-client only where it is used

        assert self._session is not None
        begun = time.monotonic()
        result = await stream_probe(self._session, health.upstream)
        if _newer(health.stream_probe, begun):
            health.stream_probe = {**result, "begun": begun}
        self._probed(health, "stream", result)

    def _probed(
        self, health: UpstreamHealth, kind: str, result: dict[str, Any]
    ) -> None:
        if not result["ok"]:
            health.last_error = {
                "error_type": "probe" if kind == "models" else "stream_probe",
                "error": result["error"],
                "at": result["at"],
            }
        if self._on_probe is not None:
            self._on_probe(
                health.upstream.name, kind, result["latency_s"], result["ok"]
            )
        self.refresh(health)


def _probe_path(upstream: Upstream) -> str:
    path = upstream.health.path
    return "/v1/models" if path is None else path


def _newer(current: dict[str, Any] | None, begun: float) -> bool:
    """Whether a probe begun at ``begun`` is the latest: an overtaken one is not."""
    return current is None or current["begun"] <= begun


def _public(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    if probe is None:
        return None
    return {k: v for k, v in probe.items() if k not in ("monotonic", "begun")}
