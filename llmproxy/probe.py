"""The optional streaming probe: a one-token completion that measures time to
first token, read with ``aiohttp-sse-client``.

The probe stops at the first content token (or an error event, or the end of
the stream) and closes the source itself. It must never let the client go on
past the end of a stream: ``EventSource`` then reconnects, which re-sends the
request and costs tokens again. ``max_connect_retry=0`` keeps it from retrying
a failed connection, and a reconnect hook that raises stops the other kind.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from aiohttp_sse_client.client import READY_STATE_CONNECTING, EventSource

from .config import Upstream

_ENDED = "the stream ended without a token"


class _StreamEnded(Exception):
    """Raised from the client's reconnect hook; never leaves this module."""


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
    """One streaming probe: time to the first content token, or why there was none.

    Never raises; the result's ``ok`` says whether a token arrived in time.
    """
    url, body, headers = probe_request(upstream)
    timeout = upstream.health.timeout
    started = time.perf_counter()
    ttft: float | None = None
    error: str | None

    def reconnecting() -> None:
        # The client calls this just before it sleeps and reconnects at the end
        # of a stream; a failed connect calls it too, but in the closed state.
        if source.ready_state == READY_STATE_CONNECTING:
            raise _StreamEnded

    source = EventSource(
        url,
        option={"method": "POST"},
        session=session,
        max_connect_retry=0,
        on_error=reconnecting,
        json=body,
        headers=headers,
        # aiohttp raises and releases the connection; the client would not.
        raise_for_status=True,
    )
    try:
        async with asyncio.timeout(timeout):
            await source.connect()
            error = await _first_token(source, upstream.api)
        if error is None:
            ttft = time.perf_counter() - started
    except _StreamEnded:
        error = _ENDED
    except TimeoutError:
        error = f"no first token within {timeout:g}s"
    except (aiohttp.ClientError, ConnectionError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        await source.close()
    return {
        "ok": error is None,
        "time_to_first_token_s": None if ttft is None else round(ttft, 4),
        "latency_s": round(time.perf_counter() - started, 4),
        "error": error,
        "at": time.time(),
        "monotonic": time.monotonic(),
    }


async def _first_token(source: EventSource, api: str) -> str | None:
    """Read events up to the first content token (``None``), or an error."""
    async for event in source:
        done, error = _verdict(api, event.type, event.data)
        if done:
            return error
    return _ENDED  # a 204: the client stops without reconnecting


def _verdict(api: str, name: str | None, data: str) -> tuple[bool, str | None]:
    """Whether the probe is done at this event, and the error if it failed."""
    if api == "anthropic":
        if name == "content_block_delta":
            return True, None
        if name == "error":
            return True, _error_message(data)
        return name == "message_stop", _ENDED
    if data == "[DONE]":
        return True, _ENDED
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False, None
    if not isinstance(obj, dict):
        return False, None
    if "error" in obj:
        return True, _error_message(data)
    choices = obj.get("choices")
    if isinstance(choices, list) and any(_has_content(c) for c in choices):
        return True, None
    return False, None


def _has_content(choice: Any) -> bool:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        return False
    keys = ("content", "tool_calls", "refusal", "reasoning_content")
    return any(delta.get(key) for key in keys)


def _error_message(data: str) -> str:
    """The provider's error message, or its raw event, for the health report."""
    try:
        obj = orjson.loads(data)
        message = obj["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = data
    return f"error event: {message}"[:200]
