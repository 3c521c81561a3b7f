"""Traces: W3C trace context on the request path, OTLP spans built afterwards.

On the request path the tracer only draws ids: ``start`` continues the client's
``traceparent`` (or starts a trace) and ``inject`` gives each upstream attempt a
span id and forwards it. No span object exists while a request runs. ``sink``,
a recorder sink, builds the spans from the finished ``Exchange`` with explicit
timestamps and hands them to a batching processor, whose own thread exports
them: a slow or absent collector costs a request nothing, and when the queue is
full new spans are dropped and counted in ``Tracer.dropped``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from random import getrandbits

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
    url_attributes,
)
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from .. import __version__
from ..errors import ConfigError
from ..exchange import Attempt, Exchange
from ..tracecontext import header_values as _header_values
from ..tracecontext import traceparent as _traceparent
from . import otlp

log = logging.getLogger(__name__)

_SAMPLED = 0x01
_MAX_ATTRIBUTE = 128
_MAX_PATH = 1024
_SCOPE = InstrumentationScope("llmproxy", __version__)
_ERROR = Status(StatusCode.ERROR)
_UNSET = Status(StatusCode.UNSET)
_FLAGS = {_SAMPLED: TraceFlags(_SAMPLED)}  # the flags of nearly every span

Attributes = dict[str, AttributeValue]


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
        self._processor: SpanProcessor
        if batch:
            self._processor = BatchSpanProcessor(
                self._exporter,
                max_queue_size=max_queue_size,
                schedule_delay_millis=schedule_delay * 1000,
                max_export_batch_size=min(max_export_batch_size, max_queue_size),
            )
            self._capacity = max_queue_size
        else:
            self._processor = SimpleSpanProcessor(self._exporter)
            self._capacity = 0
        self._emitted = 0

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
        if not self._capacity:
            return 0
        return self._emitted - self._exporter.taken

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
        """Build and queue the exchange's spans; never raises (a recorder sink)."""
        try:
            flags, state = ex.trace_flags, ex.trace_state
            if not (self.enabled and ex.trace_id and flags & _SAMPLED):
                return
            for span in self._spans(ex, flags, state):
                self._emit(span)
        except Exception:
            self.sink_errors += 1
            if self.sink_errors == 1:  # the same fault would repeat every request
                log.exception(
                    "tracing.sink_failed",
                    extra={"fields": {"request_id": ex.request_id}},
                )

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued and stop, blocking for at most ``timeout`` seconds."""
        if not self.enabled:
            return
        self.enabled = False
        # The processor's own shutdown waits up to 30 s on a slow collector.
        closer = threading.Thread(
            target=self._processor.shutdown,
            name="llmproxy-tracing-shutdown",
            daemon=True,
        )
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning(
                "tracing.shutdown_timeout",
                extra={"fields": {"timeout_s": timeout, "queued": self.queued}},
            )
            # Ends the exporter's retries, so the export thread stops soon too.
            self._exporter.shutdown()

    def _emit(self, span: ReadableSpan) -> None:
        # The processor would drop its oldest span silently when full; the newest
        # is refused here instead, where it can be counted. ``queued`` counts a
        # batch until its export begins, so it never underestimates the queue and
        # the processor itself never drops.
        if self._capacity and self.queued >= self._capacity:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(1)
            return
        self._emitted += 1
        self._processor.on_end(span)

    def _spans(self, ex: Exchange, flags: int, state: str | None) -> list[ReadableSpan]:
        trace_flags = _FLAGS.get(flags) or TraceFlags(flags)
        trace_state = TraceState.from_header([state]) if state else None
        trace_id, started = ex.trace_id, ex.started
        base_ns = int(ex.started_wall * 1e9)
        server = SpanContext(trace_id, ex.span_id, False, trace_flags, trace_state)
        parent = None
        if ex.parent_span_id:
            parent = SpanContext(
                trace_id, ex.parent_span_id, True, trace_flags, trace_state
            )
        attribution = _attribution(ex)
        end_ns = base_ns + int(ex.duration * 1e9)
        spans = [
            ReadableSpan(
                f"{ex.method} {ex.route or 'unrouted'}",
                context=server,
                parent=parent,
                resource=self.resource,
                attributes=_server_attributes(ex) | attribution,
                kind=SpanKind.SERVER,
                status=_server_status(ex),
                start_time=base_ns,
                end_time=end_ns,
                instrumentation_scope=_SCOPE,
            )
        ]
        last = len(ex.attempts) - 1
        for i, attempt in enumerate(ex.attempts):
            ended = attempt.ended if attempt.ended is not None else ex.ended
            span_id = attempt.span_id or getrandbits(64) or 1
            spans.append(
                ReadableSpan(
                    _client_name(ex),
                    context=SpanContext(
                        trace_id, span_id, False, trace_flags, trace_state
                    ),
                    parent=server,
                    resource=self.resource,
                    attributes=_client_attributes(ex, attempt, i == last) | attribution,
                    kind=SpanKind.CLIENT,
                    status=_ERROR if attempt.error_type else _UNSET,
                    start_time=base_ns + int((attempt.started - started) * 1e9),
                    end_time=(
                        end_ns
                        if ended is None
                        else base_ns + int((ended - started) * 1e9)
                    ),
                    instrumentation_scope=_SCOPE,
                )
            )
        return spans


class _CountingExporter(SpanExporter):
    """The real exporter, counting the spans taken off the queue and lost."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        # Written only by the processor's export thread (or under its export
        # lock), read by the event loop: a plain int needs no lock.
        self.taken = 0
        self.failed = 0
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        try:
            result = self.inner.export(spans)
        except Exception:
            self.failed += len(spans)
            raise
        if result is not SpanExportResult.SUCCESS:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        if not self._closed:  # called by Tracer.shutdown and the processor both
            self._closed = True
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _attribution(ex: Exchange) -> Attributes:
    attrs: Attributes = {}
    if ex.prompt_fingerprint:
        attrs["llmproxy.prompt.fingerprint"] = ex.prompt_fingerprint
    # The values the proxy checked at the boundary, never the raw headers: the
    # only request headers that reach a span, and credentials never do.
    if ex.tenant:
        attrs["llmproxy.tenant"] = ex.tenant[:_MAX_ATTRIBUTE]
    if ex.prompt_version:
        attrs["llmproxy.prompt.version"] = ex.prompt_version[:_MAX_ATTRIBUTE]
    return attrs


def _server_attributes(ex: Exchange) -> Attributes:
    attrs: Attributes = {
        http_attributes.HTTP_REQUEST_METHOD: ex.method,
        url_attributes.URL_PATH: ex.path[:_MAX_PATH],
        "llmproxy.request_id": ex.request_id,
    }
    if ex.route:
        attrs[http_attributes.HTTP_ROUTE] = ex.route
        attrs["llmproxy.route"] = ex.route
    if ex.status:
        attrs[http_attributes.HTTP_RESPONSE_STATUS_CODE] = ex.status
    if ex.error_type:
        attrs[error_attributes.ERROR_TYPE] = ex.error_type
    if ex.cache_result:
        attrs["llmproxy.cache"] = ex.cache_result
    return attrs


def _server_status(ex: Exchange) -> Status:
    # HTTP semconv: a 4xx is the client's doing, not a failure of the server span;
    # the CLIENT span of a rejected attempt still carries the error.
    if ex.error_type and not 400 <= ex.status < 500:
        return _ERROR
    return _UNSET


def _client_name(ex: Exchange) -> str:
    if not ex.operation:
        return ex.method
    if ex.request_model:
        return f"{ex.operation} {ex.request_model}"
    return ex.operation


def _client_attributes(ex: Exchange, attempt: Attempt, last: bool) -> Attributes:
    attrs: Attributes = {
        server_attributes.SERVER_ADDRESS: attempt.server_address,
        server_attributes.SERVER_PORT: attempt.server_port,
        "llmproxy.upstream": attempt.upstream,
        "llmproxy.request_id": ex.request_id,
    }
    if ex.route:
        attrs["llmproxy.route"] = ex.route
    if attempt.status:
        attrs[http_attributes.HTTP_RESPONSE_STATUS_CODE] = attempt.status
    if attempt.error_type:
        attrs[error_attributes.ERROR_TYPE] = attempt.error_type
    if not ex.operation:
        attrs[http_attributes.HTTP_REQUEST_METHOD] = ex.method
        return attrs

    attrs[gen_ai.GEN_AI_OPERATION_NAME] = ex.operation
    attrs[gen_ai.GEN_AI_REQUEST_STREAM] = ex.stream
    if ex.provider:
        attrs[gen_ai.GEN_AI_PROVIDER_NAME] = ex.provider
    if ex.request_model:
        attrs[gen_ai.GEN_AI_REQUEST_MODEL] = ex.request_model
    if last:  # only the attempt whose response the client got has these
        _add_response(attrs, ex, attempt)
    return attrs


def _add_response(attrs: Attributes, ex: Exchange, attempt: Attempt) -> None:
    # In this order on the span; each only when known.
    if ex.response_model is not None:
        attrs[gen_ai.GEN_AI_RESPONSE_MODEL] = ex.response_model
    if ex.response_id is not None:
        attrs[gen_ai.GEN_AI_RESPONSE_ID] = ex.response_id
    for key, attr in _USAGE_ATTRIBUTES:
        count = getattr(ex, attr)
        if count is not None:
            attrs[key] = count
    if ex.usage_source is not None:
        attrs["llmproxy.usage_source"] = ex.usage_source
    if ex.finish_reasons:
        attrs[gen_ai.GEN_AI_RESPONSE_FINISH_REASONS] = tuple(ex.finish_reasons)
    if ex.stream and ex.t_first_token is not None:
        attrs[gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = (
            ex.t_first_token - attempt.started
        )


_USAGE_ATTRIBUTES = (
    (gen_ai.GEN_AI_USAGE_INPUT_TOKENS, "input_tokens"),
    (gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS, "output_tokens"),
    (gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, "cached_input_tokens"),
    (gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, "cache_creation_input_tokens"),
    (gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, "reasoning_tokens"),
)


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
