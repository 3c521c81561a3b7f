"""The optional streaming probe: a one-token completion that measures time to
first token, read with ``aiohttp-sse-client``.

The client reconnects (re-sending the request, which costs tokens again) when
iterated past the end of a stream, so the probe stops at ``[DONE]`` or
``message_stop`` and closes the source itself; ``max_connect_retry=0`` keeps it
from retrying a failed connection on its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp_sse_client.client import EventSource

from .config import Upstream

_TERMINAL = ("[DONE]",)
_TERMINAL_EVENTS = ("message_stop", "error")


def probe_request(upstream: Upstream) -> tuple[str, dict[str, Any], dict[str, str]]:
    """URL, JSON body and headers of the smallest streamed request of the dialect."""
    model = upstream.health.stream_model
    headers = {"Content-Type": "application/json", **upstream.headers}
    if upstream.api == "anthropic":
        headers.setdefault("anthropic-version", "2023-06-01")
        body = {"model": model, "max_tokens": 1, "stream": True,
                "messages": [{"role": "user", "content": "ping"}]}  # fmt: skip
        return upstream.url + "/v1/messages", body, headers
    body = {"model": model, "max_tokens": 1, "stream": True,
            "messages": [{"role": "user", "content": "ping"}]}  # fmt: skip
    return upstream.url + "/v1/chat/completions", body, headers


async def stream_probe(
    session: aiohttp.ClientSession, upstream: Upstream
) -> dict[str, Any]:
    """One streaming probe: time to the first event, or why there was none."""
    url, body, headers = probe_request(upstream)
    started = time.perf_counter()
    first: float | None = None
    error: str | None = None
    source = EventSource(
        url,
        option={"method": "POST"},
        session=session,
        max_connect_retry=0,
        json=body,
        headers=headers,
    )
    try:
        async with asyncio.timeout(upstream.health.timeout):
            await source.connect()
            async for event in source:
                if first is None:
                    first = time.perf_counter() - started
                if event.data in _TERMINAL or event.type in _TERMINAL_EVENTS:
                    break
    except TimeoutError:
        error = f"no first token within {upstream.health.timeout:g}s"
    except (aiohttp.ClientError, ConnectionError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        await source.close()
    latency = time.perf_counter() - started
    return {
        "ok": error is None and first is not None,
        "time_to_first_token_s": None if first is None else round(first, 4),
        "latency_s": round(latency, 4),
        "error": error if first is not None or error else "stream had no events",
        "at": time.time(),
    }
