"""Trace context and span building, on an in-memory exporter."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
    url_attributes,
)
from opentelemetry.trace import SpanKind, StatusCode

from llmproxy.errors import ConfigError
from llmproxy.exchange import Attempt, Exchange
from llmproxy.forward import _attribution
from llmproxy.telemetry.tracing import Tracer

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
SECRETS = ("sk-secret-authorization", "sk-secret-x-api-key", "sk-secret-api-key")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Iterator[Tracer]:
    t = Tracer(exporter, Resource({"service.name": "llmproxy-test"}), batch=False)
    yield t
    t.shutdown()


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(
        CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})
    )


def chat_exchange(request_headers: CIMultiDictProxy[str] | None = None) -> Exchange:
    """A finished streamed chat exchange with one successful attempt."""
    ex = Exchange("req-1", "POST", "/v1/chat/completions")
    ex.request_headers = request_headers
    # Tenant and prompt version as the request boundary checked them.
    _attribution(ex, request_headers or {})
    ex.route, ex.upstream, ex.provider, ex.api = "/v1", "openai", "openai", "openai"
    ex.operation, ex.request_model, ex.response_model = "chat", "gpt-4", "gpt-4-0613"
    ex.response_id, ex.stream, ex.status = "chatcmpl-1", True, 200
    ex.finish_reasons = ["stop"]
    ex.input_tokens, ex.output_tokens, ex.cached_input_tokens = 12, 5, 2
    ex.cache_creation_input_tokens, ex.reasoning_tokens = 3, 4
    ex.usage_source, ex.prompt_fingerprint = "provider", "fp-abc"
    ex.t_first_token = ex.started + 0.25
    ex.ended = ex.started + 1.0
    return ex


def add_attempt(
    tracer: Tracer, ex: Exchange, start: float, end: float, status: int = 200
) -> Attempt:
    attempt = Attempt("openai", "api.example.com", 443)
    attempt.started, attempt.ended = ex.started + start, ex.started + end
    attempt.status = status
    ex.attempts.append(attempt)
    tracer.inject(ex, attempt, CIMultiDict())
    return attempt


def by_kind(spans: Sequence[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


# Trace context on the request path


def test_traceparent_is_continued(tracer: Tracer) -> None:
    ex = chat_exchange()
    tracer.start(ex, headers(traceparent=CLIENT_TRACEPARENT))
    assert f"{ex.trace_id:032x}" == TRACE
    assert f"{ex.parent_span_id:016x}" == PARENT
    assert ex.span_id not in (0, ex.parent_span_id)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"00-{TRACE}-{PARENT}",  # no flags
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"00-{TRACE.upper()}-{PARENT}-01",  # uppercase hex
        f"00-{TRACE}-{PARENT.upper()}-01",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # forbidden version
        f"0-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}0-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-0g",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE[:-2]}_1-{PARENT}-01",  # int() would accept the underscore
        f" 00-{TRACE}-{PARENT}-01",
        f"00-+{TRACE[1:]}-{PARENT}-01",
    ],
)
def test_invalid_traceparent_starts_a_new_trace(tracer: Tracer, value: str) -> None:
    ex = chat_exchange()
    tracer.start(ex, headers(traceparent=value, tracestate="vendor=1"))
    assert ex.trace_id and f"{ex.trace_id:032x}" != TRACE
    assert ex.parent_span_id == 0

    out: CIMultiDict[str] = CIMultiDict(traceparent=value, tracestate="vendor=1")
    out.add("tracestate", "other=2")
    tracer.inject(ex, Attempt("openai", "h", 1), out)
    assert out.getall("traceparent") == [out["traceparent"]]
    assert out["traceparent"].endswith("-01")
    assert "tracestate" not in out  # it belonged to the discarded context


def test_duplicated_traceparent_starts_a_new_trace(tracer: Tracer) -> None:
    raw: CIMultiDict[str] = CIMultiDict()
    raw.add("traceparent", CLIENT_TRACEPARENT)
    raw.add("traceparent", CLIENT_TRACEPARENT)
    ex = chat_exchange()
    tracer.start(ex, CIMultiDictProxy(raw))
    assert f"{ex.trace_id:032x}" != TRACE and ex.parent_span_id == 0


def test_later_traceparent_version_is_parsed(tracer: Tracer) -> None:
    ex = chat_exchange()
    tracer.start(ex, headers(traceparent=f"01-{TRACE}-{PARENT}-01-future"))
    assert f"{ex.trace_id:032x}" == TRACE


def test_without_traceparent_a_new_trace_is_sampled(tracer: Tracer) -> None:
    ex = chat_exchange()
    tracer.start(ex, {})
    assert ex.trace_id and ex.span_id and ex.parent_span_id == 0
    out: CIMultiDict[str] = CIMultiDict()
    attempt = Attempt("openai", "h", 1)
    tracer.inject(ex, attempt, out)
    assert out["traceparent"] == f"00-{ex.trace_id:032x}-{attempt.span_id:016x}-01"


def test_inject_names_the_attempt_as_parent_and_keeps_tracestate(
    tracer: Tracer,
) -> None:
    raw: CIMultiDict[str] = CIMultiDict(traceparent=CLIENT_TRACEPARENT)
    raw.add("tracestate", "a=1")
    raw.add("tracestate", "b=2")
    ex = chat_exchange()
    tracer.start(ex, CIMultiDictProxy(raw))

    first, second = Attempt("openai", "h", 1), Attempt("openai", "h", 1)
    out: CIMultiDict[str] = CIMultiDict(raw)
    tracer.inject(ex, first, out)
    assert out.getall("traceparent") == [f"00-{TRACE}-{first.span_id:016x}-01"]
    assert out.getall("tracestate") == ["a=1,b=2"]
    tracer.inject(ex, second, out)
    assert second.span_id not in (0, first.span_id, ex.span_id)
    assert out["traceparent"] == f"00-{TRACE}-{second.span_id:016x}-01"


def test_inject_without_start_leaves_headers_alone(tracer: Tracer) -> None:
    out: CIMultiDict[str] = CIMultiDict()
    tracer.inject(chat_exchange(), Attempt("openai", "h", 1), out)
    assert not out


# Spans built after the request


def test_server_and_client_spans(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    ex = chat_exchange(
        headers(x_llmproxy_tenant="acme", x_llmproxy_prompt_version="v7")
    )
    tracer.start(ex, headers(traceparent=CLIENT_TRACEPARENT))
    attempt = add_attempt(tracer, ex, 0.01, 0.9)
    tracer.sink(ex)

    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    assert server.name == "POST /v1"
    assert server.context.trace_id == client.context.trace_id == int(TRACE, 16)
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == int(PARENT, 16)
    assert server.context.span_id == ex.span_id
    assert server.attributes == {
        http_attributes.HTTP_REQUEST_METHOD: "POST",
        http_attributes.HTTP_ROUTE: "/v1",
        http_attributes.HTTP_RESPONSE_STATUS_CODE: 200,
        url_attributes.URL_PATH: "/v1/chat/completions",
        "llmproxy.request_id": "req-1",
        "llmproxy.route": "/v1",
        "llmproxy.tenant": "acme",
        "llmproxy.prompt.version": "v7",
        "llmproxy.prompt.fingerprint": "fp-abc",
    }
    assert server.start_time == int(ex.started_wall * 1e9)
    assert server.end_time == server.start_time + int(1.0 * 1e9)
    assert server.status.status_code is StatusCode.UNSET
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == "llmproxy"
    assert server.resource.attributes["service.name"] == "llmproxy-test"

    assert client.name == "chat gpt-4"
    assert client.context.span_id == attempt.span_id
    assert client.parent is not None and client.parent.span_id == ex.span_id
    # Monotonic offsets become wall time to within float rounding (a few ns).
    assert client.start_time is not None and client.end_time is not None
    assert client.start_time - server.start_time == pytest.approx(0.01e9, abs=100)
    assert client.end_time - server.start_time == pytest.approx(0.9e9, abs=100)
    attrs = dict(client.attributes or {})
    assert attrs.pop(gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK) == pytest.approx(0.24)
    assert attrs == {
        gen_ai.GEN_AI_OPERATION_NAME: "chat",
        gen_ai.GEN_AI_PROVIDER_NAME: "openai",
        gen_ai.GEN_AI_REQUEST_MODEL: "gpt-4",
        gen_ai.GEN_AI_RESPONSE_MODEL: "gpt-4-0613",
        gen_ai.GEN_AI_RESPONSE_ID: "chatcmpl-1",
        gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: ("stop",),
        gen_ai.GEN_AI_REQUEST_STREAM: True,
        gen_ai.GEN_AI_USAGE_INPUT_TOKENS: 12,
        gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: 5,
        gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: 2,
        gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: 3,
        gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: 4,
        server_attributes.SERVER_ADDRESS: "api.example.com",
        server_attributes.SERVER_PORT: 443,
        http_attributes.HTTP_RESPONSE_STATUS_CODE: 200,
        "llmproxy.route": "/v1",
        "llmproxy.upstream": "openai",
        "llmproxy.request_id": "req-1",
        "llmproxy.usage_source": "provider",
        "llmproxy.tenant": "acme",
        "llmproxy.prompt.version": "v7",
        "llmproxy.prompt.fingerprint": "fp-abc",
    }
    assert client.status.status_code is StatusCode.UNSET


def test_only_the_last_attempt_carries_the_response(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    ex = chat_exchange()
    tracer.start(ex, {})
    failed = add_attempt(tracer, ex, 0.0, 0.1, status=503)
    failed.error_type = "upstream_5xx"
    add_attempt(tracer, ex, 0.2, 0.9)
    tracer.sink(ex)

    first, last = sorted(
        by_kind(exporter.get_finished_spans(), SpanKind.CLIENT),
        key=lambda s: s.start_time or 0,
    )
    assert first.attributes is not None and last.attributes is not None
    assert first.attributes[error_attributes.ERROR_TYPE] == "upstream_5xx"
    assert first.attributes[http_attributes.HTTP_RESPONSE_STATUS_CODE] == 503
    assert first.status.status_code is StatusCode.ERROR
    assert gen_ai.GEN_AI_USAGE_INPUT_TOKENS not in first.attributes
    assert gen_ai.GEN_AI_RESPONSE_MODEL not in first.attributes
    assert first.attributes[gen_ai.GEN_AI_REQUEST_MODEL] == "gpt-4"
    assert last.attributes[gen_ai.GEN_AI_USAGE_INPUT_TOKENS] == 12
    assert last.status.status_code is StatusCode.UNSET


def test_errors_mark_the_spans(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    ex = chat_exchange()
    ex.status = 504
    ex.fail("timeout_first_byte", "no response headers within 60s")
    tracer.start(ex, {})
    attempt = add_attempt(tracer, ex, 0.0, 0.9, status=0)
    attempt.error_type = "timeout_first_byte"
    tracer.sink(ex)

    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    for span in (server, client):
        assert span.attributes is not None
        assert span.attributes[error_attributes.ERROR_TYPE] == "timeout_first_byte"
        assert span.status.status_code is StatusCode.ERROR
        assert "within 60s" not in str(span.status.description)
    assert http_attributes.HTTP_RESPONSE_STATUS_CODE not in (client.attributes or {})


def test_a_4xx_leaves_the_server_span_unset(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    ex = chat_exchange()
    ex.status = 429
    ex.fail("rate_limited")
    tracer.start(ex, {})
    add_attempt(tracer, ex, 0.0, 0.5, status=429).error_type = "rate_limited"
    tracer.sink(ex)

    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    assert server.attributes is not None
    assert server.attributes[error_attributes.ERROR_TYPE] == "rate_limited"
    assert server.status.status_code is StatusCode.UNSET
    assert client.status.status_code is StatusCode.ERROR


def test_client_span_names(tracer: Tracer, exporter: InMemorySpanExporter) -> None:
    no_model = chat_exchange()
    no_model.request_model = None
    other = chat_exchange()
    other.method, other.operation = "GET", None
    for ex in (no_model, other):
        tracer.start(ex, {})
        add_attempt(tracer, ex, 0.0, 0.1)
        tracer.sink(ex)

    clients = by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert [s.name for s in clients] == ["chat", "GET"]
    assert clients[1].attributes is not None
    assert clients[1].attributes[http_attributes.HTTP_REQUEST_METHOD] == "GET"
    assert not any(k.startswith("gen_ai.") for k in clients[1].attributes)


def test_unsampled_is_propagated_but_not_exported(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    ex = chat_exchange()
    tracer.start(ex, headers(traceparent=f"00-{TRACE}-{PARENT}-00"))
    out: CIMultiDict[str] = CIMultiDict()
    attempt = Attempt("openai", "h", 1)
    ex.attempts.append(attempt)
    tracer.inject(ex, attempt, out)
    assert out["traceparent"] == f"00-{TRACE}-{attempt.span_id:016x}-00"
    tracer.sink(ex)
    assert exporter.get_finished_spans() == ()

    sampled = chat_exchange()  # the unsampled context is not left behind
    tracer.start(sampled, {})
    tracer.sink(sampled)
    assert len(exporter.get_finished_spans()) == 1


def test_credentials_never_reach_a_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    request_headers = headers(
        authorization=f"Bearer {SECRETS[0]}",
        x_api_key=SECRETS[1],
        api_key=SECRETS[2],
        x_llmproxy_tenant="acme",
        traceparent=CLIENT_TRACEPARENT,
    )
    ex = chat_exchange(request_headers)
    tracer.start(ex, request_headers)
    add_attempt(tracer, ex, 0.0, 0.5)
    tracer.sink(ex)

    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    dumped = "".join(span.to_json() for span in spans)
    assert "acme" in dumped
    for secret in SECRETS:
        assert secret not in dumped


def test_attribution_headers_are_capped(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    ex = chat_exchange(headers(x_llmproxy_tenant="t" * 1000))
    tracer.start(ex, {})
    tracer.sink(ex)
    (server,) = exporter.get_finished_spans()
    assert server.attributes is not None
    assert server.attributes["llmproxy.tenant"] == "t" * 128


def test_exchange_without_attempts_has_only_a_server_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    ex = Exchange("req-2", "POST", "/nowhere")
    ex.status = 404
    ex.fail("no_route")
    ex.ended = ex.started + 0.001
    tracer.start(ex, {})
    tracer.sink(ex)
    (server,) = exporter.get_finished_spans()
    assert server.name == "POST unrouted"


def test_exchange_never_started_is_not_traced(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    tracer.sink(chat_exchange())
    assert exporter.get_finished_spans() == ()


def test_sink_failure_is_logged_once_and_never_raised(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    tracer = Tracer(exporter, Resource({}), batch=False)
    caplog.set_level(logging.ERROR, "llmproxy.telemetry.tracing")
    for _ in range(3):
        ex = chat_exchange()
        tracer.start(ex, {})
        ex.attempts.append(None)  # type: ignore[arg-type]
        tracer.sink(ex)
    assert tracer.sink_errors == 3
    assert [r.getMessage() for r in caplog.records] == ["tracing.sink_failed"]


# The batching processor: queue bound and shutdown


class BlockedExporter(SpanExporter):
    """Holds every export until released, like a collector that stopped answering."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_full_queue_drops_and_counts() -> None:
    exporter = BlockedExporter()
    drops: list[int] = []
    tracer = Tracer(
        exporter,
        Resource({}),
        max_queue_size=4,
        max_export_batch_size=2,
        schedule_delay=60,
        on_drop=drops.append,
    )
    for _ in range(5):  # SERVER spans only: ten spans for a queue of four
        ex = chat_exchange()
        tracer.start(ex, {})
        add_attempt(tracer, ex, 0.0, 0.5)
        tracer.sink(ex)
    # Two spans went to the blocked export, or none yet; the queue holds four.
    assert tracer.dropped in (4, 6) and sum(drops) == tracer.dropped
    assert tracer.queued <= 4
    exporter.release.set()
    tracer.shutdown(timeout=2)
    assert len(exporter.exported) + tracer.dropped == 10


def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for the export thread to make ``condition`` true, or for ``within``."""
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


class BatchesExporter(SpanExporter):
    """Keeps the size of each batch it is given, and the spans."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.spans: list[ReadableSpan] = []
        self.delay = delay

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        time.sleep(self.delay)  # a collector's round trip
        self.sizes.append(len(spans))
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_export_thread_sends_full_batches_then_the_rest_at_shutdown() -> None:
    exporter = BatchesExporter(delay=0.05)
    # The schedule never comes round: only full batches and shutdown export.
    tracer = Tracer(exporter, Resource({}), max_export_batch_size=4, schedule_delay=60)
    for _ in range(5):  # a SERVER and a CLIENT span each: ten spans
        ex = chat_exchange()
        tracer.start(ex, {})
        add_attempt(tracer, ex, 0.0, 0.5)
        tracer.sink(ex)
    until(lambda: sum(exporter.sizes) >= 8)
    time.sleep(0.2)  # time enough for a wrong third, short, batch
    # What arrived during the first export went out as a full batch, and the
    # two spans left over wait for a batch to fill.
    assert exporter.sizes == [4, 4] and tracer.queued == 2
    tracer.shutdown()
    assert exporter.sizes == [4, 4, 2] and tracer.queued == 0
    kinds = [span.kind for span in exporter.spans]
    assert kinds == [SpanKind.SERVER, SpanKind.CLIENT] * 5


def test_export_thread_sends_what_is_queued_on_schedule() -> None:
    exporter = BatchesExporter()
    tracer = Tracer(exporter, Resource({}), schedule_delay=0.05)
    ex = chat_exchange()
    tracer.start(ex, {})
    tracer.sink(ex)
    until(lambda: bool(exporter.sizes))
    assert exporter.sizes == [1]
    tracer.shutdown()


def test_shutdown_is_bounded_by_its_timeout() -> None:
    exporter = BlockedExporter()
    tracer = Tracer(exporter, Resource({}), schedule_delay=0.01)
    ex = chat_exchange()
    tracer.start(ex, {})
    tracer.sink(ex)
    began = time.perf_counter()
    tracer.shutdown(timeout=0.2)
    assert time.perf_counter() - began < 1.0
    assert not tracer.enabled
    exporter.release.set()


# Configuration from the environment


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SERVICE_NAME": "x"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_TRACES_EXPORTER": "none",
        },
        {"OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_from_env_off(env: dict[str, str]) -> None:
    assert Tracer.from_env(env) is None


@pytest.mark.parametrize(
    ("env", "kind"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, HttpExporter),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"}, HttpExporter),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, HttpExporter),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            GrpcExporter,
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            HttpExporter,
        ),
    ],
)
def test_from_env_on(env: dict[str, str], kind: type[SpanExporter]) -> None:
    tracer = Tracer.from_env(env)
    assert tracer is not None and tracer.enabled
    try:
        assert isinstance(tracer._exporter.inner, kind)
        assert tracer.resource.attributes["service.name"] == "llmproxy"
    finally:
        tracer.shutdown(timeout=1)


def test_from_env_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    tracer = Tracer.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert tracer is not None
    try:
        attrs = tracer.resource.attributes
        assert attrs["service.name"] == "gateway"
        assert attrs["deployment.environment"] == "prod"
    finally:
        tracer.shutdown(timeout=1)


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "x"},
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_QUEUE_SIZE": "lots"},
    ],
)
def test_from_env_rejects_what_it_cannot_honour(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Tracer.from_env(env)
