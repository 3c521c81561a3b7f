"""The spans of one exchange: copied off it on the event loop, built in the export
thread.

``copy`` takes the few fields the spans need into one named tuple, so that the
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
from operator import attrgetter
from random import getrandbits
from typing import NamedTuple, overload

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

from ..exchange import Attempt, Exchange
from . import PAUSE_EVERY, otlp

MAX_ATTRIBUTE = 128
MAX_PATH = 1024
_ERROR = Status(StatusCode.ERROR)
_UNSET = Status(StatusCode.UNSET)
_FLAGS = {0x01: TraceFlags(0x01)}  # the flags of nearly every span

Attributes = dict[str, AttributeValue]


class Copy(NamedTuple):
    """What the spans need of one exchange: the exchange's attributes of these
    names (its lists and attempts by reference: nothing changes them once the
    exchange is recorded)."""

    trace_id: int
    span_id: int
    parent_span_id: int
    trace_flags: int
    trace_state: str | None
    started_wall: float
    started: float
    duration: float
    ended: float | None
    method: str
    route: str | None
    path: str
    request_id: str
    status: int
    error_type: str | None
    cache_result: str | None
    prompt_fingerprint: str | None
    tenant: str | None
    prompt_version: str | None
    operation: str | None
    request_model: str | None
    provider: str | None
    stream: bool
    response_model: str | None
    response_id: str | None
    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int | None
    cache_creation_input_tokens: int | None
    reasoning_tokens: int | None
    usage_source: str | None
    finish_reasons: list[str]
    t_first_token: float | None
    attempts: list[Attempt]


_TAKE = attrgetter(*Copy._fields)


def copy(ex: Exchange) -> Copy:
    """What the spans of ``ex`` are built from, in one C call."""
    for attempt in ex.attempts:
        if not attempt.span_id:  # one never sent upstream
            attempt.span_id = getrandbits(64) or 1
    # tuple.__new__ rather than Copy._make: the same tuple, without its checks.
    return tuple.__new__(Copy, _TAKE(ex))


def count(copied: Copy) -> int:
    """How many spans ``copied`` makes."""
    return 1 + len(copied.attempts)


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
            if copied.trace_state:  # rare, and TraceState normalises it
                spans = readable(copied, self.resource, self.scope)
                encoded += map(otlp.span_bytes, spans)
            else:
                encoded += _encode(copied)
        return otlp.resource_spans(self.resource, {self.scope: encoded})


def readable(
    copied: Copy, resource: Resource, scope: InstrumentationScope
) -> list[ReadableSpan]:
    """The SERVER span and the CLIENT spans of one copied exchange."""
    c = copied
    trace_flags = _FLAGS.get(c.trace_flags) or TraceFlags(c.trace_flags)
    trace_state = TraceState.from_header([c.trace_state]) if c.trace_state else None
    server = SpanContext(c.trace_id, c.span_id, False, trace_flags, trace_state)
    parent = None
    if c.parent_span_id:
        parent = SpanContext(
            c.trace_id, c.parent_span_id, True, trace_flags, trace_state
        )
    start_ns, end_ns = _times(c)
    attribution = _attribution(c)
    spans = [
        ReadableSpan(
            _server_name(c),
            context=server,
            parent=parent,
            resource=resource,
            attributes=_as_dict(_server_attributes(c), attribution),
            kind=SpanKind.SERVER,
            status=_ERROR if _server_failed(c) else _UNSET,
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=scope,
        )
    ]
    last = len(c.attempts) - 1
    for i, attempt in enumerate(c.attempts):
        spans.append(
            ReadableSpan(
                _client_name(c),
                context=SpanContext(
                    c.trace_id, attempt.span_id, False, trace_flags, trace_state
                ),
                parent=server,
                resource=resource,
                attributes=_as_dict(
                    _client_attributes(c, attempt, i == last), attribution
                ),
                kind=SpanKind.CLIENT,
                status=_ERROR if attempt.error_type else _UNSET,
                start_time=_at(c, start_ns, attempt.started),
                end_time=_attempt_end(c, start_ns, end_ns, attempt),
                instrumentation_scope=scope,
            )
        )
    return spans


def _encode(copied: Copy) -> list[bytes]:
    """As ``readable`` and then ``otlp.span_bytes``, without the span objects."""
    c = copied
    trace_id, span_id, parent_id = c.trace_id, c.span_id, c.parent_span_id
    high, low = trace_id >> 64, trace_id & _U64
    start_ns, end_ns = _times(c)
    attribution = _encoded_run(_attribution(c))
    if parent_id:
        ids = _IDS_PARENT(
            _TRACE_TAG, high, low, _SPAN_TAG, span_id, _PARENT_TAG, parent_id
        )
    else:
        ids = _IDS(_TRACE_TAG, high, low, _SPAN_TAG, span_id)
    run, fresh = _server_attributes(c)
    parts = [
        ids,
        otlp.name_field(_server_name(c)),
        _SERVER_KIND,
        _TIMES(0x39, start_ns, 0x41, end_ns),
        _encoded_run(run),
        *_encoded_fresh(fresh),
        attribution,
        _ERROR_FIELD if _server_failed(c) else _UNSET_FIELD,
        otlp.REMOTE_FLAGS if parent_id else otlp.LOCAL_FLAGS,
    ]
    spans = [b"".join(parts)]

    name = otlp.name_field(_client_name(c))
    last = len(c.attempts) - 1
    for i, attempt in enumerate(c.attempts):
        run, fresh = _client_attributes(c, attempt, i == last)
        times = (
            _at(c, start_ns, attempt.started),
            _attempt_end(c, start_ns, end_ns, attempt),
        )
        parts = [
            _IDS_PARENT(
                _TRACE_TAG, high, low, _SPAN_TAG, attempt.span_id, _PARENT_TAG, span_id
            ),
            name,
            _CLIENT_KIND,
            _TIMES(0x39, times[0], 0x41, times[1]),
            _encoded_run(run),
            *_encoded_fresh(fresh),
            attribution,
            _ERROR_FIELD if attempt.error_type else _UNSET_FIELD,
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


def _times(c: Copy) -> tuple[int, int]:
    """The exchange's start and end, in nanoseconds since the epoch."""
    start_ns = int(c.started_wall * 1e9)
    return start_ns, start_ns + int(c.duration * 1e9)


def _at(c: Copy, start_ns: int, t: float) -> int:
    """Monotonic time ``t`` of the exchange, in nanoseconds since the epoch."""
    return start_ns + int((t - c.started) * 1e9)


def _attempt_end(c: Copy, start_ns: int, end_ns: int, attempt: Attempt) -> int:
    """An attempt ends when it ended, else when the exchange did."""
    ended = attempt.ended if attempt.ended is not None else c.ended
    return end_ns if ended is None else _at(c, start_ns, ended)


# The attributes of each span, in the order they are written: first the ones
# that repeat from exchange to exchange (route, status, upstream, model, finish
# reasons), as one run the encoder keeps whole, then the ones that take a new
# value nearly every time (ids, token counts, times), each written on its own.

Pair = tuple[str, AttributeValue]
SpanAttributes = tuple[tuple[Pair, ...], list[Pair]]


def _server_name(c: Copy) -> str:
    return f"{c.method} {c.route or 'unrouted'}"


def _server_failed(c: Copy) -> bool:
    # HTTP semconv: a 4xx is the client's doing, not a failure of the server span;
    # the CLIENT span of a rejected attempt still carries the error.
    return bool(c.error_type) and not 400 <= c.status < 500


def _server_attributes(c: Copy) -> SpanAttributes:
    run: list[Pair] = [
        (http_attributes.HTTP_REQUEST_METHOD, c.method),
        (url_attributes.URL_PATH, c.path[:MAX_PATH]),
    ]
    if c.route:
        run += ((http_attributes.HTTP_ROUTE, c.route), ("llmproxy.route", c.route))
    if c.status:
        run.append((http_attributes.HTTP_RESPONSE_STATUS_CODE, c.status))
    if c.error_type:
        run.append((error_attributes.ERROR_TYPE, c.error_type))
    if c.cache_result:
        run.append(("llmproxy.cache", c.cache_result))
    return tuple(run), [(_REQUEST_ID, c.request_id)]


def _attribution(c: Copy) -> tuple[Pair, ...]:
    """The attributes of both spans that say whose request it was."""
    run: list[Pair] = []
    if c.prompt_fingerprint:
        run.append(("llmproxy.prompt.fingerprint", c.prompt_fingerprint))
    # The values the proxy checked at the boundary, never the raw headers: the
    # only request headers that reach a span, and credentials never do.
    if c.tenant:
        run.append(("llmproxy.tenant", c.tenant[:MAX_ATTRIBUTE]))
    if c.prompt_version:
        run.append(("llmproxy.prompt.version", c.prompt_version[:MAX_ATTRIBUTE]))
    return tuple(run)


def _client_name(c: Copy) -> str:
    if not c.operation:
        return str(c.method)
    if c.request_model:
        return f"{c.operation} {c.request_model}"
    return str(c.operation)


def _client_attributes(c: Copy, attempt: Attempt, last: bool) -> SpanAttributes:
    status, error_type = attempt.status, attempt.error_type
    run: list[Pair] = [
        (server_attributes.SERVER_ADDRESS, attempt.server_address),
        (server_attributes.SERVER_PORT, attempt.server_port),
        ("llmproxy.upstream", attempt.upstream),
    ]
    fresh: list[Pair] = [(_REQUEST_ID, c.request_id)]
    if c.route:
        run.append(("llmproxy.route", c.route))
    if status:
        run.append((http_attributes.HTTP_RESPONSE_STATUS_CODE, status))
    if error_type:
        run.append((error_attributes.ERROR_TYPE, error_type))
    if not c.operation:
        run.append((http_attributes.HTTP_REQUEST_METHOD, c.method))
        return tuple(run), fresh

    run += (
        (gen_ai.GEN_AI_OPERATION_NAME, c.operation),
        (gen_ai.GEN_AI_REQUEST_STREAM, c.stream),
    )
    if c.provider:
        run.append((gen_ai.GEN_AI_PROVIDER_NAME, c.provider))
    if c.request_model:
        run.append((gen_ai.GEN_AI_REQUEST_MODEL, c.request_model))
    if not last:  # only the attempt whose response the client got has the rest
        return tuple(run), fresh

    if c.response_model is not None:
        run.append((gen_ai.GEN_AI_RESPONSE_MODEL, c.response_model))
    if c.usage_source is not None:
        run.append(("llmproxy.usage_source", c.usage_source))
    if c.finish_reasons:
        finish_reasons = tuple(c.finish_reasons)  # a tuple: runs are dict keys
        run.append((gen_ai.GEN_AI_RESPONSE_FINISH_REASONS, finish_reasons))
    if c.response_id is not None:
        fresh.append((gen_ai.GEN_AI_RESPONSE_ID, c.response_id))
    for key, field in _USAGE:
        value = getattr(c, field)
        if value is not None:
            fresh.append((key, value))
    if c.stream and c.t_first_token is not None:
        ttfc = c.t_first_token - attempt.started
        fresh.append((gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, ttfc))
    return tuple(run), fresh


_REQUEST_ID = "llmproxy.request_id"
# (attribute key, field of the copy) of the usage counts, in the order written.
_USAGE = (
    (gen_ai.GEN_AI_USAGE_INPUT_TOKENS, "input_tokens"),
    (gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS, "output_tokens"),
    (gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, "cached_input_tokens"),
    (gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, "cache_creation_input_tokens"),
    (gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, "reasoning_tokens"),
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
            out.append(otlp.fresh_string(_key_field(key), value))
        elif value.__class__ is float:
            out.append(otlp.fresh_double(_key_field(key), value))
        else:  # token counts: they repeat enough to be worth keeping
            out.append(otlp.attribute(key, value) or b"")
    return out


def _key_field(key: str) -> bytes:
    field = _FRESH_KEYS.get(key)
    if field is None:
        field = _FRESH_KEYS[key] = otlp.key_field(key)
    return field


def _as_dict(attributes: SpanAttributes, attribution: tuple[Pair, ...]) -> Attributes:
    run, fresh = attributes
    return dict(run) | dict(fresh) | dict(attribution)
