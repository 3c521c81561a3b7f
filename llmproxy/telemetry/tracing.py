"""Traces: W3C trace context on the request path, OTLP spans built afterwards.

On the request path the tracer only draws ids: ``start`` continues the client's
``traceparent`` (or starts a trace) and ``inject`` gives each upstream attempt a
span id and forwards it. No span object exists while a request runs. ``sink``,
a recorder sink, copies what the spans need off the finished ``Exchange``
(``spans.copy``) onto a bounded queue, and the tracer's own thread exports the
queue in batches: the spans are built there, with explicit timestamps, or
written straight to OTLP (``spans.SpanBatch``). A slow or absent collector
costs a request nothing, and when the queue is full an exchange's spans are
dropped and counted in ``Tracer.dropped``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from random import getrandbits

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .. import __version__
from ..errors import ConfigError
from ..exchange import Attempt, Exchange
from ..tracecontext import header_values as _header_values
from ..tracecontext import traceparent as _traceparent
from . import otlp, pause, spans

log = logging.getLogger(__name__)

_SAMPLED = 0x01
_SCOPE = InstrumentationScope("llmproxy", __version__)


class Tracer:
    """Trace context for each exchange, and its spans exported over OTLP."""

    def __init__(
        self,
        exporter: SpanExporter,
        resource: Resource | None = None,
        *,
        max_queue_size: int = 2048,
        schedule_delay: float = 1.0,
        max_export_batch_size: int = 512,
        batch: bool = True,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        """``batch=False`` exports inside ``sink`` (for tests); ``on_drop(n)`` is
        called on the event loop when ``n`` spans are dropped for a full queue."""
        self.enabled = True
        self.resource = resource or _default_resource()
        self.on_drop = on_drop
        self.dropped = 0
        self.sink_errors = 0
        self._exporter = _CountingExporter(exporter)
        # Spans, counted by the event loop as it queues them and by the export
        # thread as it takes them: each int has one writer, so neither needs a lock.
        self._emitted = 0
        self._taken = 0
        self._queue: deque[spans.Copy] = deque()
        self._capacity = max_queue_size if batch else 0
        self._batch_size = max(1, min(max_export_batch_size, max_queue_size))
        self._delay = schedule_delay
        self._wake = threading.Event()
        self._woken = False
        self._stopping = False
        self._export_errors = 0
        self._thread: threading.Thread | None = None
        if batch:
            self._thread = threading.Thread(
                target=self._run, name="llmproxy-tracing-export", daemon=True
            )
            self._thread.start()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tracer | None:
        """A tracer as the standard ``OTEL_*`` variables describe, or ``None`` if off.

        ``environ`` decides whether tracing is on, the protocol and the queue; the
        exporter and the resource read ``os.environ`` themselves (endpoint,
        headers, timeout, ``OTEL_RESOURCE_ATTRIBUTES``). Raises ``ConfigError``
        for an unsupported protocol or exporter, or a malformed number.
        """
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        exporters = {
            e.strip().lower()
            for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")
            if e.strip()
        }
        if "none" in exporters:
            return None
        if exporters - {"otlp"}:
            raise ConfigError(
                [f"OTEL_TRACES_EXPORTER: unsupported {sorted(exporters)}; use otlp"]
            )
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if not endpoint and not exporters:
            return None
        return cls(
            _exporter_from_env(env),
            _default_resource(),
            max_queue_size=_env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
            schedule_delay=_env_int(env, "OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000,
            max_export_batch_size=_env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        )

    @property
    def queued(self) -> int:
        """Spans waiting for the export thread."""
        return self._emitted - self._taken

    @property
    def export_failed(self) -> int:
        """Spans the exporter took but could not deliver."""
        return self._exporter.failed

    def start(self, ex: Exchange, headers: Mapping[str, str]) -> None:
        """Set the exchange's trace and SERVER span ids; on the request path."""
        trace_id = parent_id = 0
        parsed = _traceparent(headers)
        if parsed is not None:
            trace_id, parent_id, ex.trace_flags = parsed
            states = _header_values(headers, "tracestate")
            ex.trace_state = ",".join(states) if states else None
        ex.trace_id = trace_id or getrandbits(128) or 1
        ex.parent_span_id = parent_id
        ex.span_id = getrandbits(64) or 1

    def inject(
        self, ex: Exchange, attempt: Attempt, headers: MutableMapping[str, str]
    ) -> None:
        """Give the attempt a CLIENT span id and send it upstream as the parent."""
        if not ex.trace_id:
            return
        attempt.span_id = getrandbits(64) or 1
        flags, state = ex.trace_flags, ex.trace_state
        headers["traceparent"] = (
            f"00-{ex.trace_id:032x}-{attempt.span_id:016x}-{flags:02x}"
        )
        if state:
            headers["tracestate"] = state
        elif "tracestate" in headers:
            # A client's tracestate without a valid traceparent is meaningless
            # (del, unlike pop, removes every copy from a multidict).
            del headers["tracestate"]

    def sink(self, ex: Exchange) -> None:
        """Queue the exchange's spans for export; never raises (a recorder sink)."""
        try:
            if not (self.enabled and ex.trace_id and ex.trace_flags & _SAMPLED):
                return
            copied = spans.copy(ex)
            if self._thread is None:
                self._export([copied])
                return
        except Exception:
            self.sink_errors += 1
            if self.sink_errors == 1:  # the same fault would repeat every request
                log.exception(
                    "tracing.sink_failed",
                    extra={"fields": {"request_id": ex.request_id}},
                )
            return
        count = spans.count(copied)
        queued = self._emitted - self._taken + count
        if queued > self._capacity:
            # The newest spans are refused, where they can be counted, and an
            # exchange's spans go together or not at all.
            self.dropped += count
            if self.on_drop is not None:
                self.on_drop(count)
            return
        self._emitted += count
        self._queue.append(copied)
        if queued >= self._batch_size and not self._woken:
            self._woken = True
            self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued and stop, blocking for at most ``timeout`` seconds."""
        if not self.enabled:
            return
        self.enabled = False
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "tracing.shutdown_timeout",
                    extra={"fields": {"timeout_s": timeout, "queued": self.queued}},
                )
        # Also ends the retries of an export still running, so its thread stops.
        self._exporter.shutdown()

    def _run(self) -> None:
        """The export thread: batches while the queue holds a full one, and all
        that is queued every ``schedule_delay`` seconds and at shutdown."""
        while True:
            woken = self._wake.wait(self._delay)
            self._wake.clear()
            self._woken = False
            stopping = self._stopping
            # Woken by a full batch, export full batches only: what arrives during
            # an export waits to fill one, rather than going out in small ones.
            self._drain(self._batch_size if woken and not stopping else 1)
            if stopping:
                return

    def _drain(self, least: int) -> None:
        """Export batches while at least ``least`` spans are queued."""
        queue, size = self._queue, self._batch_size
        while queue and self.queued >= least:
            batch: list[spans.Copy] = []
            count = 0
            while queue and count < size:
                copied = queue.popleft()
                batch.append(copied)
                count += spans.count(copied)
            # Taken before the export begins: a stuck collector holds one batch
            # out of the queue, and what it holds no longer counts against it.
            self._taken += count
            try:
                self._export(batch)
            except Exception:
                self._export_errors += 1
                if self._export_errors == 1:
                    log.exception("tracing.export_failed")

    def _export(self, batch: list[spans.Copy]) -> None:
        paused = None if self._thread is None else pause
        self._exporter.export(spans.SpanBatch(batch, self.resource, _SCOPE, paused))


class _CountingExporter(SpanExporter):
    """The real exporter, counting the spans taken off the queue and lost."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        # Written only by the export thread, read by the event loop.
        self.failed = 0
        self._closed = False

    def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(batch)
        except Exception:
            self.failed += len(batch)
            raise
        if result is not SpanExportResult.SUCCESS:
            self.failed += len(batch)
        return result

    def shutdown(self) -> None:
        if not self._closed:  # once, however often it is asked
            self._closed = True
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _default_resource() -> Resource:
    """``Resource.create`` (it reads ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES``), named ``llmproxy`` unless the operator named it."""
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "llmproxy"}))
    return Resource({SERVICE_VERSION: __version__}).merge(resource)


def _exporter_from_env(env: Mapping[str, str]) -> SpanExporter:
    name = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    protocol = env.get(name)
    if not protocol:
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = env.get(name) or "http/protobuf"
    protocol = protocol.strip().lower()
    # Imported here: with tracing off, neither exporter (nor grpc) is loaded.
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        otlp.install(HttpExporter.__module__)
        return HttpExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        otlp.install(GrpcExporter.__module__)
        return GrpcExporter()
    raise ConfigError([f"{name}: unsupported {protocol!r}; use http/protobuf or grpc"])


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError([f"{name}: expected a positive integer, got {raw!r}"])
    return value
