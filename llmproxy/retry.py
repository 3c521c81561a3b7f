"""When to try an upstream again, and how long to wait first.

A retry happens only before anything has been sent to the client, and only for
failures that cannot have been processed (the connection was never made) or
that the provider marks retryable (429, 503, 529, ``x-should-retry: true``). A
connection that closes after the request went out (``UpstreamDisconnectError``)
is never retried, though its type is ``connect_error`` too: the provider may
have processed the request, and a second one would be billed again.
Waits are jittered exponential backoff, or the provider's ``Retry-After`` when
it is within ``max_retry_after`` (a longer one is not waited for: the response
goes to the client). A retry budget per upstream keeps retries to a fraction
of requests, so they cannot multiply an outage.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from .config import Retries
from .errors import ProxyError, UpstreamDisconnectError
from .ratelimits import retry_after_seconds

RETRYABLE_ERRORS = frozenset({"connect_error", "timeout_connect"})
RETRYABLE_STATUS = frozenset({429, 503, 529})
# Each request earns this much of a retry; a burst may spend up to the cap.
BUDGET_RATIO = 0.2
BUDGET_CAP = 10.0


class RetryBudget:
    """A token bucket: requests deposit ``BUDGET_RATIO``, each retry takes one."""

    __slots__ = ("_tokens",)

    def __init__(self) -> None:
        self._tokens = BUDGET_CAP / 2

    def deposit(self) -> None:
        self._tokens = min(self._tokens + BUDGET_RATIO, BUDGET_CAP)

    def withdraw(self) -> bool:
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def error_delay(settings: Retries, attempt: int, exc: ProxyError) -> float | None:
    """Seconds to wait before retrying after ``exc``, or ``None`` not to retry."""
    if isinstance(exc, UpstreamDisconnectError):
        return None
    return retry_delay(settings, attempt, exc.error_type, 0, None)


def retry_delay(
    settings: Retries,
    attempt: int,
    error_type: str | None,
    status: int,
    headers: Mapping[str, str] | None,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or ``None`` not to retry."""
    if attempt >= settings.attempts:
        return None
    if error_type in RETRYABLE_ERRORS:
        return _backoff(settings.backoff, attempt)
    if headers is None:
        return None
    marked = headers.get("x-should-retry", "").lower()
    if marked == "false":
        return None
    if status not in RETRYABLE_STATUS and marked != "true":
        return None
    asked = retry_after_seconds(headers)
    if asked is None:
        return _backoff(settings.backoff, attempt)
    return asked if asked <= settings.max_retry_after else None


def _backoff(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), times 0.5 to 1.5."""
    return float(base * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
