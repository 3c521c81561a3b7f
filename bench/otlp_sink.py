"""A local OTLP/HTTP trace receiver for the bench: it counts spans and drops them.

``POST /v1/traces`` takes a protobuf ``ExportTraceServiceRequest`` and answers 200
with an empty ``ExportTraceServiceResponse``, after ``--delay`` seconds when asked
to play a slow collector. ``GET /stats`` answers what arrived so far as JSON.

    python bench/otlp_sink.py --port 4318 [--delay 2]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import asdict, dataclass

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PROTOBUF = "application/x-protobuf"
_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


@dataclass
class Stats:
    """What the sink received: export requests, spans in them, bodies it refused."""

    exports: int = 0
    spans: int = 0
    rejected: int = 0


def count_spans(body: bytes) -> int:
    """The number of spans in one serialized ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest.FromString(body)
    return sum(
        len(scope.spans)
        for resource in request.resource_spans
        for scope in resource.scope_spans
    )


def make_app(delay: float) -> web.Application:
    """The receiver's application; ``delay`` seconds pass before each answer."""
    stats = Stats()

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.content_type != PROTOBUF:
            stats.rejected += 1
            return web.Response(status=415)
        stats.exports += 1
        stats.spans += count_spans(body)
        if delay > 0:
            await asyncio.sleep(delay)
        return web.Response(body=_EMPTY_RESPONSE, content_type=PROTOBUF)

    async def report(request: web.Request) -> web.Response:
        return web.json_response(asdict(stats))

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", report)
    return app


async def serve(host: str, port: int, delay: float) -> None:
    """Serve until SIGINT or SIGTERM, printing the traces URL once listening."""
    runner = web.AppRunner(make_app(delay), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"http://{host}:{runner.addresses[0][1]}/v1/traces", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318, help="0 picks a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.delay))


if __name__ == "__main__":
    main()
