"""Usage injection: ask OpenAI-dialect streams for usage, hide that from the client.

A streamed chat or completions request that did not ask for usage is sent with
``stream_options.include_usage`` set, so the provider reports what it billed.
That option changes the stream in two ways, both undone here before the client
sees it: every chunk gains a ``"usage":null`` member, and one last chunk with
empty ``choices`` carries the usage. The client receives the events it would
have received without the option; the tap reads the original.

This is the one place the proxy rewrites a response. It works on whole events,
so a partial event is held until its blank line arrives; the upstream is asked
for an uncompressed stream, since a compressed one could not be edited. An
"event" that grows past ``MAX_PENDING`` without ending is no event stream: the
rest of the body is then passed on unedited rather than held.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .config import Upstream
from .exchange import Exchange
from .sse import DEFAULT_MAX_EVENT_BYTES

_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,')
_COMPACT_NULL_USAGE = b',"usage":null'
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
MAX_PENDING = DEFAULT_MAX_EVENT_BYTES


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

    __slots__ = ("_passthrough", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._passthrough = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of the complete events in ``chunk``, with usage removed."""
        if self._passthrough:
            return chunk
        pending = self._pending
        data = pending + chunk if pending else chunk
        # What is pending holds no event end: look only where a new one can be.
        end = _last_event_end(data, max(len(pending) - 3, 0))
        if end < 0:
            if len(data) > MAX_PENDING:
                self._passthrough = True
                self._pending = b""
                return data
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
        if b'"choices":[]' not in events or b'"usage":{' not in events:
            # The usual block: content events only, each with its "usage":null.
            # No match can span two events (the next starts with a field name,
            # not a comma), so one pass over the block does them all; the
            # compact spelling providers send goes first, without the regex.
            events = events.replace(_COMPACT_NULL_USAGE, b"")
            return _NULL_USAGE.sub(b"", events) if b'"usage"' in events else events
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


def _last_event_end(data: bytes, start: int = 0) -> int:
    """The index just past the last blank line in ``data[start:]``, or -1."""
    if b"\r" not in data:  # nearly every stream: one search, not three
        found = data.rfind(b"\n\n", start)
        return found + 2 if found >= 0 else -1
    end = -1
    for separator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        found = data.rfind(separator, start)
        if found >= 0:
            end = max(end, found + len(separator))
    return end
