"""The breaker state machine, with windows and reset times small enough to wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmproxy.breaker import FAULTS, STATE_VALUES, Breaker
from llmproxy.config import Breaker as Settings
from llmproxy.errors import CircuitOpenError

# Long enough that nothing times out by accident while a test runs.
LONG = 60.0
NEUTRAL = [
    ("upstream_4xx", 400),
    ("auth", 401),
    ("context_length", 400),
    ("rate_limited", 429),
    ("client_disconnect", 0),
    ("client_disconnect", 200),
    ("queue_full", 0),
]


class Changes:
    """An ``on_change`` callback that remembers every transition."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, upstream: str, state: str) -> None:
        assert upstream == "up"
        self.seen.append(state)


def breaker(
    failures: int = 3,
    window: float = LONG,
    reset_after: float = LONG,
    trials: int = 1,
    changes: Changes | None = None,
) -> Breaker:
    settings = Settings(failures, window, reset_after, trials)
    return Breaker("up", settings, changes)


def trip(b: Breaker) -> None:
    for _ in range(b.settings.failures):
        b.record(False, "connect_error", 0)
    assert b.state == "open"


def test_state_values_match_the_metric_contract() -> None:
    assert STATE_VALUES == {"closed": 0, "open": 1, "half_open": 2}


def test_opens_at_the_threshold_within_the_window() -> None:
    b = breaker(failures=3)
    b.record(False, "upstream_5xx", 500)
    b.record(False, "timeout_first_byte", 0)
    assert b.state == "closed"
    assert b.admit() is False
    b.record(False, "overloaded", 529)
    assert b.state == "open"


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_upstream_fault_counts(fault: str) -> None:
    b = breaker(failures=1)
    b.record(False, fault, 0)
    assert b.state == "open"


def test_a_5xx_status_without_a_type_counts() -> None:
    b = breaker(failures=1)
    b.record(False, None, 503)
    assert b.state == "open"


def test_failures_spread_wider_than_the_window_do_not_open() -> None:
    b = breaker(failures=3, window=0.05)
    for _ in range(4):
        b.record(False, "connect_error", 0)
        time.sleep(0.1)  # twice the window: the previous failure has aged out
    assert b.state == "closed"
    b.record(False, "connect_error", 0)
    b.record(False, "connect_error", 0)
    b.record(False, "connect_error", 0)
    assert b.state == "open"


def test_successes_in_between_do_not_reset_the_window() -> None:
    b = breaker(failures=3)
    for _ in range(2):
        b.record(False, "upstream_5xx", 500)
        b.record(False, None, 200)
    assert b.state == "closed"
    b.record(False, "upstream_5xx", 500)
    assert b.state == "open"


@pytest.mark.parametrize(("error_type", "status"), NEUTRAL)
def test_neutral_outcomes_never_open(error_type: str, status: int) -> None:
    b = breaker(failures=1)
    for _ in range(5):
        b.record(False, error_type, status)
    assert b.state == "closed"
    assert b.admit() is False


@pytest.mark.parametrize(("error_type", "status"), NEUTRAL)
def test_neutral_outcomes_never_close(error_type: str, status: int) -> None:
    b = breaker(failures=1)
    trip(b)
    b.record(False, error_type, status)
    assert b.state == "open"


@pytest.mark.parametrize(("error_type", "status"), NEUTRAL)
def test_neutral_trial_keeps_half_open_and_frees_its_place(
    error_type: str, status: int
) -> None:
    b = breaker(failures=1, reset_after=0.05)
    trip(b)
    time.sleep(0.1)
    assert b.admit() is True
    b.record(True, error_type, status)
    assert b.state == "half_open"
    assert b.admit() is True


def test_open_refuses_with_retry_after() -> None:
    b = breaker(failures=1, reset_after=30)
    trip(b)
    with pytest.raises(CircuitOpenError) as caught:
        b.admit()
    err = caught.value
    assert err.status == 503 and err.error_type == "circuit_open"
    assert err.upstream == "up"
    assert err.retry_after is not None and 1 <= err.retry_after <= 30


def test_half_open_after_reset_after() -> None:
    b = breaker(failures=1, reset_after=0.05)
    trip(b)
    with pytest.raises(CircuitOpenError):
        b.admit()
    time.sleep(0.1)
    assert b.state == "half_open"


@pytest.mark.parametrize("trials", [1, 3])
def test_half_open_admits_only_the_configured_trials(trials: int) -> None:
    b = breaker(failures=1, reset_after=0.05, trials=trials)
    trip(b)
    time.sleep(0.1)
    assert [b.admit() for _ in range(trials)] == [True] * trials
    with pytest.raises(CircuitOpenError) as caught:
        b.admit()
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1
    assert b.state == "half_open"


def test_trial_success_closes() -> None:
    changes = Changes()
    b = breaker(failures=2, reset_after=0.05, changes=changes)
    trip(b)
    time.sleep(0.1)
    assert b.admit() is True
    b.record(True, None, 200)
    assert b.state == "closed"
    assert b.admit() is False
    # The count starts afresh: one fault is not enough to reopen.
    b.record(False, "connect_error", 0)
    assert b.state == "closed"
    assert changes.seen == ["open", "half_open", "closed"]


def test_trial_failure_reopens_for_a_full_reset_after() -> None:
    changes = Changes()
    b = breaker(failures=3, reset_after=0.5, changes=changes)
    trip(b)
    time.sleep(0.6)
    assert b.admit() is True
    b.record(True, "timeout_first_byte", 0)  # one fault, below the threshold
    assert b.state == "open"
    with pytest.raises(CircuitOpenError):
        b.admit()
    time.sleep(0.1)  # a fifth of reset_after: still open
    assert b.state == "open"
    time.sleep(0.5)
    assert b.state == "half_open"
    assert changes.seen == ["open", "half_open", "open", "half_open"]


def test_trial_failure_frees_its_place() -> None:
    b = breaker(failures=1, reset_after=0.05)
    trip(b)
    time.sleep(0.1)
    assert b.admit() is True
    b.record(True, "connect_error", 0)
    time.sleep(0.1)
    assert b.admit() is True


def test_on_change_sequence_over_a_full_cycle() -> None:
    changes = Changes()
    b = breaker(failures=1, reset_after=0.05, changes=changes)
    b.record(False, None, 200)  # already closed: no transition
    trip(b)
    b.record(False, "connect_error", 0)  # already open: no transition either
    time.sleep(0.1)
    assert b.admit()
    b.record(True, "upstream_5xx", 500)
    time.sleep(0.1)
    assert b.admit()
    b.record(True, None, 200)
    assert changes.seen == ["open", "half_open", "open", "half_open", "closed"]


async def test_timed_half_open_is_reported_without_traffic() -> None:
    changes = Changes()
    b = breaker(failures=1, reset_after=0.1, changes=changes)
    trip(b)
    await asyncio.sleep(0.3)
    assert changes.seen == ["open", "half_open"]  # nobody read the state


async def test_timed_half_open_is_reported_after_faults_while_open() -> None:
    changes = Changes()
    b = breaker(failures=2, reset_after=0.2, changes=changes)
    trip(b)
    await asyncio.sleep(0.05)
    # Requests admitted before the breaker opened fail afterwards.
    b.record(False, "timeout_first_byte", 0)
    b.record(False, "timeout_first_byte", 0)
    await asyncio.sleep(0.5)  # well past reset_after from either fault
    assert changes.seen == ["open", "half_open"]  # nobody read the state


def test_success_admitted_before_opening_does_not_close() -> None:
    b = breaker(failures=2)
    assert b.admit() is False  # a long stream starts while closed
    trip(b)  # other requests fail meanwhile
    b.record(False, None, 200)  # the long stream then ends well
    assert b.state == "open"


async def test_close_cancels_the_half_open_timer() -> None:
    changes = Changes()
    b = breaker(failures=1, reset_after=0.05, changes=changes)
    trip(b)
    b.close()
    await asyncio.sleep(0.15)
    assert changes.seen == ["open"]
