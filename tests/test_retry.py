"""Retry decisions: what is retried, after how long, and within what budget."""

from __future__ import annotations

import random
import time
from email.utils import formatdate

import pytest
from multidict import CIMultiDict

from llmproxy.config import Retries
from llmproxy.errors import (
    MalformedResponseError,
    UpstreamConnectError,
    UpstreamDisconnectError,
    UpstreamTimeoutError,
)
from llmproxy.retry import (
    BUDGET_CAP,
    BUDGET_RATIO,
    RetryBudget,
    error_delay,
    retry_delay,
)

SETTINGS = Retries(attempts=3, backoff=0.1, max_retry_after=5.0)


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})


@pytest.mark.parametrize("error_type", ["connect_error", "timeout_connect"])
def test_connect_failures_are_retried_with_backoff(error_type: str) -> None:
    delay = retry_delay(SETTINGS, 1, error_type, 0, None)
    assert delay is not None and 0.05 <= delay <= 0.15


def test_only_errors_before_the_request_went_out_are_retried() -> None:
    never_connected = UpstreamConnectError("refused")
    assert error_delay(SETTINGS, 1, never_connected) is not None
    assert error_delay(SETTINGS, 1, UpstreamTimeoutError("connect", "slow")) is not None
    # Same error type, but the provider may have processed the request.
    gone = UpstreamDisconnectError("closed")
    assert gone.error_type == "connect_error"
    assert error_delay(SETTINGS, 1, gone) is None
    assert error_delay(SETTINGS, 1, UpstreamTimeoutError("first_byte", "x")) is None
    assert error_delay(SETTINGS, 1, MalformedResponseError("bad")) is None


@pytest.mark.parametrize(
    "error_type",
    [
        "timeout_first_byte",
        "timeout_idle",
        "timeout_total",
        "malformed_response",
        "stream_truncated",
        "client_disconnect",
        "queue_full",
    ],
)
def test_other_failures_are_not_retried(error_type: str) -> None:
    assert retry_delay(SETTINGS, 1, error_type, 0, None) is None


@pytest.mark.parametrize("status", [429, 503, 529])
def test_retryable_statuses_without_retry_after_back_off(status: int) -> None:
    delay = retry_delay(SETTINGS, 1, None, status, headers())
    assert delay is not None and 0.05 <= delay <= 0.15


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 500, 502, 504])
def test_other_statuses_are_not_retried(status: int) -> None:
    assert retry_delay(SETTINGS, 1, None, status, headers()) is None


def test_attempts_counts_every_try_including_the_first() -> None:
    assert retry_delay(SETTINGS, 2, "connect_error", 0, None) is not None
    assert retry_delay(SETTINGS, 3, "connect_error", 0, None) is None
    assert retry_delay(SETTINGS, 3, None, 503, headers()) is None
    one = Retries(attempts=1, backoff=0.1, max_retry_after=5.0)
    assert retry_delay(one, 1, "connect_error", 0, None) is None
    assert retry_delay(one, 1, None, 429, headers(retry_after="1")) is None


def test_backoff_doubles_with_jitter() -> None:
    settings = Retries(attempts=10, backoff=0.1, max_retry_after=5.0)
    random.seed(1)
    for attempt in range(1, 6):
        base = 0.1 * 2 ** (attempt - 1)
        delays = {
            retry_delay(settings, attempt, "connect_error", 0, None) for _ in range(50)
        }
        assert all(d is not None and 0.5 * base <= d <= 1.5 * base for d in delays)
        assert len(delays) > 1  # jittered, not fixed


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"retry_after": "2"}, 2.0),
        ({"retry_after": "0"}, 0.0),
        ({"retry_after": "5"}, 5.0),  # the cap itself is still waited for
        ({"retry_after_ms": "1500"}, 1.5),
        ({"retry_after_ms": "250", "retry_after": "1"}, 0.25),
    ],
)
def test_retry_after_within_the_cap_is_honoured(
    given: dict[str, str], expected: float
) -> None:
    for status in (429, 503, 529):
        delay = retry_delay(SETTINGS, 1, None, status, headers(**given))
        assert delay == pytest.approx(expected)


def test_retry_after_as_an_http_date_is_honoured() -> None:
    date = formatdate(time.time() + 3, usegmt=True)
    delay = retry_delay(SETTINGS, 1, None, 503, headers(retry_after=date))
    assert delay is not None and 1.0 <= delay <= 3.0


@pytest.mark.parametrize(
    "given", [{"retry_after": "6"}, {"retry_after": "3600"}, {"retry_after_ms": "9000"}]
)
def test_retry_after_over_the_cap_means_no_retry(given: dict[str, str]) -> None:
    for status in (429, 503, 529):
        assert retry_delay(SETTINGS, 1, None, status, headers(**given)) is None


def test_unparseable_retry_after_falls_back_to_backoff() -> None:
    delay = retry_delay(SETTINGS, 1, None, 429, headers(retry_after="soon"))
    assert delay is not None and 0.05 <= delay <= 0.15


@pytest.mark.parametrize("marked", ["true", "True", "TRUE"])
def test_x_should_retry_true_retries_any_status(marked: str) -> None:
    for status in (500, 502, 409):
        delay = retry_delay(SETTINGS, 1, None, status, headers(x_should_retry=marked))
        assert delay is not None and 0.05 <= delay <= 0.15
    with_wait = headers(x_should_retry=marked, retry_after="1")
    assert retry_delay(SETTINGS, 1, None, 500, with_wait) == 1.0
    # ...but never past the number of attempts.
    assert retry_delay(SETTINGS, 3, None, 500, headers(x_should_retry=marked)) is None


@pytest.mark.parametrize("marked", ["false", "False"])
def test_x_should_retry_false_forbids_a_retry(marked: str) -> None:
    for status in (429, 503, 529):
        given = headers(x_should_retry=marked, retry_after="1")
        assert retry_delay(SETTINGS, 1, None, status, given) is None


def test_budget_starts_with_some_retries_then_runs_dry() -> None:
    budget = RetryBudget()
    granted = 0
    while budget.withdraw():
        granted += 1
        assert granted <= BUDGET_CAP
    assert granted == int(BUDGET_CAP / 2)
    assert not budget.withdraw()


def test_budget_refills_a_fraction_per_request() -> None:
    budget = RetryBudget()
    while budget.withdraw():
        pass
    per_retry = round(1 / BUDGET_RATIO)
    for _ in range(per_retry - 1):
        budget.deposit()
    assert not budget.withdraw()
    budget.deposit()
    budget.deposit()  # a margin for float rounding; still less than two retries
    assert budget.withdraw()
    assert not budget.withdraw()


def test_budget_is_capped() -> None:
    budget = RetryBudget()
    for _ in range(10_000):
        budget.deposit()
    granted = 0
    while budget.withdraw():
        granted += 1
    assert granted == int(BUDGET_CAP)
