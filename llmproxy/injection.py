"""Usage injection: ask OpenAI-dialect streams for usage, hide that from the client.

A streamed chat or completions request that did not ask for usage is sent with
``stream_options.include_usage`` set, so the provider reports what it billed.
That option changes the stream in two ways, both undone here before the client
sees it: every chunk gains a ``"usage":null`` member, and one last chunk with
empty ``choices`` carries the usage. The client receives the events it would
have received without the option; the tap reads the original.

This is the one place the proxy rewrites a response. It works on whole events,
so a partial event is held until its blank line arrives; the upstream is asked
for an uncompressed stream, since a compressed one could not be edited.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .config import Upstream
from .exchange import Exchange

_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def inject_usage(ex: Exchange, upstream: Upstream, payload: Any) -> bytes | None:
    """The request body to send instead, or ``None`` when nothing is injected."""
    if (
        not ex.stream
        or not upstream.inject_stream_usage
        or upstream.api != "openai"
        or ex.operation not in ("chat", "text_completion")
        or not isinstance(payload, dict)
        or ex.path.rstrip("/").endswith("/responses")  # reports usage anyway
    ):
        return None
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if options is not None and not isinstance(options, dict):
        return None
    payload["stream_options"] = {**(options or {}), "include_usage": True}
    ex.usage_injected = True
    return orjson.dumps(payload)


class UsageStripper:
    """Removes what ``include_usage`` added, event by event."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of the complete events in ``chunk``, with usage removed."""
        data = self._pending + chunk if self._pending else chunk
        end = _last_event_end(data)
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end:]
        return self._strip(data[:end])

    def flush(self) -> bytes:
        """Whatever is left when the stream ends, stripped the same way."""
        rest, self._pending = self._pending, b""
        return self._strip(rest) if rest else b""

    @staticmethod
    def _strip(events: bytes) -> bytes:
        out: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(events):
            event = events[start : end.end()]
            start = end.end()
            if b'"choices":[]' in event and b'"usage":{' in event:
                continue  # the usage-only chunk the client did not ask for
            out.append(_NULL_USAGE.sub(b"", event))
        if start < len(events):
            out.append(_NULL_USAGE.sub(b"", events[start:]))
        return b"".join(out)


def _last_event_end(data: bytes) -> int:
    """The index just past the last blank line in ``data``, or -1."""
    end = -1
    for separator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        found = data.rfind(separator)
        if found >= 0:
            end = max(end, found + len(separator))
    return end
