"""Map provider failures onto the closed vocabulary of error types.

Sources, in the order they are trusted: the provider's own error code, then its
error type, then hints in its message (context overflows), all from the body or
a stream's error event; then the HTTP status. OpenAI and Anthropic
name the same failures differently; both land on one vocabulary here.
"""

from __future__ import annotations

from typing import Any

_BY_PROVIDER_TYPE = {
    # Anthropic error.type values
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate_limited",
    "authentication_error": "auth",
    "permission_error": "auth",
    "api_error": "upstream_5xx",
    "timeout_error": "upstream_5xx",
    "invalid_request_error": "upstream_4xx",
    "not_found_error": "upstream_4xx",
    "request_too_large": "upstream_4xx",
    # OpenAI error.code values
    "rate_limit_exceeded": "rate_limited",
    "insufficient_quota": "rate_limited",
    "context_length_exceeded": "context_length",
    "string_above_max_length": "context_length",
    "content_filter": "content_filter",
    "content_policy_violation": "content_filter",
    "invalid_api_key": "auth",
    "server_error": "upstream_5xx",
    "server_is_overloaded": "overloaded",
}
_GENERIC = ("upstream_4xx", "upstream_5xx")
_CONTEXT_HINTS = (
    "context length",
    "context window",
    "prompt is too long",
    "too many tokens",
)


def classify_status(status: int, error: Any = None) -> str | None:
    """The error type of an upstream response, or ``None`` for a success."""
    detail = classify_error(error) if error is not None else None
    if status < 400:
        return detail
    if detail not in (None, *_GENERIC):
        return detail
    if status == 429:
        return "rate_limited"
    if status == 529:
        return "overloaded"
    if status in (401, 403):
        return "auth"
    return "upstream_5xx" if status >= 500 else "upstream_4xx"


def classify_error(error: Any) -> str:
    """The error type of a provider error object (a body's or a stream event's)."""
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]
    if not isinstance(error, dict):
        return "upstream_5xx"
    code = error.get("code")
    if isinstance(code, str) and code in _BY_PROVIDER_TYPE:
        return _BY_PROVIDER_TYPE[code]
    kind = error.get("type")
    by_type = _BY_PROVIDER_TYPE.get(kind) if isinstance(kind, str) else None
    if by_type not in (None, *_GENERIC):
        return by_type  # a specific type beats a hint: "too many tokens per minute"
    # Context overflows often come as a generic invalid request (Anthropic, vLLM):
    # only the message tells them apart.
    message = str(error.get("message") or "").lower()
    if any(hint in message for hint in _CONTEXT_HINTS):
        return "context_length"
    return by_type or "upstream_5xx"
