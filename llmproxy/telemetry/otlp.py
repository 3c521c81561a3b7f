"""OTLP span encoding, written straight to the protobuf wire format.

The exporters of the OpenTelemetry SDK build a protobuf object per span,
attribute and value before serialising them: about 75 microseconds a span,
which at two spans a request cost more CPU than forwarding the request. This
encoder writes the same bytes directly, so the exporters' transport, retries and
headers are untouched. ``install`` puts it in place of the SDK's
``encode_spans`` in the OTLP/HTTP or OTLP/gRPC trace exporter's module (the HTTP
exporter is handed the bytes as they are, gRPC's stub a message parsed from
them); where a version of that module has no such name, it does nothing and the
SDK's own encoder runs. Spans with events or links, which llmproxy never makes,
go to the SDK's encoder too. A batch that is an ``Encodable`` writes itself (the
proxy's own spans, see ``spans``) with the field writers below.
``tests/test_otlp.py`` holds the output equal to the SDK's.
"""

from __future__ import annotations

import importlib
import struct
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as sdk_encode_spans,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

# The modules whose ``encode_spans`` the exporters call when they export.
EXPORTER_MODULES = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
)
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
# Span.flags: the context's is-remote bit is known (0x100), and set (0x200).
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
# Span fields that take few values, encoded once: kind (6), flags (16).
KIND_FIELD = {kind: b"\x30" + bytes((value,)) for kind, value in _KIND.items()}
LOCAL_FLAGS = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE)
REMOTE_FLAGS = b"\x85\x01" + _FIXED32(_HAS_IS_REMOTE | _IS_REMOTE)
_DOUBLE = struct.Struct("<d").pack
_U64 = (1 << 64) - 1
# Encoded span attributes by (key, type, value); only the export thread uses it.
_PAIRS: dict[tuple[str, type, Any], bytes] = {}
_MAX_PAIRS = 4096
# Encoded span names (field 5) and statuses (field 15), which repeat as much.
_NAMES: dict[str, bytes] = {}
_STATUSES: dict[tuple[int, str | None], bytes] = {}
# Encoded spans by instrumentation scope, in order of first appearance.
Groups = dict[InstrumentationScope | None, list[bytes]]


def install(module_name: str) -> bool:
    """Use this encoder in the exporter module ``module_name`` (one of
    ``EXPORTER_MODULES``); True if it took."""
    module = importlib.import_module(module_name)
    if getattr(module, "encode_spans", None) is not sdk_encode_spans:
        return False
    # The HTTP exporter only serialises what it is given: the bytes can go as
    # they are. gRPC's stub needs the message itself.
    http = module_name == EXPORTER_MODULES[0]
    module.encode_spans = encode_spans_serialized if http else encode_spans  # type: ignore[attr-defined]
    return True


class Encodable(Sequence[ReadableSpan]):
    """A batch of spans that can write its own export request, faster than the
    spans it yields could be encoded one by one."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """The batch as a serialised ``ExportTraceServiceRequest``."""


class Serialized(bytes):
    """Encoded spans that answer the serialising calls an exporter makes of an
    ``ExportTraceServiceRequest``, without a parse and a re-serialisation."""

    def SerializeToString(self) -> bytes:  # protobuf's name
        return bytes(self)

    SerializePartialToString = SerializeToString


def encode_spans_serialized(
    spans: Sequence[ReadableSpan],
) -> Serialized | ExportTraceServiceRequest:
    """As ``encode_spans``, for an exporter that only serialises the request."""
    if isinstance(spans, Encodable):
        return Serialized(spans.to_bytes())
    if any(span.events or span.links for span in spans):
        request: ExportTraceServiceRequest = sdk_encode_spans(spans)
        return request
    return Serialized(encode_spans_bytes(spans))


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The export request for ``spans``, equal to the SDK's ``encode_spans``."""
    encoded = encode_spans_serialized(spans)
    if isinstance(encoded, Serialized):
        request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
            encoded
        )
        return request
    return encoded


def encode_spans_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    """``spans`` as a serialised ``ExportTraceServiceRequest``, grouped by
    resource, then by instrumentation scope, in order of first appearance."""
    groups: dict[int, tuple[Resource, Groups]] = {}
    resources: list[Resource] = []
    for span in spans:
        resource = _same(span.resource, groups, resources)
        scope = span.instrumentation_scope or None
        groups[id(resource)][1].setdefault(scope, []).append(span_bytes(span))
    return b"".join(
        resource_spans(resource, scopes) for resource, scopes in groups.values()
    )


def resource_spans(resource: Resource, scopes: Groups) -> bytes:
    """Field 1 of the request: one resource and its encoded spans by scope."""
    body = [_message(1, _resource(resource))]
    for scope, encoded in scopes.items():
        body.append(_message(2, _scope_spans(scope, encoded)))
    if resource.schema_url:
        body.append(_string(3, resource.schema_url))
    return _message(1, b"".join(body))


def _same(
    resource: Resource,
    groups: dict[int, tuple[Resource, Groups]],
    resources: list[Resource],
) -> Resource:
    """The group's resource equal to ``resource`` (the SDK groups by equality);
    usually the very same object, found by identity without hashing."""
    if id(resource) in groups:
        return groups[id(resource)][0]
    for known in resources:
        if known == resource:
            return known
    groups[id(resource)] = (resource, {})
    resources.append(resource)
    return resource


def _resource(resource: Resource) -> bytes:
    return _attributes(1, resource.attributes)


def _scope_spans(scope: InstrumentationScope | None, spans: list[bytes]) -> bytes:
    parts = [_message(1, _scope(scope))]
    parts += [_message(2, span) for span in spans]
    if scope is not None and scope.schema_url:
        parts.append(_string(3, scope.schema_url))
    return b"".join(parts)


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    parts = []
    if scope.name:
        parts.append(_string(1, scope.name))
    if scope.version:
        parts.append(_string(2, scope.version))
    parts.append(_attributes(3, scope.attributes))
    return b"".join(parts)


def span_bytes(span: ReadableSpan) -> bytes:
    """One span as ``ScopeSpans.spans`` holds it, without its field tag."""
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
    ]
    state = context.trace_state
    if state:  # never None in a SpanContext, usually empty
        text = ",".join(f"{key}={value}" for key, value in state.items())
        if text:
            parts.append(_string(3, text))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    if span.name:
        parts.append(name_field(span.name))
    kind = KIND_FIELD.get(span.kind)
    if kind is not None:
        parts.append(kind)
    if span.start_time:
        parts.append(b"\x39" + FIXED64(span.start_time))
    if span.end_time:
        parts.append(b"\x41" + FIXED64(span.end_time))
    parts += _span_attributes(span.attributes)
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    status = span.status
    parts.append(status_field(status.status_code.value, status.description))
    remote = parent is not None and parent.is_remote
    parts.append(REMOTE_FLAGS if remote else LOCAL_FLAGS)
    return b"".join(parts)


def name_field(name: str) -> bytes:
    """Span.name (field 5), kept encoded: names repeat from span to span."""
    encoded = _NAMES.get(name)
    if encoded is None:
        encoded = _string(5, name)
        if len(_NAMES) >= _MAX_PAIRS:
            _NAMES.clear()
        _NAMES[name] = encoded
    return encoded


def status_field(code: int, description: str | None = None) -> bytes:
    """Span.status (field 15) of a status code's value, kept encoded."""
    key = (code, description)
    encoded = _STATUSES.get(key)
    if encoded is None:
        parts = []
        if description:
            parts.append(_string(2, description))
        if code:
            parts.append(b"\x18" + _varint(code))
        encoded = _message(15, b"".join(parts))
        if len(_STATUSES) >= _MAX_PAIRS:
            _STATUSES.clear()
        _STATUSES[key] = encoded
    return encoded


def _attributes(field: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    parts = []
    for key, value in attributes.items():
        try:
            parts.append(_message(field, _key_value(key, value)))
        except TypeError:
            continue  # as the SDK's encoder does: that attribute is left out
    return b"".join(parts)


def _span_attributes(attributes: Mapping[str, Any] | None) -> list[bytes]:
    """Field 9 of a span, one entry per attribute (left out if its value has
    no encoding)."""
    if not attributes:
        return []
    parts = []
    for key, value in attributes.items():
        encoded = attribute(key, value)
        if encoded is not None:
            parts.append(encoded)
    return parts


def attribute(key: str, value: Any) -> bytes | None:
    """One span attribute (field 9), or None if its value has no encoding (as
    the SDK's encoder leaves it out). Most attributes repeat from span to span
    (operation, provider, model, route, status), so each encoded pair is kept,
    by its key, type and value, for the next span; ``fresh_string`` is for the
    values that never repeat."""
    # The type is part of the key: True == 1 == 1.0, but each encodes apart.
    pair = (key, value.__class__, value)
    try:
        encoded = _PAIRS.get(pair)
    except TypeError:  # an unhashable value (a list): encoded every time
        return fresh_attribute(key, value)
    if encoded is None and (encoded := fresh_attribute(key, value)) is not None:
        if len(_PAIRS) >= _MAX_PAIRS:
            _PAIRS.clear()
        _PAIRS[pair] = encoded
    return encoded


def key_field(key: str) -> bytes:
    """``KeyValue.key`` encoded, for ``fresh_string`` and ``fresh_double``."""
    return _string(1, key)


def fresh_string(key: bytes, text: str) -> bytes:
    """A string attribute (field 9) from its encoded ``key_field``, not kept."""
    data = text.encode()
    size = len(data)
    pair = len(key) + size + 4  # key, then the value's tag, length and AnyValue
    if pair < 0x80:
        return bytes((0x4A, pair)) + key + bytes((0x12, size + 2, 0x0A, size)) + data
    return _message(9, key + _message(2, _message(1, data)))


def fresh_double(key: bytes, value: float) -> bytes:
    """A float attribute (field 9) from its encoded ``key_field``, not kept."""
    pair = len(key) + 11
    if pair < 0x80:
        return bytes((0x4A, pair)) + key + b"\x12\x09\x21" + _DOUBLE(value)
    return _message(9, key + b"\x12\x09\x21" + _DOUBLE(value))


def fresh_attribute(key: str, value: Any) -> bytes | None:
    """As ``attribute``, for a value that never repeats: not kept."""
    try:
        return _message(9, _key_value(key, value))
    except TypeError:
        return None  # as the SDK's encoder does: that attribute is left out


def _key_value(key: str, value: Any) -> bytes:
    return (_string(1, key) if key else b"") + _message(2, _value(value))


def _value(value: Any) -> bytes:
    """An ``AnyValue``: a set oneof is written even when it holds its default."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        data = value.encode()
        return b"\x0a" + _varint(len(data)) + data
    if isinstance(value, int):
        return b"\x18" + _varint(value & _U64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return b"\x3a" + _varint(len(value)) + value
    if isinstance(value, Sequence):
        return _message(5, b"".join(_message(1, _value(v)) for v in value))
    if isinstance(value, Mapping):
        pairs = b"".join(_message(1, _key_value(str(k), v)) for k, v in value.items())
        return _message(6, pairs)
    raise TypeError(f"attribute value of type {type(value).__name__}")


def _string(field: int, text: str) -> bytes:
    return _message(field, text.encode())


def _message(field: int, data: bytes) -> bytes:
    """A length-delimited field: tag, length, bytes."""
    size = len(data)
    if field < 16 and size < _SIZES_KEPT:
        return _TAGS[field] + _SIZES[size] + data
    return _varint(field << 3 | 2) + _varint(size) + data


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# The tags of length-delimited fields 0 to 15, and the varints of the lengths
# most messages have, written once.
_TAGS = [bytes((field << 3 | 2,)) for field in range(16)]
_SIZES_KEPT = 4096
_SIZES = [_varint(n) for n in range(_SIZES_KEPT)]
