"""Provider rate-limit headers, normalised.

OpenAI sends ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` with
resets as Go-style durations (``6m0s``, ``8.64s``, ``132ms``). Anthropic sends
``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
remaining,reset}`` with resets as RFC 3339 timestamps. Both become
(resource, limit, remaining, seconds until reset); a value that does not parse,
or is negative, is unknown (``None``), never zero.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

RESOURCES = ("requests", "tokens", "input_tokens", "output_tokens")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNITS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}

RateLimit = tuple[str, float | None, float | None, float | None]


def read_rate_limits(headers: Mapping[str, str]) -> Iterator[RateLimit]:
    """Each resource the headers describe, as (resource, limit, remaining, reset)."""
    for resource in RESOURCES:
        dashed = resource.replace("_", "-")
        for prefix in (f"anthropic-ratelimit-{dashed}-", None):
            if prefix is None:
                if resource not in ("requests", "tokens"):
                    continue
                names = (
                    f"x-ratelimit-limit-{resource}",
                    f"x-ratelimit-remaining-{resource}",
                    f"x-ratelimit-reset-{resource}",
                )
            else:
                names = (f"{prefix}limit", f"{prefix}remaining", f"{prefix}reset")
            limit, remaining, reset = (headers.get(n) for n in names)
            if limit is None and remaining is None and reset is None:
                continue
            yield resource, _number(limit), _number(remaining), reset_seconds(reset)
            break


def reset_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds until a reset given as a duration, a number or an RFC 3339 time."""
    if not value:
        return None
    value = value.strip()
    seconds = _number(value)
    if seconds is None:
        seconds = go_duration(value)
    if seconds is None and len(value) >= 20 and value[4] == "-":
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds is None or seconds < 0:
        return None
    return seconds


def go_duration(value: str) -> float | None:
    """Seconds in a Go duration string such as ``1h2m3.5s`` or ``132ms``."""
    pos, total = 0, 0.0
    for match in _GO_DURATION.finditer(value):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(value) and pos > 0 else None


def retry_after_seconds(
    headers: Mapping[str, str], now: float | None = None
) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) as seconds, if present and sane."""
    value = headers.get("retry-after-ms")
    if value is not None and (ms := _number(value)) is not None:
        return ms / 1000.0
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _number(value)
    if seconds is None:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (
                time.time() if now is None else now
            )
        except (TypeError, ValueError):
            return None
    return seconds if seconds >= 0 else None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    # float() also reads "nan" and "inf": neither is a usable count or delay.
    return number if number >= 0 and math.isfinite(number) else None
