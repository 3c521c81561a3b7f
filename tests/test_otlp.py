"""The wire encoder of spans against the SDK's: the same bytes, in less time."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as sdk_encode_spans,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState
from test_tracing import add_attempt, chat_exchange, headers

from llmproxy.exchange import Exchange
from llmproxy.telemetry import otlp, spans
from llmproxy.telemetry.tracing import _SCOPE, Tracer

TRACE, SPAN, PARENT = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 0x1234


def proxy_spans(count: int = 20) -> list[ReadableSpan]:
    """Spans as the proxy makes them: a SERVER and a CLIENT span per exchange."""
    exporter = InMemorySpanExporter()
    tracer = Tracer(exporter, batch=False)
    for i in range(count):
        ex = chat_exchange(headers(x_llmproxy_tenant=f"team-{i}"))
        if i % 2:
            ex.fail("rate_limited", "slow down")
            ex.status = 429
        tracer.start(
            ex, {"traceparent": f"00-{TRACE:032x}-{SPAN:016x}-01"} if i % 3 else {}
        )
        add_attempt(tracer, ex, 0.0, 0.5, status=ex.status)
        tracer.sink(ex)
    return list(exporter.get_finished_spans())


def odd_spans() -> list[ReadableSpan]:
    """Every attribute type, and the corners of each span field."""
    state = TraceState([("vendor", "a1"), ("other", "b2")])
    remote = SpanContext(TRACE, PARENT, True)
    local = SpanContext(TRACE, PARENT, False)
    attributes = {
        "s": "text ✓",
        "empty": "",
        "yes": True,
        "no": False,
        "zero": 0,
        "negative": -42,
        "big": 2**62,
        "pi": 3.14159,
        "zero.float": 0.0,
        "strings": ("a", "", "c"),
        "ints": [1, -2, 3],
        "bools": (True, False),
        "none.in.list": [None],
    }
    scopes = (InstrumentationScope("llmproxy", "1.2"), InstrumentationScope("x"))
    resources = (
        Resource({"service.name": "a", "n": 1}),
        Resource({"service.name": "b"}, "https://schema.example/1"),
        Resource({"service.name": "a", "n": 1}),  # equal to the first: one group
    )
    spans = []
    for i, (kind, parent, status) in enumerate(
        [
            (SpanKind.SERVER, remote, Status(StatusCode.ERROR, "it broke")),
            (SpanKind.CLIENT, local, Status(StatusCode.OK)),
            (SpanKind.INTERNAL, None, Status(StatusCode.UNSET)),
            (SpanKind.CONSUMER, remote, Status(StatusCode.ERROR)),
        ]
    ):
        for j, resource in enumerate(resources):
            spans.append(
                ReadableSpan(
                    "" if i == 2 else f"span {i}.{j}",
                    context=SpanContext(
                        TRACE,
                        SPAN + i * 10 + j,
                        False,
                        trace_state=state if i else None,
                    ),
                    parent=parent,
                    resource=resource,
                    attributes=attributes if j != 1 else {},
                    kind=kind,
                    status=status,
                    start_time=1_700_000_000_000_000_000 + i,
                    end_time=1_700_000_000_500_000_000 + i if i != 3 else None,
                    instrumentation_scope=scopes[(i + j) % 2] if i != 2 else None,
                )
            )
    return spans


@pytest.mark.parametrize("make", [proxy_spans, odd_spans], ids=["proxy", "odd"])
def test_same_bytes_as_the_sdk(make: object) -> None:
    spans = make()  # type: ignore[operator]
    ours = otlp.encode_spans(spans).SerializeToString(deterministic=True)
    theirs = sdk_encode_spans(spans).SerializeToString(deterministic=True)
    assert ours == theirs
    # Written in field order, the raw bytes need no normalising either.
    assert otlp.encode_spans_bytes(spans) == sdk_encode_spans(spans).SerializeToString()
    # What the HTTP exporter sends, without the parse of a message.
    serialized = otlp.encode_spans_serialized(spans)
    assert (
        serialized.SerializePartialToString()
        == sdk_encode_spans(spans).SerializePartialToString()
    )


def shaped_exchanges() -> list[Exchange]:
    """Exchanges of every shape the spans take: each optional attribute on and
    off, remote and local parents, trace states, retries, failures, no answer."""
    tracer = Tracer(InMemorySpanExporter(), batch=False)
    out = []
    for i in range(48):
        ex = chat_exchange(
            headers(x_llmproxy_tenant=f"team-{i % 5}", x_llmproxy_prompt_version="v2")
            if i % 4 == 0
            else None
        )
        context: dict[str, str] = {}
        if i % 3:
            context["traceparent"] = f"00-{TRACE:032x}-{SPAN:016x}-01"
        if i % 7 == 1:
            context["tracestate"] = "vendor=a1,other=b2"
        tracer.start(ex, context)
        ex.request_id = f"req-{i}-✓"
        ex.path = "/v1/chat/completions" + "/x" * (600 if i == 5 else i % 2)
        if i % 2:
            ex.fail("rate_limited", "slow down")
            ex.status = 429
        if i % 5 == 2:
            ex.fail("upstream_timeout")
            ex.status = 504
        if i % 6 == 3:
            ex.operation = ex.request_model = None
        if i % 6 == 4:
            ex.request_model = None
        if i % 8 == 5:
            ex.route = None
        if i % 9 == 6:
            ex.cache_result = "miss"
        if i % 4 == 3:
            ex.stream, ex.t_first_token = False, None
        if i % 5 == 1:
            ex.response_model = ex.response_id = ex.usage_source = None
            ex.input_tokens = ex.output_tokens = ex.reasoning_tokens = None
            ex.finish_reasons = []
        if i % 10 == 7:
            ex.prompt_fingerprint = None
        attempts = (i % 3) if i % 11 else 0
        for k in range(attempts):
            add_attempt(tracer, ex, 0.1 * k, 0.1 * k + 0.05, status=(500, 200)[k % 2])
        if attempts and i % 4 == 1:
            ex.attempts[-1].ended = None
            ex.attempts[-1].error_type = "client_disconnected"
        if i == 47:
            ex.ended = None  # still running when copied: ends now
        out.append(ex)
    return out


def test_direct_encoding_is_the_sdks() -> None:
    resource = Resource({"service.name": "llmproxy", "n": 1}, "https://schema/1")
    copies = [spans.copy(ex) for ex in shaped_exchanges()]
    batch = spans.SpanBatch(copies, resource, _SCOPE)
    built = list(batch)
    assert len(batch) == len(built) == sum(1 + len(c[-1]) for c in copies)
    assert {s.kind for s in built} == {SpanKind.SERVER, SpanKind.CLIENT}
    assert any(s.context.trace_state for s in built)
    assert batch.to_bytes() == sdk_encode_spans(built).SerializeToString()
    # Each copy alone too: the grouping of a batch hides no span's bytes.
    for copied in copies:
        one = spans.SpanBatch([copied], resource, _SCOPE)
        assert one.to_bytes() == sdk_encode_spans(list(one)).SerializeToString()
    # The exporters' entry points take the batch as it is.
    assert otlp.encode_spans_serialized(batch) == batch.to_bytes()
    assert otlp.encode_spans(batch) == sdk_encode_spans(built)


def test_a_batch_pauses_between_slices_while_it_encodes() -> None:
    resource = Resource({"service.name": "llmproxy"})
    copies = [spans.copy(ex) for ex in shaped_exchanges()] * 2  # 96 exchanges
    pauses: list[int] = []
    paced = spans.SpanBatch(copies, resource, _SCOPE, lambda: pauses.append(1))
    assert paced.to_bytes() == spans.SpanBatch(copies, resource, _SCOPE).to_bytes()
    # After the 32nd and the 64th copy: never before the first or after the last.
    assert len(pauses) == (len(copies) - 1) // spans.PAUSE_EVERY == 2


def test_events_and_links_go_to_the_sdk_encoder() -> None:
    (base,) = proxy_spans(1)[:1]
    span = ReadableSpan(
        "with events",
        context=base.context,
        resource=base.resource,
        events=[Event("e", {"k": 1}, timestamp=5)],
        links=[Link(SpanContext(TRACE, PARENT, True), {"l": "x"})],
        start_time=1,
        end_time=2,
    )
    assert otlp.encode_spans([span]) == sdk_encode_spans([span])


def test_install_replaces_the_exporters_encoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in otlp.EXPORTER_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "encode_spans", sdk_encode_spans)
        assert otlp.install(name)
        http = name == otlp.EXPORTER_MODULES[0]
        expected = otlp.encode_spans_serialized if http else otlp.encode_spans
        assert module.encode_spans is expected
        # A module that no longer calls the SDK's encoder is left alone.
        monkeypatch.setattr(module, "encode_spans", len)
        assert not otlp.install(name)
        assert module.encode_spans is len


def speedup(fast: Callable[[], object], slow: Callable[[], object]) -> float:
    """How many times faster ``fast`` is than ``slow``: the best of seven runs
    each, taken in turns so that a busy moment of a shared machine slows both."""
    best = [float("inf"), float("inf")]
    for _ in range(7):
        for i, run in enumerate((fast, slow)):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[1] / best[0]


def test_direct_encoding_several_times_faster_than_the_sdk() -> None:
    exchanges = shaped_exchanges() * 4
    resource = Resource({"service.name": "llmproxy"})

    def direct() -> None:
        copies = [spans.copy(ex) for ex in exchanges]
        spans.SpanBatch(copies, resource, _SCOPE).to_bytes()

    def sdk() -> None:
        copies = [spans.copy(ex) for ex in exchanges]
        sdk_encode_spans(list(spans.SpanBatch(copies, resource, _SCOPE)))

    # Copy to bytes against copy to SDK spans to the SDK's encoding, in one run.
    assert speedup(direct, sdk) > 4


def test_several_times_faster_than_the_sdk() -> None:
    made = proxy_spans(200)
    # A ratio measured in one run, not an absolute time.
    assert (
        speedup(
            lambda: otlp.encode_spans(made).SerializeToString(),
            lambda: sdk_encode_spans(made).SerializeToString(),
        )
        > 3
    )
