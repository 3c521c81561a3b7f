"""Structured logs: JSON lines on stdout, written off the event loop.

Every record's message is a stable event name (``request``, ``config.loaded``);
its data travel separately in ``extra={"fields": {...}}`` and become top-level
keys, so a log pipeline never parses text.

One writer thread owns stdout. Lifecycle events reach it as ``LogRecord``s
through the ``llmproxy`` logger; the per-request line takes a shorter road:
the finished ``Exchange`` itself is queued, and the thread turns it into JSON,
in batches, one write per batch. The event loop only enqueues, so a slow stdout
consumer cannot stall the proxy, and the busiest log line costs the loop
almost nothing.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections import deque
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from ..exchange import Exchange
from . import PAUSE_EVERY, pause

access_log = logging.getLogger("llmproxy.access")
# aiohttp's own server logger for both listeners: see ``ProtocolErrorFilter``.
protocol_log = logging.getLogger("llmproxy.http")
_RESERVED = frozenset({"ts", "level", "logger", "event"})
_BATCH = 512  # lines per write at most
FLUSH_EVERY = 0.1  # seconds between the writer's wake-ups


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.fields(record), default=str).decode()

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        line: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line[f"field_{key}" if key in _RESERVED else key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return line


def exchange_line(ex: Exchange) -> dict[str, Any]:
    """The ``request`` line of one exchange, timed at its end."""
    line = {
        "ts": _iso(ex.started_wall + ex.duration),
        "level": "info",
        "logger": access_log.name,
        "event": "request",
    }
    return ex.as_log(line)


class LogWriter:
    """The thread that writes every log line; ``put`` is all the loop does.

    ``put`` appends to a deque and wakes nobody: waking a thread per line would
    cost the event loop a context switch and a GIL hand-over per request. The
    thread wakes on its own every ``FLUSH_EVERY`` seconds and writes what has
    gathered, so a line reaches stdout at most that late.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._binary = getattr(stream, "buffer", None)
        self._pending: deque[Exchange | logging.LogRecord] = deque()
        self._formatter = JsonFormatter()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="llmproxy-log-writer", daemon=True
        )
        self._thread.start()

    def put(self, item: Exchange | logging.LogRecord) -> None:
        self._pending.append(item)  # atomic: no lock, no wake-up

    def _pause(self) -> None:
        if threading.current_thread() is self._thread:  # not a caller of flush
            pause()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.wait(FLUSH_EVERY):
            self._drain()
        self._drain()

    def flush(self) -> None:
        """Write what is queued now, from the calling thread."""
        self._drain()

    def _drain(self) -> None:
        pending = self._pending
        with self._lock:  # one drainer at a time keeps lines in order
            while pending:
                lines: list[bytes] = []
                while pending and len(lines) < _BATCH:
                    lines.append(self._line(pending.popleft()))
                    if not len(lines) % PAUSE_EVERY:
                        self._pause()
                self._write(b"\n".join(lines) + b"\n")

    def _line(self, item: object) -> bytes:
        try:
            if isinstance(item, Exchange):
                return orjson.dumps(exchange_line(item), default=str)
            assert isinstance(item, logging.LogRecord)
            return orjson.dumps(self._formatter.fields(item), default=str)
        except Exception as exc:  # a line that cannot be written must not stop the rest
            return orjson.dumps({"event": "log.unwritable", "error": repr(exc)})

    def _write(self, data: bytes) -> None:
        try:
            if self._binary is not None:
                self._binary.write(data)
                self._binary.flush()
            else:
                self._stream.write(data.decode())
                self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout went away: nothing better to do with a log line


class ProtocolErrorFilter(logging.Filter):
    """Makes aiohttp's report of a request it could not parse safe to write.

    aiohttp logs the offending request bytes with the parse error, and those
    bytes may hold a credential header. The record keeps the client's address
    and the kind of error only, as the ``request.malformed`` event: the
    client's mistake, so INFO, with no traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            args = record.args
            remote = args[0] if isinstance(args, tuple) and args else None
            record.msg, record.args = "request.malformed", None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
            record.fields = {
                "remote": remote,
                "status": exc.code,
                "error": type(exc).__name__,
            }
        return True


protocol_log.addFilter(ProtocolErrorFilter())


class _WriterHandler(logging.Handler):
    """Hands records to the writer thread as they are; it formats them."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            # Tracebacks hold frames; render now, while they are still valid.
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        record.msg = record.getMessage()
        record.args = None
        self._writer.put(record)


_writer: LogWriter | None = None
_TRACEBACKS = logging.Formatter()


def setup_logging(level: str = "INFO", stream: IO[str] | None = None) -> LogWriter:
    """Route the ``llmproxy`` loggers to JSON on ``stream``; returns the writer."""
    global _writer
    writer = LogWriter(stream or sys.stdout)
    handler = _WriterHandler(writer)
    root = logging.getLogger("llmproxy")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    _writer = writer
    return writer


def log_exchange(ex: Exchange) -> None:
    """The INFO line for one proxied request (a recorder sink)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    if _writer is not None:
        _writer.put(ex)
    else:  # no writer set up (the package used as a library): plain logging
        access_log.info("request", extra={"fields": ex.as_log()})


def _iso(timestamp: float) -> str:
    """``datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")``,
    with the date and time formatted once per second, not once per line."""
    global _second
    # Split as fromtimestamp does: microseconds rounded half to even, carried
    # into the seconds when they round up to a whole one.
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:
        micros += 1_000_000
        whole -= 1.0
    second = int(whole)
    cached = _second
    if cached[0] != second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
        cached = _second = (second, text[:-6])  # without the "+00:00"
    return f"{cached[1]}.{micros // 1000:03d}+00:00"


# The last second _iso formatted, and its text: one tuple, so that a reader in
# another thread never sees the one without the other.
_second: tuple[int, str] = (-(1 << 62), "")
