"""The bench's floor: the least an aiohttp + uvloop reverse proxy can do.

It forwards method, path, headers (less hop-by-hop ones) and body to one upstream
with one shared client session, and streams the answer back as it arrives: no
parsing, no telemetry. llmproxy's overhead is measured against this.

    python bench/bare_proxy.py --upstream http://127.0.0.1:8000 --port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

# RFC 9110 section 7.6.1: these describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp sets these itself from what it sends.
_REQUEST_SKIP = HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_SKIP = HOP_BY_HOP | {"content-length"}

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _copy(headers: Mapping[str, str], skip: frozenset[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)


def make_handler(upstream: str, session: aiohttp.ClientSession) -> Handler:
    """A handler that relays every request to ``upstream`` through ``session``."""

    async def relay(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        headers = _copy(request.headers, _REQUEST_SKIP)
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=body
        ) as upstream_response:
            out = web.StreamResponse(
                status=upstream_response.status,
                headers=_copy(upstream_response.headers, _RESPONSE_SKIP),
            )
            length = upstream_response.content_length
            if length is not None:
                out.content_length = length
            await out.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    return relay


async def serve(upstream: str, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, printing the URL once listening."""
    connector = aiohttp.TCPConnector(limit=0)
    # auto_decompress off: the bytes pass through as the provider sent them.
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout()
    ) as session:
        handler = make_handler(upstream.rstrip("/"), session)
        server = web.Server(handler, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"http://{host}:{runner.addresses[0][1]}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    """Parse the command line and run the proxy on uvloop where it is installed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.upstream, args.host, args.port))
    else:
        uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
