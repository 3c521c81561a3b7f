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

    def as_log(self, line: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fields of the per-request log line, added to ``line`` (a new dict
        by default) and returned; ``None`` values are left out."""
        # Once per request: each field is tested and added in place, in the
        # line's order, rather than gathered in one dict and filtered into another.
        fields: dict[str, Any] = {} if line is None else line
        fields["request_id"] = self.request_id
        if self.trace_id:
            fields["trace_id"] = f"{self.trace_id:032x}"
        fields["method"] = self.method
        fields["path"] = self.path
        for key in _NAMES:
            value = getattr(self, key)
            if value is not None:
                fields[key] = value
        fields["stream"] = self.stream
        fields["status"] = self.status
        if self.error_type is not None:
            fields["error_type"] = self.error_type
        if self.error_message is not None:
            fields["error_message"] = self.error_message
        if self.finish_reasons:
            fields["finish_reasons"] = self.finish_reasons
        if self.usage_source is not None:
            fields["usage_source"] = self.usage_source
        if self.cost_usd is not None:
            # Dollars to the ten-billionth: no float noise in the line.
            fields["cost_usd"] = round(self.cost_usd, 10)
        if self.anomalies:
            fields["anomalies"] = self.anomalies
        if self.cache_result is not None:
            fields["cache"] = self.cache_result
        for key in _ATTRIBUTION:
            value = getattr(self, key)
            if value is not None:
                fields[key] = value
        fields["attempts"] = len(self.attempts)
        fields["bytes_out"] = self.bytes_out
        started = self.started
        fields["duration_s"] = round(self.duration, 6)
        for key, attr in _PHASES:
            t = getattr(self, attr)
            if t is not None:
                fields[key] = round(t - started, 6)
        if self.client_disconnected:
            fields["client_disconnected"] = True
        if self.parse_error is not None:
            fields["parse_error"] = self.parse_error
        if self.output_capped:
            fields["output_capped"] = True
        for key, attr in _TOKEN_KEYS:
            count = getattr(self, attr)
            if count is not None:
                fields[key] = count
        return fields


_NAMES = (
    "route",
    "upstream",
    "provider",
    "operation",
    "request_model",
    "response_model",
    "response_id",
    "upstream_request_id",
)
_ATTRIBUTION = ("prompt_fingerprint", "prompt_version", "tenant")
# (log field, attribute) of the phase times, as seconds since the request began.
_PHASES = (
    ("upstream_headers_s", "t_headers"),
    ("first_byte_s", "t_first_byte"),
    ("first_token_s", "t_first_token"),
    ("last_byte_s", "t_last_byte"),
)
_TOKEN_KEYS = tuple((f"{label}_tokens", attr) for label, attr in TOKEN_FIELDS)
