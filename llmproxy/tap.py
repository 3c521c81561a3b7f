"""The response tap: reads a copy of the bytes the client is sent.

``feed`` is called once per forwarded chunk, after the chunk has been written to
the client, and is the only per-chunk work besides the write itself. SSE bodies
are parsed incrementally (holding at most one event); other bodies are kept, up
to a cap, and parsed once at the end. A body sent with a content coding the
proxy can read (gzip, deflate) is decoded for parsing only. Nothing here raises:
a body the tap cannot read costs telemetry, never the client's response.
"""

from __future__ import annotations

import zlib

from .dialects import Dialect
from .exchange import Exchange
from .sse import DEFAULT_MAX_EVENT_BYTES, SSEReader

_WBITS = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


class Tap:
    """Parses one response for its exchange record."""

    __slots__ = (
        "_body",
        "_decoder",
        "_dialect",
        "_ex",
        "_kept",
        "_max",
        "_sse",
        "_stream",
    )

    def __init__(
        self,
        ex: Exchange,
        dialect: Dialect | None,
        content_type: str,
        content_encoding: str,
        max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self._ex = ex
        self._dialect = dialect
        self._max = max_bytes
        self._sse = (
            SSEReader(max_bytes)
            if dialect is not None and content_type.startswith("text/event-stream")
            else None
        )
        self._stream = self._sse is not None
        self._body: list[bytes] | None = (
            [] if dialect is not None and not self._stream else None
        )
        self._kept = 0
        self._decoder: zlib._Decompress | None = None
        coding = content_encoding.strip().lower()
        if coding and coding != "identity" and dialect is not None:
            if coding in _WBITS:
                self._decoder = zlib.decompressobj(_WBITS[coding])
            else:
                ex.parse_failed(
                    "unsupported_encoding", f"unreadable content-encoding {coding!r}"
                )
                self._sse = None
                self._body = None

    @property
    def streaming(self) -> bool:
        """Whether the response is an event stream the tap reads."""
        return self._stream

    def feed(self, chunk: bytes) -> None:
        """Read a copy of one forwarded chunk."""
        sse = self._sse
        if sse is not None:
            if self._decoder is not None:
                chunk = self._decode(chunk)
            events = sse.feed(chunk)
            if events:
                ex = self._ex
                on_event = self._dialect.stream_event  # type: ignore[union-attr]
                for name, data in events:
                    ex.events += 1
                    on_event(ex, name, data)
            # Checked even when the chunk completed events: its tail may have
            # started an event over the limit, and then the stream is not judged.
            if sse.failed is not None:
                self._ex.parse_failed("event_too_large", f"SSE: {sse.failed}")
                self._sse = None
        elif self._body is not None:
            self._kept += len(chunk)
            if self._kept <= self._max:
                self._body.append(chunk)
            else:
                self._ex.parse_failed(
                    "body_too_large", "response body larger than the parse limit"
                )
                self._body = None

    def close(self, complete: bool) -> None:
        """The body has ended; ``complete`` is false when it was cut short."""
        dialect = self._dialect
        if dialect is None:
            return
        ex = self._ex
        if self._stream:
            # A stream whose parsing gave up cannot be judged complete or not.
            if self._sse is not None:
                for name, data in self._sse.close():
                    ex.events += 1
                    dialect.stream_event(ex, name, data)
                dialect.end_stream(ex)
        elif self._body is not None and complete:
            body = b"".join(self._body)
            if self._decoder is not None:
                body = self._decode(body)
            if body or ex.status >= 400:
                dialect.body(ex, body)
        self._body = None
        self._sse = None

    def _decode(self, chunk: bytes) -> bytes:
        decoder = self._decoder
        assert decoder is not None
        try:
            # Bounded output per chunk, so a small compressed chunk cannot expand
            # into an unbounded copy (a decompression bomb costs only telemetry).
            out = decoder.decompress(chunk, self._max)
        except zlib.error:
            self._ex.parse_failed("undecodable", "content-encoding does not decode")
            self._decoder = None
            self._sse = None
            self._body = None
            return b""
        if decoder.unconsumed_tail:
            self._ex.parse_failed(
                "body_too_large", "decoded body larger than the parse limit"
            )
            self._sse = None
            self._body = None
        return out
