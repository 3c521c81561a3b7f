"""Rate-limit and Retry-After headers, normalised to seconds."""

from __future__ import annotations

import pytest

from llmproxy.ratelimits import (
    go_duration,
    read_rate_limits,
    reset_seconds,
    retry_after_seconds,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("20ms", 0.02),
        ("8.64s", 8.64),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
        ("0s", 0.0),
    ],
)
def test_go_durations(value: str, seconds: float) -> None:
    assert go_duration(value) == pytest.approx(seconds)
    assert reset_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "5", "5 s", "s", "1x", "-5s", "5s garbage"])
def test_not_go_durations(value: str) -> None:
    assert go_duration(value) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2026-01-01T00:00:30Z", 30.0),
        ("2026-01-01T00:01:00.500000Z", 60.5),
        ("2026-01-01T02:00:10+02:00", 10.0),
        ("12", 12.0),
        ("0.25", 0.25),
    ],
)
def test_reset_as_timestamp_or_number(value: str, seconds: float) -> None:
    assert reset_seconds(value, now=NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "-1",
        "-0.5",
        "2025-12-31T23:59:00Z",  # already past: negative
        "2026-01-01T00:00:30",  # no time zone: cannot be placed
        "2026-13-01T00:00:30Z",
        "soon",
        "nan",
        "inf",
    ],
)
def test_unknown_resets_are_none(value: str | None) -> None:
    assert reset_seconds(value, now=NOW) is None


def test_retry_after() -> None:
    assert retry_after_seconds({"retry-after": "20"}) == 20.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = {"retry-after": "Thu, 01 Jan 2026 00:02:00 GMT"}
    assert retry_after_seconds(date, now=NOW) == pytest.approx(120.0)
    for bad in ("-3", "soon", "inf", "Wed, 31 Dec 2025 23:00:00 GMT"):
        assert retry_after_seconds({"retry-after": bad}, now=NOW) is None
    assert retry_after_seconds({}) is None


def test_openai_and_anthropic_headers() -> None:
    openai = {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
        "x-ratelimit-limit-tokens": "-1",
        "x-ratelimit-remaining-tokens": "abc",
        "x-ratelimit-reset-tokens": "1m2s",
    }
    assert list(read_rate_limits(openai)) == [
        ("requests", 10000.0, 9999.0, pytest.approx(0.006)),
        ("tokens", None, None, pytest.approx(62.0)),
    ]
    anthropic = {
        "anthropic-ratelimit-input-tokens-limit": "400000",
        "anthropic-ratelimit-input-tokens-remaining": "399000",
        "anthropic-ratelimit-input-tokens-reset": "2999-01-01T00:00:00Z",
    }
    [(resource, limit, remaining, reset)] = list(read_rate_limits(anthropic))
    assert (resource, limit, remaining) == ("input_tokens", 400000.0, 399000.0)
    assert reset is not None and reset > 0
