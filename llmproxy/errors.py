"""Errors the proxy raises, and the closed vocabulary of error types.

Every failure the proxy reports, in metrics, spans, logs or a response, is one of
``ERROR_TYPES``. Exceptions carry their type and the HTTP status the client gets::

    ProxyError
    ├── ConfigError (ValueError)            bad configuration; never starts a proxy
    ├── UnauthorizedError                   401 auth (the proxy's own key check)
    ├── NoRouteError                        404 no_route
    ├── PayloadTooLargeError                413 payload_too_large
    ├── ClientTimeoutError (TimeoutError)   408 client_disconnect (request too slow)
    ├── UpstreamConnectError (ConnectionError)     502 connect_error
    │   └── UpstreamDisconnectError         502 connect_error, after the request
    │                                       went out; never retried
    ├── MalformedResponseError              502 malformed_response
    ├── CircuitOpenError                    503 circuit_open
    ├── QueueFullError                      503 queue_full
    └── UpstreamTimeoutError (TimeoutError)        504 timeout_*
"""

from __future__ import annotations

from typing import Final

import orjson

ERROR_TYPES: Final = frozenset(
    {
        "rate_limited",
        "overloaded",
        "auth",
        "context_length",
        "content_filter",
        "upstream_4xx",
        "upstream_5xx",
        "connect_error",
        "timeout_connect",
        "timeout_first_byte",
        "timeout_idle",
        "timeout_total",
        "malformed_response",
        "stream_truncated",
        "client_disconnect",
        "circuit_open",
        "queue_full",
        "payload_too_large",
        "no_route",
        "proxy_internal",
    }
)


class ProxyError(Exception):
    """Root of the proxy's own errors; ``status`` is what the client is sent."""

    error_type: str = "proxy_internal"
    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        upstream: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream
        self.retry_after = retry_after


class ConfigError(ProxyError, ValueError):
    """Invalid configuration; ``problems`` holds ``path: what is wrong`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class UnauthorizedError(ProxyError, PermissionError):
    error_type = "auth"
    status = 401


class NoRouteError(ProxyError):
    error_type = "no_route"
    status = 404


class PayloadTooLargeError(ProxyError):
    error_type = "payload_too_large"
    status = 413


class ClientTimeoutError(ProxyError, TimeoutError):
    """The client did not send its whole request in time; the proxy hangs up."""

    error_type = "client_disconnect"
    status = 408


class UpstreamConnectError(ProxyError, ConnectionError):
    error_type = "connect_error"
    status = 502


class UpstreamDisconnectError(UpstreamConnectError):
    """The connection closed after the request went out, before any answer.

    The provider may have processed the request, so it is never retried.
    """


class MalformedResponseError(ProxyError):
    error_type = "malformed_response"
    status = 502


class CircuitOpenError(ProxyError):
    error_type = "circuit_open"
    status = 503


class QueueFullError(ProxyError):
    error_type = "queue_full"
    status = 503


class UpstreamTimeoutError(ProxyError, TimeoutError):
    """A per-phase timeout; ``phase`` is connect, first_byte, idle or total."""

    status = 504

    def __init__(
        self, phase: str, message: str, *, upstream: str | None = None
    ) -> None:
        super().__init__(message, upstream=upstream)
        self.phase = phase
        self.error_type = f"timeout_{phase}"


def error_body(error_type: str, message: str, upstream: str | None = None) -> bytes:
    """The OpenAI-style envelope for an error the proxy itself answers."""
    return orjson.dumps(
        {"error": {"type": error_type, "message": message, "upstream": upstream}}
    )
