"""Incremental Server-Sent Events reader over a copy of a response's bytes.

It follows the HTML Living Standard's event-stream parsing: lines end with
``\\r\\n``, ``\\n`` or ``\\r``; a blank line dispatches the event; lines starting
with ``:`` are comments; ``data`` lines of one event are joined with ``\\n``; a
single space after the colon is dropped. Chunks may split anywhere, including
between ``\\r`` and ``\\n``.

The reader never holds more than ``max_event_bytes`` (one event's worth): past
that it gives up on the stream, sets ``failed``, and ignores the rest. The
client's bytes never pass through here, so giving up only loses telemetry.
"""

from __future__ import annotations

from typing import Final

DEFAULT_MAX_EVENT_BYTES: Final = 2 * 1024 * 1024

Event = tuple[str, bytes]
"""An event's type (``message`` when the stream did not name it) and its data."""


class SSEReader:
    """Feed chunks in, get complete events out."""

    __slots__ = (
        "_buf",
        "_cr",
        "_data",
        "_name",
        "_size",
        "_started",
        "failed",
        "max_event_bytes",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.failed: str | None = None
        self._buf = b""
        self._cr = False  # the last chunk ended in \r: a \n may follow
        self._name = ""
        self._data: list[bytes] = []
        self._size = 0
        self._started = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse ``chunk`` and return the events it completed, oldest first."""
        if self.failed is not None or not chunk:
            return []
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if b"\r" in chunk:
            if chunk[-1] == 0x0D:  # b"\r"
                chunk = chunk[:-1]
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        if not self._started:
            # The standard drops one byte order mark at the start of a stream.
            if len(buf) < 3 and b"\xef\xbb\xbf".startswith(buf):
                self._buf = buf
                return []
            self._started = True
            if buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]

        events: list[Event] = []
        start = 0
        if not self._data and not self._name:
            start = _whole_events(buf, events)
        while (end := buf.find(b"\n", start)) >= 0:
            self._line(buf[start:end], events)
            start = end + 1
        self._buf = buf[start:]

        if len(self._buf) + self._size > self.max_event_bytes:
            self._give_up("event exceeds max_event_bytes")
        return events

    def close(self) -> list[Event]:
        """End of stream: flush a last line ended by ``\\r``; drop a partial event."""
        if self.failed is not None:
            return []
        events: list[Event] = []
        if self._cr or self._buf:
            # A trailing \r is a complete line ending; a partial line is not
            # dispatched by the standard, but its field is still processed.
            self._line(self._buf, events)
            self._buf = b""
            self._cr = False
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            if self._data:
                events.append((self._name or "message", b"\n".join(self._data)))
            self._name = ""
            self._data = []
            self._size = 0
            return
        if line[0] == 0x3A:  # b":" starts a comment, such as a keep-alive ping
            return
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
            self._size += len(value) + 1
        elif field == b"event":
            self._name = value.decode("utf-8", "replace")
        # id and retry matter to a reconnecting client, not to telemetry.

    def _give_up(self, reason: str) -> None:
        self.failed = reason
        self._buf = b""
        self._data = []
        self._size = 0


def _whole_events(buf: bytes, events: list[Event]) -> int:
    """The usual case, read without going line by line: events of one
    ``data: `` line each, ended by a blank line, as providers send them. Appends
    those at the start of ``buf`` to ``events`` and returns where the rest
    begins, which the line-by-line reader takes from there (any other field, a
    comment, a second data line, an event not ended yet)."""
    start = 0
    while buf.startswith(b"data: ", start):
        end = buf.find(b"\n", start + 6)
        if end < 0 or buf[end + 1 : end + 2] != b"\n":
            break
        events.append(("message", buf[start + 6 : end]))
        start = end + 2
    return start
