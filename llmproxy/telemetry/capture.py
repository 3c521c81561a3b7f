"""Prompt and completion capture: the audit trail, off unless a route turns it on.

For a route with ``capture: true``, each exchange's request body and answer text
are written as one JSON line to ``telemetry.capture_path``, after redaction
(keys, bearer tokens, JWTs, e-mail addresses, card numbers, plus the operator's
``telemetry.redact`` patterns) and capped at ``telemetry.capture_max_bytes``
each. Headers are never captured, so credentials cannot be. Writing happens on
a thread of its own.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import re
from collections.abc import Iterable
from typing import Any

from ..config import Telemetry
from ..exchange import Exchange
from .logging import JsonFormatter

REDACTED = "[REDACTED]"
DEFAULT_PATTERNS = (
    r"sk-[A-Za-z0-9_\-]{16,}",  # OpenAI and Anthropic API keys
    r"(?i)bearer\s+[A-Za-z0-9._\-~+/]+=*",
    r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+",  # JWTs
    r"AKIA[0-9A-Z]{16}",  # AWS access key ids
    r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",  # e-mail addresses
    r"\b(?:\d[ \-]?){13,19}\b",  # payment card numbers
)


class Redactor:
    """Replaces every match of the patterns with ``[REDACTED]``."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        # Compiled one by one: an operator's pattern may carry its own flags.
        self._patterns = [re.compile(p) for p in (*DEFAULT_PATTERNS, *extra)]

    def __call__(self, text: str) -> str:
        for pattern in self._patterns:
            text = pattern.sub(REDACTED, text)
        return text


def cap(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, marked when cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return (
        encoded[:limit].decode(errors="ignore")
        + f"...[{len(encoded) - limit} bytes cut]"
    )


class CaptureSink:
    """Writes captured exchanges to a JSON-lines file on a background thread."""

    def __init__(self, settings: Telemetry) -> None:
        assert settings.capture_path is not None
        self._limit = settings.capture_max_bytes
        self._redact = Redactor(settings.redact)
        handler = logging.FileHandler(settings.capture_path, encoding="utf-8")
        handler.setFormatter(JsonFormatter())
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._logger = logging.Logger("llmproxy.capture")
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._listener.start()

    def __call__(self, ex: Exchange) -> None:
        if ex.request_body is None:
            return
        fields: dict[str, Any] = {
            "request_id": ex.request_id,
            "trace_id": f"{ex.trace_id:032x}" if ex.trace_id else None,
            "route": ex.route,
            "upstream": ex.upstream,
            "model": ex.response_model or ex.request_model,
            "status": ex.status,
            "error_type": ex.error_type,
            "tenant": ex.tenant,
            "prompt_fingerprint": ex.prompt_fingerprint,
            "request": self._clean(ex.request_body.decode("utf-8", "replace")),
            "completion": self._clean("".join(ex.output_parts)),
        }
        if ex.tool_args:
            fields["tool_arguments"] = [
                self._clean("".join(parts)) for _, parts in sorted(ex.tool_args.items())
            ]
        self._logger.info("capture", extra={"fields": fields})

    def _clean(self, text: str) -> str:
        return cap(self._redact(text), self._limit)

    def close(self) -> None:
        self._listener.stop()
