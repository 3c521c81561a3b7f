"""Prometheus metrics: where every metric is born.

``Metrics`` registers the GenAI semconv histograms (named as the OpenTelemetry
Prometheus exporter renders them) and the ``llmproxy_*`` families on a registry
it is given, so each test can use a fresh one. ``Metrics.observe`` is a
recorder sink: it runs after the request, never on the per-chunk path.

Every label is bounded: routes and upstreams come from config, error types and
anomaly kinds from closed vocabularies, and models through ``BoundedLabel``.

prometheus_client takes a lock on every ``inc`` and walks the buckets in Python
on every ``observe``: some 30 times per exchange. ``observe`` therefore counts
into plain Python tallies, one per child, and ``Tallies.fold`` writes their
totals into the children in bulk: before every collection of the registry, in
``sync``, and with worker processes (where ``/metrics`` reads other processes'
files) within ``FOLD_EVERY`` of a count and at exit. A tally adds up its values
in the same order as the child would, so the exposition is the same.
"""

from __future__ import annotations

import asyncio
import atexit
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from ..anomalies import anomalies
from ..breaker import STATE_VALUES
from ..config import Config
from ..exchange import TOKEN_FIELDS, Attempt, Exchange
from ..limiter import Limiter
from ..pricing import PriceTable
from ..ratelimits import read_rate_limits, retry_after_seconds

if TYPE_CHECKING:
    from ..cache import ResponseCache
    from .tracing import Tracer

# Bucket boundaries from the OpenTelemetry GenAI semantic conventions.
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
    81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
    67108864,
)  # fmt: skip
CHUNK_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
FIRST_CHUNK_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0,
)  # fmt: skip
# The proxy's own share is sub-millisecond when healthy: finer buckets there.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

RATE_LIMITS_EVERY = 0.25  # seconds between readings of one upstream's headers
# With worker processes, the longest a count waits before it reaches the shared
# files that worker 0's /metrics adds up.
FOLD_EVERY = 0.1

GENAI_LABELS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "route",
    "upstream",
)
OTHER = "other"


class BoundedLabel:
    """A label whose distinct values are capped; later newcomers become ``other``."""

    __slots__ = ("_limit", "_overflow", "_seen")

    def __init__(self, limit: int, overflow: Counter | None = None) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._overflow = overflow

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        if self._overflow is not None:
            self._overflow.inc()
        return OTHER


class Tallies:
    """The tallies counted since the last fold; a collector that folds them.

    Registered first on the registry, its ``collect`` runs before any family's,
    so every exposition shows every count. Everything here runs on the event
    loop (or at exit, after it): the tallies need no lock.
    """

    def __init__(self, fold_every: float | None = None) -> None:
        self.pending: list[Count | Buckets] = []
        self._fold_every = fold_every
        self._timer: asyncio.TimerHandle | None = None

    def add(self, tally: Count | Buckets) -> None:
        self.pending.append(tally)
        if self._fold_every is not None and self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to wait on: fold at once
                self.fold()
                return
            self._timer = loop.call_later(self._fold_every, self.fold)

    def fold(self) -> None:
        """Write every pending tally's totals into its child."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, []
        for tally in pending:
            tally.fold()

    def collect(self) -> Iterable[Metric]:
        self.fold()
        return ()


class Count:
    """A counter child's running total, written into the child when folded."""

    __slots__ = ("_child", "_tallies", "pending", "value")

    def __init__(self, child: Any, tallies: Tallies) -> None:
        self._child = child
        self._tallies = tallies
        self.value: float = child._value.get()
        self.pending = False

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # as Counter.inc refuses it
            raise ValueError(
                "Counters can only be incremented by non-negative amounts."
            )
        self.value += amount
        if not self.pending:
            self.pending = True
            self._tallies.add(self)

    def fold(self) -> None:
        self.pending = False
        self._child._value.set(self.value)


class Buckets:
    """A histogram child's bucket counts and sum, written into it when folded."""

    __slots__ = ("_bounds", "_child", "_tallies", "counts", "pending", "sum")

    def __init__(self, child: Any, tallies: Tallies) -> None:
        self._child = child
        self._tallies = tallies
        self._bounds: list[float] = child._upper_bounds
        self.counts: list[float] = [bucket.get() for bucket in child._buckets]
        self.sum: float = child._sum.get()
        self.pending = False

    def observe(self, amount: float) -> None:
        self.sum += amount
        # The first bucket whose bound is at least the amount, as Histogram.observe
        # finds it; NaN is in none.
        if amount == amount:
            self.counts[bisect_left(self._bounds, amount)] += 1
        if not self.pending:
            self.pending = True
            self._tallies.add(self)

    def observe_gaps(self, times: list[float], start: float) -> None:
        """Observe the gaps between successive ``times`` from ``start`` on: one
        call per stream rather than one per chunk."""
        bounds, counts = self._bounds, self.counts
        total = self.sum
        previous = None
        for t in times:
            if t < start:
                continue
            if previous is not None:
                gap = t - previous
                total += gap
                if gap == gap:
                    counts[bisect_left(bounds, gap)] += 1
            previous = t
        self.sum = total
        if previous is not None and not self.pending:
            self.pending = True
            self._tallies.add(self)

    def fold(self) -> None:
        self.pending = False
        child = self._child
        for bucket, count in zip(child._buckets, self.counts, strict=True):
            bucket.set(count)
        child._sum.set(self.sum)


class _AttemptTallies:
    """The histograms one upstream attempt observes (``op_duration`` only when
    the request is a GenAI operation)."""

    __slots__ = ("headers_time", "op_duration", "queue_wait")

    def __init__(self, queue_wait: Buckets, op_duration: Buckets | None) -> None:
        self.queue_wait = queue_wait
        self.op_duration = op_duration
        self.headers_time: Buckets | None = None


class Metrics:
    """The proxy's Prometheus metrics, fed one finished exchange at a time."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry,
        *,
        multiprocess: bool = False,
        primary: bool = True,
    ) -> None:
        # With worker processes, prometheus_client keeps values in shared files;
        # gauges then need a rule for combining workers, and cannot be callbacks.
        self.multiprocess = multiprocess
        self.primary = primary
        self.prices = PriceTable.shipped().merged(config.pricing)
        r = registry
        self.tallies = Tallies(FOLD_EVERY if multiprocess else None)
        r.register(self.tallies)
        if multiprocess:  # counts since the last fold would die with the process
            atexit.register(self.tallies.fold)
        self.label_overflow = Counter(
            "llmproxy_label_overflow_total",
            "Label values replaced by 'other' because the cap was reached.",
            ["label"],
            registry=r,
        )
        self.model = BoundedLabel(
            config.telemetry.max_models, self.label_overflow.labels("model")
        )
        # Opt-in attribution labels, bounded like the model label.
        self.extra = config.telemetry.labels
        self._extra_values = {
            label: BoundedLabel(
                config.telemetry.max_models, self.label_overflow.labels(label)
            )
            for label in self.extra
        }
        self._rate_limits_read: dict[str, float] = {}
        self._limiters: Mapping[str, Limiter] = {}
        self._spans_failed_seen = 0
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._tallied: dict[tuple[int, tuple[str, ...]], Any] = {}
        # The tallies one exchange updates together, found with one lookup by
        # the labels they share rather than one per metric: per requests label
        # set, per attempt's labels, per token usage's labels and token type.
        self._heads: dict[tuple[str, ...], tuple[Count, Buckets]] = {}
        self._attempts: dict[tuple[Any, ...], _AttemptTallies] = {}
        self._tokens: dict[tuple[Any, ...], dict[str, tuple[Count, Buckets]]] = {}
        self._cache: ResponseCache | None = None
        self._genai(r)
        self._proxy(r)
        self._provider(r)
        # Only where a route caches, so a proxy without a cache shows no cache.
        self.caching = any(route.cache is not None for route in config.routes)
        if self.caching:
            self._cache_families(r)
        self._seed(config)

    def _genai(self, r: CollectorRegistry) -> None:
        self.op_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration, per upstream attempt.",
            [*GENAI_LABELS, "error_type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per operation, by token type.",
            [*GENAI_LABELS, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time from sending the request to the first chunk of a streamed answer.",
            GENAI_LABELS,
            buckets=FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        self.per_chunk = Histogram(
            "gen_ai_client_operation_time_per_output_chunk_seconds",
            "Time between successive chunks of a streamed answer, after the first.",
            GENAI_LABELS,
            buckets=CHUNK_BUCKETS,
            registry=r,
        )

    def _proxy(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "llmproxy_requests_total",
            "Requests the proxy answered.",
            [
                "route",
                "upstream",
                "model",
                "stream",
                "status_class",
                "error_type",
                *self.extra,
            ],
            registry=r,
        )
        self.duration = Histogram(
            "llmproxy_request_duration_seconds",
            "Request duration as the client saw it.",
            ["route", "upstream", "stream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llmproxy_overhead_seconds",
            "The proxy's own share of a request: its duration minus upstream time.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.headers_time = Histogram(
            "llmproxy_time_to_response_headers_seconds",
            "Time from sending a request upstream to its response headers.",
            ["upstream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "llmproxy_time_to_first_token_seconds",
            "Time from the request's arrival to the first content of the answer.",
            ["route", "upstream", "model"],
            buckets=FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llmproxy_tokens_total",
            "Tokens used, by type and by where the count came from.",
            ["route", "upstream", "model", "type", "usage_source", *self.extra],
            registry=r,
        )
        self.usage_missing = Counter(
            "llmproxy_usage_missing_total",
            "Responses whose usage the provider did not report.",
            ["route", "upstream"],
            registry=r,
        )
        self.cost = Counter(
            "llmproxy_cost_usd_total",
            "Cost in US dollars, from the price table.",
            ["route", "upstream", "model", *self.extra],
            registry=r,
        )
        self.unpriced = Counter(
            "llmproxy_unpriced_requests_total",
            "Requests with usage but no price for their model: counted at no cost.",
            ["route", "upstream", "model"],
            registry=r,
        )
        self.errors = Counter(
            "llmproxy_errors_total",
            "Failed requests, by error type.",
            ["route", "upstream", "error_type"],
            registry=r,
        )
        self.parse_errors = Counter(
            "llmproxy_parse_errors_total",
            "Responses the proxy could not read for telemetry (the client's bytes "
            "were unaffected), by why.",
            ["route", "upstream", "kind"],
            registry=r,
        )
        self.anomalies = Counter(
            "llmproxy_response_anomalies_total",
            "Answers that look wrong although the request succeeded.",
            ["route", "upstream", "model", "kind"],
            registry=r,
        )
        self.inflight = Gauge(
            "llmproxy_inflight_requests",
            "Requests holding a concurrency slot of each upstream.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            "llmproxy_queued_requests",
            "Requests waiting for a concurrency slot of each upstream.",
            ["upstream"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "llmproxy_queue_wait_seconds",
            "Time a request waited in the proxy for a concurrency slot.",
            ["upstream"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.breaker_state = Gauge(
            "llmproxy_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open (the highest "
            "among worker processes).",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.spans_dropped = Counter(
            "llmproxy_spans_dropped_total",
            "Spans dropped because the export queue was full.",
            registry=r,
        )
        self.spans_failed = Counter(
            "llmproxy_spans_export_failed_total",
            "Spans the exporter could not deliver to the collector.",
            registry=r,
        )
        self.health = Gauge(
            "llmproxy_upstream_health",
            "1 for each upstream's current health state: up, degraded or down.",
            ["upstream", "state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.probe_duration = Histogram(
            "llmproxy_probe_duration_seconds",
            "Health probe duration, by probe (models, stream).",
            ["upstream", "probe"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.probe_failures = Counter(
            "llmproxy_probe_failures_total",
            "Health probes that failed.",
            ["upstream", "probe"],
            registry=r,
        )
        self.retries = Counter(
            "llmproxy_retries_total",
            "Upstream attempts beyond the first, by the error that caused them.",
            ["upstream", "error_type"],
            registry=r,
        )
        self.fallbacks = Counter(
            "llmproxy_fallbacks_total",
            "Requests answered by a fallback instead of the route's upstream.",
            ["route", "upstream"],
            registry=r,
        )

    def _provider(self, r: CollectorRegistry) -> None:
        resource = ["upstream", "resource"]
        self.rl_remaining = Gauge(
            "llmproxy_ratelimit_remaining",
            "Provider rate limit: what remains in the current window.",
            resource,
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.rl_limit = Gauge(
            "llmproxy_ratelimit_limit",
            "Provider rate limit: the size of the window.",
            resource,
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.rl_reset = Gauge(
            "llmproxy_ratelimit_reset_seconds",
            "Provider rate limit: seconds until the window resets.",
            resource,
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.retry_after = Gauge(
            "llmproxy_ratelimit_retry_after_seconds",
            "The latest Retry-After the upstream sent.",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )

    def _cache_families(self, r: CollectorRegistry) -> None:
        self.cache_requests = Counter(
            "llmproxy_cache_requests_total",
            "Requests on routes with a response cache: hit, miss or bypass.",
            ["route", "result"],
            registry=r,
        )
        self.cache_saved = Counter(
            "llmproxy_cache_saved_usd_total",
            "Dollars not spent: the price of the usage of each answer served "
            "from the cache.",
            ["route", "upstream", "model"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "llmproxy_cache_stored_bytes",
            "Bytes held by the in-memory response cache (bodies and headers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_evictions = Counter(
            "llmproxy_cache_evictions_total",
            "Cached answers evicted to stay within cache.max_bytes.",
            registry=r,
        )
        self.cache_errors = Counter(
            "llmproxy_cache_backend_errors_total",
            "Cache backend (Redis) commands that failed or timed out.",
            registry=r,
        )

    def _seed(self, config: Config) -> None:
        """Create the per-upstream series at zero, so rate() works from the start."""
        for name in config.upstreams:
            self.inflight.labels(name)
            self.breaker_state.labels(name).set(0)
            if self.primary:  # health is evaluated by one process only
                self.health_changed(name, "UP")
        for route in config.routes:
            self.usage_missing.labels(route.name, route.upstream)
            if route.cache is not None:
                for result in ("hit", "miss", "bypass"):
                    self.cache_requests.labels(route.name, result)

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, cached: labels are bounded, lookups are not."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _tally(self, metric: Counter | Histogram, *values: str) -> Any:
        """The tally of ``metric.labels(*values)``: a ``Count`` or ``Buckets``."""
        key = (id(metric), values)
        tally = self._tallied.get(key)
        if tally is None:
            # The child is made now, as before, so its _created time is the same.
            child = metric.labels(*values)
            kind = Buckets if isinstance(metric, Histogram) else Count
            tally = self._tallied[key] = kind(child, self.tallies)
        return tally

    def observe(self, ex: Exchange) -> None:
        """Record one finished exchange (a recorder sink).

        It also writes the exchange's cost and anomaly kinds into the record, for
        the sinks after it: the log line shows what the metrics counted.
        """
        route = ex.route or ""
        upstream = ex.upstream or ""
        model = self.model(ex.request_model or ex.response_model)
        if not ex.route and ex.error_type in ("no_route", "payload_too_large"):
            # Scanner traffic to random paths must not create series per path.
            model = ""
        stream = "true" if ex.stream else "false"
        extra = self._attribution(ex)

        labels = (
            route,
            upstream,
            model,
            stream,
            f"{ex.status // 100}xx",
            ex.error_type or "",
            *extra,
        )
        head = self._heads.get(labels)
        if head is None:
            head = self._heads[labels] = (
                self._tally(self.requests, *labels),
                self._tally(self.duration, route, upstream, stream),
            )
        head[0].inc()
        head[1].observe(ex.duration)
        if ex.error_type:
            self._tally(self.errors, route, upstream, ex.error_type).inc()
        if ex.parse_error_kind:
            self._tally(self.parse_errors, route, upstream, ex.parse_error_kind).inc()
        if ex.cache_result is not None and self.caching:
            self._cached(ex, route, upstream, model)
        if not ex.attempts:
            return

        self._tally(self.overhead, route).observe(_overhead(ex))
        genai = self._genai_labels(ex, route, model)
        previous: Attempt | None = None
        for attempt in ex.attempts:
            self._attempt(ex, attempt, genai)
            if previous is not None and previous.upstream == attempt.upstream:
                self._tally(
                    self.retries, attempt.upstream, previous.error_type or ""
                ).inc()
            previous = attempt
        if ex.fallback:
            self._tally(self.fallbacks, route, upstream).inc()
        if ex.response_headers is not None:
            self._rate_limits(upstream, ex.response_headers)
        if ex.operation is None:
            return

        if ex.t_first_token is not None:
            self._tally(self.first_token, route, upstream, model).observe(
                ex.t_first_token - ex.started
            )
        self._usage(ex, route, upstream, model, genai, extra)
        ex.anomalies = anomalies(ex)
        for kind in ex.anomalies:
            self._tally(self.anomalies, route, upstream, model, kind).inc()

    def _cached(self, ex: Exchange, route: str, upstream: str, model: str) -> None:
        """Count the cache's answer; a hit's usage was not bought: price it."""
        self._tally(self.cache_requests, route, ex.cache_result or "").inc()
        entry = ex.cache_entry
        if entry is None:
            return
        saved = self.prices.cost(entry.model, entry)
        if saved:
            self._tally(self.cache_saved, route, upstream, model).inc(saved)

    def _attribution(self, ex: Exchange) -> tuple[str, ...]:
        if not self.extra:
            return ()
        raw = {"tenant": ex.tenant, "prompt_version": ex.prompt_version}
        return tuple(self._extra_values[label](raw[label]) for label in self.extra)

    def _genai_labels(self, ex: Exchange, route: str, model: str) -> tuple[str, ...]:
        return (
            ex.operation or "",
            ex.provider or "",
            model,
            self.model(ex.response_model) if ex.response_model else "",
            route,
            ex.upstream or "",
        )

    def _attempt(self, ex: Exchange, attempt: Attempt, genai: tuple[str, ...]) -> None:
        # The GenAI labels of an attempt: none when the request is no operation.
        labels = None if ex.operation is None else (*genai[:5], attempt.upstream)
        key = (attempt.upstream, labels, attempt.error_type)
        tallies = self._attempts.get(key)
        if tallies is None:
            op_duration = None
            if labels is not None:
                error = attempt.error_type or ""
                op_duration = self._tally(self.op_duration, *labels, error)
            tallies = self._attempts[key] = _AttemptTallies(
                self._tally(self.queue_wait, attempt.upstream), op_duration
            )
        tallies.queue_wait.observe(attempt.queue_wait)
        if attempt.t_headers is not None:
            headers_time = tallies.headers_time
            if headers_time is None:  # made when an attempt first has headers
                headers_time = tallies.headers_time = self._tally(
                    self.headers_time, attempt.upstream
                )
            headers_time.observe(attempt.t_headers - attempt.started)
        op_duration = tallies.op_duration
        if op_duration is None or labels is None:  # not a GenAI operation
            return
        ended = attempt.ended or ex.ended or attempt.started
        op_duration.observe(ended - attempt.started)
        if attempt is ex.attempts[-1] and ex.stream:
            self._chunks(ex, attempt, labels)

    def _chunks(self, ex: Exchange, attempt: Attempt, labels: tuple[str, ...]) -> None:
        if ex.t_first_token is not None:
            self._tally(self.first_chunk, *labels).observe(
                ex.t_first_token - attempt.started
            )
        arrivals = ex.arrivals
        if arrivals and ex.t_first_token is not None:
            per_chunk = self._tally(self.per_chunk, *labels)
            per_chunk.observe_gaps(arrivals, ex.t_first_token)

    def _usage(
        self,
        ex: Exchange,
        route: str,
        upstream: str,
        model: str,
        genai: tuple[str, ...],
        extra: tuple[str, ...],
    ) -> None:
        if ex.status >= 400 or ex.error_type in ("connect_error", "malformed_response"):
            return
        if ex.usage_source != "provider":
            self._tally(self.usage_missing, route, upstream).inc()
            if ex.usage_source is None:
                return
        source = "injected" if ex.usage_injected else ex.usage_source or "provider"
        key = (source, extra, genai)
        by_type = self._tokens.get(key)
        if by_type is None:
            by_type = self._tokens[key] = {}
        for token_type, attr in TOKEN_FIELDS:
            count = getattr(ex, attr)
            if count is None:
                continue
            # Made on first use: a token type never reported shows no series.
            pair = by_type.get(token_type)
            if pair is None:
                pair = by_type[token_type] = (
                    self._tally(
                        self.tokens, route, upstream, model, token_type, source, *extra
                    ),
                    self._tally(self.token_usage, *genai, token_type),
                )
            pair[0].inc(count)
            pair[1].observe(count)
        cost = self.prices.cost(ex.response_model or ex.request_model, ex)
        if cost is None:
            self._tally(self.unpriced, route, upstream, model).inc()
        else:
            self._tally(self.cost, route, upstream, model, *extra).inc(cost)
            ex.cost_usd = cost

    def _rate_limits(self, upstream: str, headers: Mapping[str, str]) -> None:
        # Gauges keep only the latest value and are scraped every few seconds:
        # reading the headers a few times a second per upstream is enough.
        now = time.monotonic()
        if now - self._rate_limits_read.get(upstream, -1.0) < RATE_LIMITS_EVERY:
            return
        self._rate_limits_read[upstream] = now
        for resource, limit, remaining, reset in read_rate_limits(headers):
            if limit is not None:
                self._child(self.rl_limit, upstream, resource).set(limit)
            if remaining is not None:
                self._child(self.rl_remaining, upstream, resource).set(remaining)
            if reset is not None:
                self._child(self.rl_reset, upstream, resource).set(reset)
        retry = retry_after_seconds(headers)
        if retry is not None:
            self._child(self.retry_after, upstream).set(retry)

    def track_limiters(self, limiters: Mapping[str, Limiter]) -> None:
        """Read in-flight and queued counts from the limiters at scrape time
        (with worker processes, ``sync`` copies them once a second instead)."""
        self._limiters = limiters
        if self.multiprocess:
            return
        for name, limiter in limiters.items():
            self.inflight.labels(name).set_function(_reader(limiter, "inflight"))
            self.queued.labels(name).set_function(_reader(limiter, "queued"))

    def track_cache(self, cache: ResponseCache) -> None:
        """Read an in-memory cache's size at scrape time (with worker processes,
        ``sync`` copies it once a second instead)."""
        self._cache = cache
        store = cache.store
        if not self.multiprocess and store.stored_bytes is not None:
            self.cache_bytes.set_function(lambda: float(store.stored_bytes or 0))

    def cache_evicted(self, count: int) -> None:
        self.cache_evictions.inc(count)

    def cache_failed(self) -> None:
        self.cache_errors.inc()

    def sync(self, tracer: Tracer | None) -> None:
        """Copy counts kept elsewhere into metrics; called once a second."""
        self.tallies.fold()
        if self.multiprocess:
            for name, limiter in self._limiters.items():
                self.inflight.labels(name).set(limiter.inflight)
                self.queued.labels(name).set(limiter.queued)
            if self._cache is not None and self._cache.store.stored_bytes is not None:
                self.cache_bytes.set(self._cache.store.stored_bytes)
        if tracer is not None:
            failed = tracer.export_failed
            if failed > self._spans_failed_seen:
                self.spans_failed.inc(failed - self._spans_failed_seen)
                self._spans_failed_seen = failed

    def spans_were_dropped(self, count: int) -> None:
        self.spans_dropped.inc(count)

    def health_changed(self, upstream: str, status: str) -> None:
        for state in ("up", "degraded", "down"):
            self.health.labels(upstream, state).set(1 if state == status.lower() else 0)

    def probed(self, upstream: str, probe: str, seconds: float, ok: bool) -> None:
        self.probe_duration.labels(upstream, probe).observe(seconds)
        if not ok:
            self.probe_failures.labels(upstream, probe).inc()

    def breaker_changed(self, upstream: str, state: str) -> None:
        self.breaker_state.labels(upstream).set(STATE_VALUES[state])


def _overhead(ex: Exchange) -> float:
    """The request's duration minus the time spent waiting on upstreams."""
    upstream_time = 0.0
    for attempt in ex.attempts:
        ended = attempt.ended or ex.ended or attempt.started
        upstream_time += ended - attempt.started
    return max((ex.ended or ex.started) - ex.started - upstream_time, 0.0)


def _reader(limiter: Limiter, attribute: str) -> Callable[[], float]:
    return lambda: float(getattr(limiter, attribute))
