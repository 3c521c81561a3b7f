"""Load generator for streamed chat completions (and unary ones where wrk is absent).

N workers each send one request after another for D seconds over kept-alive
connections; the summary is one JSON object on stdout. For a stream it records the
time to the first body byte, to the first token, to the end, and the gap between
consecutive tokens as they came off the socket: a proxy that buffers shows as
gaps near zero followed by one long one. With ``--once`` each worker sends one
request instead: N streams held open at the same time. SIGINT ends the run early,
still printing the summary.

    python bench/stream_client.py --url http://127.0.0.1:8080 -c 16 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from processes import raise_nofile

PATH = "/v1/chat/completions"
# OpenAI chat chunks carrying a token; the role chunk and the finish chunk do not.
TOKEN_MARK = b'"delta":{"content":'
DONE = b"data: [DONE]\n\n"
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]


@dataclass
class Tally:
    """What the workers saw, in seconds, gathered across every request."""

    ttfb: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: int = 0
    incomplete: int = 0


def summary(values: list[float]) -> dict[str, float] | None:
    """Count, mean and nearest-rank percentiles of ``values``, in milliseconds."""
    if not values:
        return None
    ranked = sorted(values)

    def rank(q: float) -> float:
        return ranked[max(math.ceil(q * len(ranked)) - 1, 0)] * 1e3

    return {
        "count": len(ranked),
        "mean": sum(ranked) / len(ranked) * 1e3,
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ranked[-1] * 1e3,
    }


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, tally: Tally | None
) -> None:
    """Send one streamed request and read it to the end; ``None`` records nothing."""
    start = time.perf_counter()
    first_byte = last_token = 0.0
    tail = b""
    async with session.post(url, data=body) as response:
        if response.status != 200:
            await response.read()
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status
            )
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            first_byte = first_byte or now
            if tally is not None and (tokens := chunk.count(TOKEN_MARK)):
                if last_token:
                    tally.gaps.append(now - last_token)
                else:
                    tally.ttft.append(now - start)
                # Tokens that came in one read arrived together: no gap between them.
                tally.gaps.extend([0.0] * (tokens - 1))
                last_token = now
            tail = (tail + chunk)[-len(DONE) :]
    if tally is None:
        return
    tally.ttfb.append(first_byte - start)
    tally.total.append(time.perf_counter() - start)
    if tail != DONE:
        tally.incomplete += 1


async def one_call(
    session: aiohttp.ClientSession, url: str, body: bytes, tally: Tally | None
) -> None:
    """Send one unary request and read its body; ``None`` records nothing."""
    start = time.perf_counter()
    async with session.post(url, data=body) as response:
        await response.read()
        if response.status != 200:
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status
            )
    if tally is not None:
        tally.total.append(time.perf_counter() - start)


@dataclass
class Deadline:
    """When workers stop starting requests; SIGINT moves it to now."""

    at: float = 0.0
    stopped: bool = False

    def passed(self) -> bool:
        return self.stopped or time.perf_counter() >= self.at


async def worker(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    deadline: Deadline,
    tally: Tally | None,
) -> None:
    """Send requests one after another until ``deadline``, or just one."""
    stream = args.mode == "stream"
    body = orjson.dumps({"model": "sim-1", "messages": MESSAGES, "stream": stream})
    send = one_stream if stream else one_call
    url = args.url.rstrip("/") + PATH
    while not deadline.passed():
        try:
            await send(session, url, body, tally)
        except (TimeoutError, aiohttp.ClientError):
            if tally is not None:
                tally.errors += 1
            if args.once:
                return
            # A refused connection fails at once; do not spin on it.
            await asyncio.sleep(0.01)
        if args.once:
            return


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then run ``args.concurrency`` workers for ``args.duration`` seconds."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    if args.pace_ms is not None:
        headers["x-sim-pace-ms"] = str(args.pace_ms)
    if args.tokens is not None:
        headers["x-sim-tokens"] = str(args.tokens)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    deadline = Deadline()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, setattr, deadline, "stopped", True)
    tally = Tally()
    phases: list[tuple[float, Tally | None]] = [(math.inf, tally)]
    if not args.once:
        phases = [(args.warmup, None), (args.duration, tally)]
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        for duration, record in phases:
            start, cpu = time.perf_counter(), time.process_time()
            deadline.at = start + duration
            count = args.concurrency
            await asyncio.gather(
                *(worker(session, args, deadline, record) for _ in range(count))
            )
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    return {**report(args, tally, elapsed), "client_cpu_s": cpu}


def report(args: argparse.Namespace, tally: Tally, elapsed: float) -> dict[str, Any]:
    """The JSON summary of one run."""
    return {
        "mode": args.mode,
        "once": args.once,
        "concurrency": args.concurrency,
        "pace_ms": args.pace_ms,
        "tokens": args.tokens,
        "elapsed_s": elapsed,
        "completed": len(tally.total),
        "errors": tally.errors,
        "incomplete": tally.incomplete,
        "rate_per_s": len(tally.total) / elapsed,
        "total_ms": summary(tally.total),
        "ttfb_ms": summary(tally.ttfb),
        "ttft_ms": summary(tally.ttft),
        "gap_ms": summary(tally.gaps),
    }


def main() -> None:
    """Parse the command line, run the load, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL, without /v1")
    parser.add_argument("--mode", choices=("stream", "unary"), default="stream")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds")
    parser.add_argument("--pace-ms", type=float, help="sets x-sim-pace-ms")
    parser.add_argument("--tokens", type=int, help="sets x-sim-tokens")
    parser.add_argument("--once", action="store_true", help="one request per worker")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, s")
    args = parser.parse_args()
    # A socket per worker, beyond the 1024 files many systems allow by default.
    raise_nofile(args.concurrency + 256)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(load(args))
    else:
        result = uvloop.run(load(args))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
