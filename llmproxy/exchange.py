"""The per-exchange record: the one seam metrics, traces and logs read from.

The forwarding handler fills an ``Exchange`` while the request runs and hands it
to the recorder when the request ends, however it ends. Times are seconds on the
monotonic clock; ``started`` is also kept as wall-clock time for logs and spans.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import Entry

TOKEN_FIELDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cached_input", "cached_input_tokens"),
    ("cache_creation_input", "cache_creation_input_tokens"),
    ("reasoning", "reasoning_tokens"),
)
"""(``gen_ai_token_type`` label value, ``Exchange`` attribute) pairs."""

PARSE_ERROR_KINDS = (
    "invalid_json",
    "event_too_large",
    "body_too_large",
    "undecodable",
    "unsupported_encoding",
)
"""Why a response could not be read: the ``kind`` label of parse-error counts."""


class Attempt:
    """One try at an upstream: a CLIENT span, one observation in the GenAI metrics."""

    __slots__ = (
        "ended",
        "error_type",
        "queue_wait",
        "server_address",
        "server_port",
        "span_id",
        "started",
        "status",
        "t_headers",
        "upstream",
    )

    def __init__(self, upstream: str, server_address: str, server_port: int) -> None:
        self.upstream = upstream
        self.server_address = server_address
        self.server_port = server_port
        self.started = time.perf_counter()
        self.t_headers: float | None = None
        self.ended: float | None = None
        self.status = 0
        self.error_type: str | None = None
        self.span_id = 0
        self.queue_wait = 0.0


class Exchange:
    """What one client request was, how long each phase took and how it ended."""

    __slots__ = (
        "anomalies",
        "api",
        "arrivals",
        "attempts",
        "bytes_in",
        "bytes_out",
        "cache_creation_input_tokens",
        "cache_entry",
        "cache_result",
        "cached_input_tokens",
        "capture",
        "client_disconnected",
        "cost_usd",
        "ended",
        "error_message",
        "error_type",
        "estimated",
        "events",
        "fallback",
        "finish_reasons",
        "held_chars",
        "input_tokens",
        "method",
        "operation",
        "output_capped",
        "output_parts",
        "output_seen",
        "output_tokens",
        "parent_span_id",
        "parse_error",
        "parse_error_kind",
        "path",
        "payload",
        "pending_usage",
        "prompt_chars",
        "prompt_fingerprint",
        "prompt_version",
        "provider",
        "reasoning_tokens",
        "refusal",
        "request_body",
        "request_headers",
        "request_id",
        "request_model",
        "response_headers",
        "response_id",
        "response_model",
        "route",
        "span_id",
        "started",
        "started_wall",
        "status",
        "stream",
        "t_first_byte",
        "t_first_token",
        "t_headers",
        "t_last_byte",
        "t_sent",
        "tenant",
        "terminal",
        "tool_args",
        "trace_flags",
        "trace_id",
        "trace_state",
        "upstream",
        "upstream_request_id",
        "usage_injected",
        "usage_source",
        "wants_json",
        "wants_tools",
    )

    def __init__(self, request_id: str, method: str, path: str) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.route: str | None = None
        self.upstream: str | None = None
        self.provider: str | None = None
        self.api: str | None = None
        self.operation: str | None = None
        self.request_model: str | None = None
        self.response_model: str | None = None
        self.response_id: str | None = None
        self.upstream_request_id: str | None = None
        # W3C trace context: ids as ints, 0 when tracing is off.
        self.trace_id = 0
        self.span_id = 0
        self.parent_span_id = 0
        self.trace_flags = 1  # sampled, unless the client's traceparent says not
        self.trace_state: str | None = None
        # Kept by reference, read by the sinks after the request.
        self.request_headers: Mapping[str, str] | None = None
        self.response_headers: Mapping[str, str] | None = None
        self.prompt_fingerprint: str | None = None
        # From x-llmproxy-tenant and x-llmproxy-prompt-version, capped in length.
        self.tenant: str | None = None
        self.prompt_version: str | None = None
        # The request body, kept only when the route captures prompts.
        self.request_body: bytes | None = None
        self.stream = False
        self.wants_json = False
        self.wants_tools = False
        self.prompt_chars = 0
        # The parsed request body, until the record is settled after the request.
        self.payload: dict[str, Any] | None = None
        # The answer's text and tool arguments are kept only when a check needs
        # them (the request asked for JSON output or offered tools) or the route
        # captures answers.
        self.capture = False
        self.output_parts: list[str] = []
        self.tool_args: dict[int, list[str]] = {}
        # Characters held in those two; past a cap the rest is not kept, and the
        # checks that need the whole text are skipped (``output_capped``).
        self.held_chars = 0
        self.output_capped = False
        self.output_seen = False
        self.refusal = False
        self.usage_injected = False
        self.fallback = False  # answered by one of the route's fallbacks
        # On routes with a response cache: hit, miss or bypass; and on a hit, the
        # entry served (its usage is what was not bought).
        self.cache_result: str | None = None
        self.cache_entry: Entry | None = None
        self.estimated = False
        # Arrival times of a stream's chunks, for the time per output chunk.
        self.arrivals: list[float] | None = None
        self.status = 0
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.finish_reasons: list[str] = []
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.cached_input_tokens: int | None = None
        self.cache_creation_input_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.usage_source: str | None = None
        self.terminal = False
        # The latest usage seen in a stream, parsed once when the stream ends.
        self.pending_usage: Any = None
        self.parse_error: str | None = None
        self.parse_error_kind: str | None = None  # one of PARSE_ERROR_KINDS
        # Set by the metrics sink, from the price table and the answer checks,
        # for the sinks after it (the log line).
        self.cost_usd: float | None = None
        self.anomalies: list[str] = []
        self.client_disconnected = False
        self.attempts: list[Attempt] = []
        self.events = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.t_sent: float | None = None
        self.t_headers: float | None = None
        self.t_first_byte: float | None = None
        self.t_first_token: float | None = None
        self.t_last_byte: float | None = None
        self.ended: float | None = None

    def since_start(self, t: float | None) -> float | None:
        """Seconds from the request's arrival to monotonic time ``t``."""
        return None if t is None else t - self.started

    @property
    def duration(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    @property
    def has_usage(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None

    def fail(self, error_type: str, message: str | None = None) -> None:
        """Keep the first error: a later one is usually a consequence of it."""
        if self.error_type is None:
            self.error_type = error_type
            self.error_message = message

    def parse_failed(self, kind: str, message: str) -> None:
        """Note why the response could not be read; ``kind`` is in PARSE_ERROR_KINDS.

        The latest reason wins: a later one is the one that stopped parsing.
        """
        self.parse_error = message
        self.parse_error_kind = kind

    def as_log(self) -> dict[str, Any]:
        """The fields of the per-request log line; ``None`` values are left out."""
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "trace_id": f"{self.trace_id:032x}" if self.trace_id else None,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "upstream": self.upstream,
            "provider": self.provider,
            "operation": self.operation,
            "request_model": self.request_model,
            "response_model": self.response_model,
            "response_id": self.response_id,
            "upstream_request_id": self.upstream_request_id,
            "stream": self.stream,
            "status": self.status,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "finish_reasons": self.finish_reasons or None,
            "usage_source": self.usage_source,
            # Dollars to the ten-billionth: no float noise in the line.
            "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 10),
            "anomalies": self.anomalies or None,
            "cache": self.cache_result,
            "prompt_fingerprint": self.prompt_fingerprint,
            "prompt_version": self.prompt_version,
            "tenant": self.tenant,
            "attempts": len(self.attempts),
            "bytes_out": self.bytes_out,
            "duration_s": round(self.duration, 6),
            "upstream_headers_s": _round(self.since_start(self.t_headers)),
            "first_byte_s": _round(self.since_start(self.t_first_byte)),
            "first_token_s": _round(self.since_start(self.t_first_token)),
            "last_byte_s": _round(self.since_start(self.t_last_byte)),
            "client_disconnected": self.client_disconnected or None,
            "parse_error": self.parse_error,
            "output_capped": self.output_capped or None,
        }
        for label, attr in TOKEN_FIELDS:
            fields[f"{label}_tokens"] = getattr(self, attr)
        return {k: v for k, v in fields.items() if v is not None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
