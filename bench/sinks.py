"""Microbenchmark of the per-exchange telemetry sinks, in CPU microseconds.

    python bench/sinks.py [--exchanges N] [--rounds R]

Every proxied request ends in an ``Exchange`` that the recorder hands to the
sinks after the handler returns, on the event loop's core. This builds finished
exchanges as the forwarding handler leaves them: a streamed chat completion with
usage (one attempt, route, upstream and model set, x-ratelimit-* response
headers, chunk arrival times) and a unary one. It wires the real sinks as
``llmproxy.app.Proxy`` does (``proxy.recorder.sinks``: settle, metrics, log line,
tracer) and times each sink over N fresh exchanges with ``time.perf_counter``,
keeping the best of R rounds.

What is timed per sink:

- ``settle``, ``metrics`` (``Metrics.observe``), ``trace.sink`` (``Tracer.sink``:
  the copy of the exchange onto the export queue, which no thread drains while
  the bench runs);
- ``log.put`` (``log_exchange``, an append to the writer's queue) and
  ``log.line`` (what the writer thread then does per exchange: the JSON line);
- ``trace.encode``: the OTLP encoding of those spans from the copies, in
  batches of 512 spans, as the export thread does it;
- ``scrape``: one ``/metrics`` rendering, per scrape, not per exchange.

The writer and export threads run on the same core as the loop when the proxy is
pinned to one, so their per-exchange work is counted in the total.
"""

from __future__ import annotations

import argparse
import gc
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, generate_latest

from llmproxy.app import Proxy
from llmproxy.config import build_config
from llmproxy.exchange import Attempt, Exchange
from llmproxy.telemetry import logging as tlog
from llmproxy.telemetry import spans
from llmproxy.telemetry.tracing import _SCOPE, Tracer

CONFIG = {
    "upstreams": {"openai": {"url": "http://127.0.0.1:1", "api": "openai"}},
    "routes": [{"prefix": "/v1", "upstream": "openai"}],
}
REQUEST_HEADERS = {
    "host": "127.0.0.1:8080",
    "authorization": "Bearer sk-bench-0123456789",
    "content-type": "application/json",
    "user-agent": "OpenAI/Python 1.0",
}
RESPONSE_HEADERS = {
    "content-type": "text/event-stream",
    "x-request-id": "req_0123456789abcdef",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "30ms",
}
PAYLOAD = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about proxies."},
    ],
}


class _Nowhere(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def exchange(tracer: Tracer, stream: bool, i: int) -> Exchange:
    """A finished exchange as the handler hands it to the recorder."""
    ex = Exchange(f"req-{i}", "POST", "/v1/chat/completions")
    ex.request_headers = CIMultiDictProxy(CIMultiDict(REQUEST_HEADERS))
    tracer.start(ex, ex.request_headers)
    ex.route, ex.upstream, ex.provider, ex.api = "/v1", "openai", "openai", "openai"
    ex.operation, ex.request_model = "chat", "gpt-4o-mini"
    ex.response_model, ex.response_id = "gpt-4o-mini-2024-07-18", f"chatcmpl-{i}"
    ex.upstream_request_id = "req_0123456789abcdef"
    ex.payload = dict(PAYLOAD)
    ex.stream, ex.status = stream, 200
    ex.finish_reasons = ["stop"]
    ex.input_tokens, ex.output_tokens, ex.cached_input_tokens = 25, 17, 0
    ex.usage_source, ex.output_seen = "provider", True
    ex.events, ex.bytes_in, ex.bytes_out = 20, 3000, 3000

    attempt = Attempt("openai", "api.openai.com", 443)
    attempt.started = ex.started + 0.0004
    attempt.t_headers = ex.started + 0.21
    attempt.ended = ex.started + 0.6
    attempt.status = 200
    ex.attempts.append(attempt)
    tracer.inject(ex, attempt, CIMultiDict())
    headers = dict(RESPONSE_HEADERS)
    if not stream:
        headers["content-type"] = "application/json"
    ex.response_headers = CIMultiDictProxy(CIMultiDict(headers))
    ex.t_sent = ex.started + 0.0005
    ex.t_headers = ex.t_first_byte = attempt.t_headers
    if stream:
        ex.t_first_token = ex.started + 0.25
        ex.arrivals = [ex.started + 0.25 + 0.02 * k for k in range(16)]
    ex.t_last_byte = ex.started + 0.599
    ex.ended = ex.started + 0.6005
    return ex


def timed(run: Callable[[], None], count: int) -> float:
    """Microseconds per item of one pass of ``run`` over ``count`` items."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) / count * 1e6
    finally:
        gc.enable()


def one_round(proxy: Proxy, tracer: Tracer, stream: bool, n: int) -> dict[str, float]:
    settle, observe, log_exchange, trace_sink = proxy.recorder.sinks[:4]
    writer = tlog._writer
    assert writer is not None
    exchanges = [exchange(tracer, stream, i) for i in range(n)]

    def each(sink: Callable[[Exchange], Any]) -> Callable[[], None]:
        return lambda: [sink(ex) for ex in exchanges] and None

    out = {
        "settle": timed(each(settle), n),
        "metrics": timed(each(observe), n),
        "log.put": timed(each(log_exchange), n),
        "log.line": timed(each(writer._line), n),
        "trace.sink": timed(each(trace_sink), n),
    }
    writer._pending.clear()
    copies = list(tracer._queue)
    tracer._queue.clear()
    assert len(copies) == n, "every exchange is queued for export"
    assert sum(map(spans.count, copies)) == 2 * n, "a SERVER and a CLIENT span each"
    batches = [copies[i : i + 256] for i in range(0, n, 256)]

    def encode() -> None:
        for batch in batches:
            spans.SpanBatch(batch, tracer.resource, _SCOPE).to_bytes()

    out["trace.encode"] = timed(encode, n)
    registry = proxy.exposition_registry()
    out["scrape"] = timed(lambda: generate_latest(registry) and None, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    writer = tlog.setup_logging("INFO", io.StringIO())
    writer.stop()  # the bench formats lines itself; no thread drains the queue
    # A queue that never fills and never wakes its thread: the bench drains it.
    tracer = Tracer(
        _Nowhere(),
        max_queue_size=10**9,
        max_export_batch_size=10**9,
        schedule_delay=1e6,
    )
    proxy = Proxy(build_config(CONFIG), registry=CollectorRegistry(), tracer=tracer)
    names = ("settle", "metrics", "log.put", "log.line", "trace.sink")
    for stream in (True, False):
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for key, value in one_round(proxy, tracer, stream, args.exchanges).items():
                best[key] = min(best.get(key, value), value)
        total = sum(best[k] for k in names) + best["trace.encode"]
        kind = "streamed" if stream else "unary"
        print(f"{kind} chat completion, us per exchange (best of {args.rounds}):")
        for key in (*names, "trace.encode"):
            print(f"  {key:<13}{best[key]:8.2f}")
        print(f"  {'total':<13}{total:8.2f}")
        print(
            f"  {'scrape (us)':<13}{best['scrape']:8.0f}  (one /metrics, not per"
            " exchange)"
        )
    tracer.shutdown()


if __name__ == "__main__":
    main()
