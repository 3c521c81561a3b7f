"""The spans of one exchange: copied off it on the event loop, built in the export
thread.

``copy`` takes the few fields the spans need into one tuple, so that the
exchange (which holds bodies and headers) is never kept for the export queue,
and the request path pays about a microsecond. In the export thread a
``SpanBatch`` of copies is what the exporter is given: iterated, it yields the
SDK's ``ReadableSpan``, a SERVER span per exchange and a CLIENT span per
upstream attempt, so any exporter takes it; the OTLP exporters, with the
encoder of ``otlp`` installed, have it write its request straight to the wire
format instead, without a span object. Both ways come from the same copy, and
``tests/test_otlp.py`` holds them to the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from random import getrandbits
from typing import Any, overload

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
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

from ..exchange import Exchange
from . import otlp

MAX_ATTRIBUTE = 128
PAUSE_EVERY = 32  # copies encoded between pauses: about half a millisecond
MAX_PATH = 1024
_ERROR = Status(StatusCode.ERROR)
_UNSET = Status(StatusCode.UNSET)
_FLAGS = {0x01: TraceFlags(0x01)}  # the flags of nearly every span

Attributes = dict[str, AttributeValue]
Copy = tuple[Any, ...]
"""What ``copy`` takes of an exchange; only this module reads its fields."""


def copy(ex: Exchange) -> Copy:
    """The fields of ``ex`` its spans are built from, in the order ``_Fields``
    unpacks them."""
    ended = ex.ended
    return (
        ex.trace_id,
        ex.span_id,
        ex.parent_span_id,
        ex.trace_flags,
        ex.trace_state,
        ex.started_wall,
        ex.started,
        ex.duration,
        ex.method,
        ex.route,
        ex.path,
        ex.request_id,
        ex.status,
        ex.error_type,
        ex.cache_result,
        ex.prompt_fingerprint,
        ex.tenant,
        ex.prompt_version,
        ex.operation,
        ex.request_model,
        ex.provider,
        ex.stream,
        ex.response_model,
        ex.response_id,
        (
            ex.input_tokens,
            ex.output_tokens,
            ex.cached_input_tokens,
            ex.cache_creation_input_tokens,
            ex.reasoning_tokens,
        ),
        ex.usage_source,
        tuple(ex.finish_reasons),
        ex.t_first_token,
        [
            (
                a.span_id or getrandbits(64) or 1,  # one never sent upstream
                a.started,
                a.ended if a.ended is not None else ended,
                a.server_address,
                a.server_port,
                a.upstream,
                a.status,
                a.error_type,
            )
            for a in ex.attempts
        ],
    )


def count(copied: Copy) -> int:
    """How many spans ``copied`` makes."""
    return 1 + len(copied[-1])


class SpanBatch(otlp.Encodable):
    """Copies of finished exchanges, as their spans for an exporter."""

    def __init__(
        self,
        copies: list[Copy],
        resource: Resource,
        scope: InstrumentationScope,
        pause: Callable[[], None] | None = None,
    ) -> None:
        """``pause`` is called between slices of ``PAUSE_EVERY`` copies while the
        batch is encoded (the export thread's way of letting the event loop in)."""
        self.copies = copies
        self.resource = resource
        self.scope = scope
        self.pause = pause
        self._count = sum(map(count, copies))
        self._spans: list[ReadableSpan] | None = None

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> ReadableSpan: ...

    @overload
    def __getitem__(self, index: slice) -> list[ReadableSpan]: ...

    def __getitem__(self, index: int | slice) -> ReadableSpan | list[ReadableSpan]:
        return self.spans()[index]

    def __iter__(self) -> Iterator[ReadableSpan]:
        return iter(self.spans())

    def spans(self) -> list[ReadableSpan]:
        """The batch as SDK spans, built on first use."""
        if self._spans is None:
            built: list[ReadableSpan] = []
            for copied in self.copies:
                built += readable(copied, self.resource, self.scope)
            self._spans = built
        return self._spans

    def to_bytes(self) -> bytes:
        encoded: list[bytes] = []
        pause = self.pause
        for i, copied in enumerate(self.copies):
            if pause is not None and i and not i % PAUSE_EVERY:
                pause()
            if copied[4]:  # a trace state: rare, and TraceState normalises it
                spans = readable(copied, self.resource, self.scope)
                encoded += map(otlp.span_bytes, spans)
            else:
                encoded += _encode(copied)
        return otlp.resource_spans(self.resource, {self.scope: encoded})


def readable(
    copied: Copy, resource: Resource, scope: InstrumentationScope
) -> list[ReadableSpan]:
    """The SERVER span and the CLIENT spans of one copied exchange."""
    f = _Fields(copied)
    trace_flags = _FLAGS.get(f.flags) or TraceFlags(f.flags)
    trace_state = TraceState.from_header([f.state]) if f.state else None
    server = SpanContext(f.trace_id, f.span_id, False, trace_flags, trace_state)
    parent = None
    if f.parent_id:
        parent = SpanContext(f.trace_id, f.parent_id, True, trace_flags, trace_state)
    attribution = _attribution(f)
    spans = [
        ReadableSpan(
            _server_name(f),
            context=server,
            parent=parent,
            resource=resource,
            attributes=_as_dict(_server_attributes(f), attribution),
            kind=SpanKind.SERVER,
            status=_ERROR if _server_failed(f) else _UNSET,
            start_time=f.start_ns,
            end_time=f.end_ns,
            instrumentation_scope=scope,
        )
    ]
    last = len(f.attempts) - 1
    for i, attempt in enumerate(f.attempts):
        span_id, start_ns, end_ns = _attempt_times(f, attempt)
        spans.append(
            ReadableSpan(
                _client_name(f),
                context=SpanContext(
                    f.trace_id, span_id, False, trace_flags, trace_state
                ),
                parent=server,
                resource=resource,
                attributes=_as_dict(
                    _client_attributes(f, attempt, i == last), attribution
                ),
                kind=SpanKind.CLIENT,
                status=_ERROR if attempt[7] else _UNSET,
                start_time=start_ns,
                end_time=end_ns,
                instrumentation_scope=scope,
            )
        )
    return spans


def _encode(copied: Copy) -> list[bytes]:
    """As ``readable`` and then ``otlp.span_bytes``, without the span objects."""
    f = _Fields(copied)
    trace_id, span_id, parent_id = f.trace_id, f.span_id, f.parent_id
    high, low = trace_id >> 64, trace_id & _U64
    attribution = _encoded_run(_attribution(f))
    if parent_id:
        ids = _IDS_PARENT(
            _TRACE_TAG, high, low, _SPAN_TAG, span_id, _PARENT_TAG, parent_id
        )
    else:
        ids = _IDS(_TRACE_TAG, high, low, _SPAN_TAG, span_id)
    run, fresh = _server_attributes(f)
    parts = [
        ids,
        otlp.name_field(_server_name(f)),
        _SERVER_KIND,
        _TIMES(0x39, f.start_ns, 0x41, f.end_ns),
        _encoded_run(run),
        *_encoded_fresh(fresh),
        attribution,
        _ERROR_FIELD if _server_failed(f) else _UNSET_FIELD,
        otlp.REMOTE_FLAGS if parent_id else otlp.LOCAL_FLAGS,
    ]
    spans = [b"".join(parts)]

    name = otlp.name_field(_client_name(f))
    last = len(f.attempts) - 1
    for i, attempt in enumerate(f.attempts):
        client_id, start_ns, end_ns = _attempt_times(f, attempt)
        run, fresh = _client_attributes(f, attempt, i == last)
        parts = [
            _IDS_PARENT(
                _TRACE_TAG, high, low, _SPAN_TAG, client_id, _PARENT_TAG, span_id
            ),
            name,
            _CLIENT_KIND,
            _TIMES(0x39, start_ns, 0x41, end_ns),
            _encoded_run(run),
            *_encoded_fresh(fresh),
            attribution,
            _ERROR_FIELD if attempt[7] else _UNSET_FIELD,
            otlp.LOCAL_FLAGS,
        ]
        spans.append(b"".join(parts))
    return spans


# A span's first fields: trace_id (1) and span_id (2), then parent_span_id (4)
# if it has a parent, each with its tag and length; big-endian, as the ids are
# written in the W3C header. Then start and end time (7, 8): fixed64 tags and
# little-endian nanoseconds.
_IDS = struct.Struct(">HQQHQ").pack
_IDS_PARENT = struct.Struct(">HQQHQHQ").pack
_TRACE_TAG, _SPAN_TAG, _PARENT_TAG = 0x0A10, 0x1208, 0x2208
_TIMES = struct.Struct("<BQBQ").pack
_U64 = (1 << 64) - 1
_SERVER_KIND = otlp.KIND_FIELD[SpanKind.SERVER]
_CLIENT_KIND = otlp.KIND_FIELD[SpanKind.CLIENT]
_ERROR_FIELD = otlp.status_field(StatusCode.ERROR.value)
_UNSET_FIELD = otlp.status_field(StatusCode.UNSET.value)


class _Fields:
    """A copy unpacked into names, with its times in nanoseconds since the epoch."""

    __slots__ = (
        "attempts",
        "cache_result",
        "end_ns",
        "error_type",
        "fingerprint",
        "finish_reasons",
        "flags",
        "method",
        "operation",
        "parent_id",
        "path",
        "prompt_version",
        "provider",
        "request_id",
        "request_model",
        "response_id",
        "response_model",
        "route",
        "span_id",
        "start_ns",
        "started",
        "state",
        "status",
        "stream",
        "t_first_token",
        "tenant",
        "trace_id",
        "usage",
        "usage_source",
    )

    def __init__(self, copied: Copy) -> None:
        (
            self.trace_id,
            self.span_id,
            self.parent_id,
            self.flags,
            self.state,
            started_wall,
            self.started,
            duration,
            self.method,
            self.route,
            self.path,
            self.request_id,
            self.status,
            self.error_type,
            self.cache_result,
            self.fingerprint,
            self.tenant,
            self.prompt_version,
            self.operation,
            self.request_model,
            self.provider,
            self.stream,
            self.response_model,
            self.response_id,
            self.usage,
            self.usage_source,
            self.finish_reasons,
            self.t_first_token,
            self.attempts,
        ) = copied
        self.start_ns = int(started_wall * 1e9)
        self.end_ns = self.start_ns + int(duration * 1e9)


def _attempt_times(f: _Fields, attempt: tuple[Any, ...]) -> tuple[int, int, int]:
    """An attempt's span id, and its start and end in nanoseconds since the epoch."""
    span_id, started, ended = attempt[0], attempt[1], attempt[2]
    start_ns = f.start_ns + int((started - f.started) * 1e9)
    if ended is None:
        end_ns = f.end_ns
    else:
        end_ns = f.start_ns + int((ended - f.started) * 1e9)
    return span_id, start_ns, end_ns


# The attributes of each span, in the order they are written: first the ones
# that repeat from exchange to exchange (route, status, upstream, model, finish
# reasons), as one run the encoder keeps whole, then the ones that take a new
# value nearly every time (ids, token counts, times), each written on its own.

Pair = tuple[str, AttributeValue]
SpanAttributes = tuple[tuple[Pair, ...], list[Pair]]


def _server_name(f: _Fields) -> str:
    return f"{f.method} {f.route or 'unrouted'}"


def _server_failed(f: _Fields) -> bool:
    # HTTP semconv: a 4xx is the client's doing, not a failure of the server span;
    # the CLIENT span of a rejected attempt still carries the error.
    return bool(f.error_type) and not 400 <= f.status < 500


def _server_attributes(f: _Fields) -> SpanAttributes:
    run: list[Pair] = [
        (http_attributes.HTTP_REQUEST_METHOD, f.method),
        (url_attributes.URL_PATH, f.path[:MAX_PATH]),
    ]
    if f.route:
        run += ((http_attributes.HTTP_ROUTE, f.route), ("llmproxy.route", f.route))
    if f.status:
        run.append((http_attributes.HTTP_RESPONSE_STATUS_CODE, f.status))
    if f.error_type:
        run.append((error_attributes.ERROR_TYPE, f.error_type))
    if f.cache_result:
        run.append(("llmproxy.cache", f.cache_result))
    return tuple(run), [(_REQUEST_ID, f.request_id)]


def _attribution(f: _Fields) -> tuple[Pair, ...]:
    """The attributes of both spans that say whose request it was."""
    run: list[Pair] = []
    if f.fingerprint:
        run.append(("llmproxy.prompt.fingerprint", f.fingerprint))
    # The values the proxy checked at the boundary, never the raw headers: the
    # only request headers that reach a span, and credentials never do.
    if f.tenant:
        run.append(("llmproxy.tenant", f.tenant[:MAX_ATTRIBUTE]))
    if f.prompt_version:
        run.append(("llmproxy.prompt.version", f.prompt_version[:MAX_ATTRIBUTE]))
    return tuple(run)


def _client_name(f: _Fields) -> str:
    if not f.operation:
        return str(f.method)
    if f.request_model:
        return f"{f.operation} {f.request_model}"
    return str(f.operation)


def _client_attributes(
    f: _Fields, attempt: tuple[Any, ...], last: bool
) -> SpanAttributes:
    _, started, _, address, port, upstream, status, error_type = attempt
    run: list[Pair] = [
        (server_attributes.SERVER_ADDRESS, address),
        (server_attributes.SERVER_PORT, port),
        ("llmproxy.upstream", upstream),
    ]
    fresh: list[Pair] = [(_REQUEST_ID, f.request_id)]
    if f.route:
        run.append(("llmproxy.route", f.route))
    if status:
        run.append((http_attributes.HTTP_RESPONSE_STATUS_CODE, status))
    if error_type:
        run.append((error_attributes.ERROR_TYPE, error_type))
    if not f.operation:
        run.append((http_attributes.HTTP_REQUEST_METHOD, f.method))
        return tuple(run), fresh

    run += (
        (gen_ai.GEN_AI_OPERATION_NAME, f.operation),
        (gen_ai.GEN_AI_REQUEST_STREAM, f.stream),
    )
    if f.provider:
        run.append((gen_ai.GEN_AI_PROVIDER_NAME, f.provider))
    if f.request_model:
        run.append((gen_ai.GEN_AI_REQUEST_MODEL, f.request_model))
    if not last:  # only the attempt whose response the client got has the rest
        return tuple(run), fresh

    if f.response_model is not None:
        run.append((gen_ai.GEN_AI_RESPONSE_MODEL, f.response_model))
    if f.usage_source is not None:
        run.append(("llmproxy.usage_source", f.usage_source))
    if f.finish_reasons:
        run.append((gen_ai.GEN_AI_RESPONSE_FINISH_REASONS, f.finish_reasons))
    if f.response_id is not None:
        fresh.append((gen_ai.GEN_AI_RESPONSE_ID, f.response_id))
    for key, value in zip(_USAGE_KEYS, f.usage, strict=True):
        if value is not None:
            fresh.append((key, value))
    if f.stream and f.t_first_token is not None:
        ttfc = f.t_first_token - started
        fresh.append((gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, ttfc))
    return tuple(run), fresh


_REQUEST_ID = "llmproxy.request_id"
# The usage counts of a copy, in order: the keys they are written under.
_USAGE_KEYS = (
    gen_ai.GEN_AI_USAGE_INPUT_TOKENS,
    gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS,
    gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
)
_FRESH_KEYS: dict[str, bytes] = {}
# Encoded runs of attributes by the run itself; only the export thread uses it.
_RUNS: dict[tuple[Pair, ...], bytes] = {}
_MAX_RUNS = 4096


def _encoded_run(run: tuple[Pair, ...]) -> bytes:
    encoded = _RUNS.get(run)
    if encoded is None:
        parts = [otlp.attribute(key, value) for key, value in run]
        encoded = b"".join(part for part in parts if part is not None)
        if len(_RUNS) >= _MAX_RUNS:
            _RUNS.clear()
        _RUNS[run] = encoded
    return encoded


def _encoded_fresh(pairs: list[Pair]) -> list[bytes]:
    out = []
    for key, value in pairs:
        if value.__class__ is str:
            field = _FRESH_KEYS.get(key)
            if field is None:
                field = _FRESH_KEYS[key] = otlp.key_field(key)
            out.append(otlp.fresh_string(field, value))
        elif value.__class__ is float:
            field = _FRESH_KEYS.get(key)
            if field is None:
                field = _FRESH_KEYS[key] = otlp.key_field(key)
            out.append(otlp.fresh_double(field, value))
        else:  # token counts: they repeat enough to be worth keeping
            out.append(otlp.attribute(key, value) or b"")
    return out


def _as_dict(attributes: SpanAttributes, attribution: tuple[Pair, ...]) -> Attributes:
    run, fresh = attributes
    return dict(run) | dict(fresh) | dict(attribution)
