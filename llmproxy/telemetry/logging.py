"""Structured logs: JSON lines on stdout, written off the event loop.

Every record's message is a stable event name (``request``, ``config.loaded``);
its data travel separately in ``extra={"fields": {...}}`` and become top-level
keys, so a log pipeline never parses text. Formatting and writing happen on a
listener thread: a slow stdout consumer cannot stall the proxy.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from ..exchange import Exchange

access_log = logging.getLogger("llmproxy.access")
_RESERVED = frozenset({"ts", "level", "logger", "event"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
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
        return orjson.dumps(line, default=str).decode()


class _QueueHandler(logging.handlers.QueueHandler):
    """Queues the record as it is; the listener thread does the formatting."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def setup_logging(level: str = "INFO", stream: IO[str] | None = None) -> Any:
    """Route the ``llmproxy`` loggers to JSON on ``stream``; returns the listener."""
    out = logging.StreamHandler(stream or sys.stdout)
    out.setFormatter(JsonFormatter())
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, out, respect_handler_level=False)
    root = logging.getLogger("llmproxy")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_QueueHandler(q))
    root.setLevel(level.upper())
    root.propagate = False
    listener.start()
    return listener


def log_exchange(ex: Exchange) -> None:
    """The INFO line for one proxied request."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("request", extra={"fields": ex.as_log()})
