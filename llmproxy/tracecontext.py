"""W3C Trace Context: the client's ``traceparent``, read without the tracing SDK."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .exchange import Exchange

# W3C Trace Context level 2 defines 0x02 ("random trace id"); both known flags are
# kept as the client sent them, undefined bits are not vouched for upstream.
_KNOWN_FLAGS = 0x03
# version-traceid-parentid-flags, lowercase hex only; a later version may append
# fields after a dash (W3C Trace Context, "Versioning of traceparent").
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?"
)


def adopt_client_trace(ex: Exchange, headers: Mapping[str, str]) -> None:
    """Without tracing, the client's trace id (from a valid ``traceparent``) for
    the log line; the header itself travels upstream untouched."""
    parsed = traceparent(headers)
    if parsed is not None:
        ex.trace_id, _, ex.trace_flags = parsed


def traceparent(headers: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) from a valid ``traceparent``, else None."""
    values = header_values(headers, "traceparent")
    if len(values) != 1:  # a duplicated traceparent is invalid
        return None
    m = _TRACEPARENT.fullmatch(values[0])
    if m is None:
        return None
    version, trace, parent, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id, parent_id = int(trace, 16), int(parent, 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, int(flags, 16) & _KNOWN_FLAGS


def header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of header ``name``: a multidict keeps repeated headers."""
    value = headers.get(name)
    if value is None:
        return []
    getall = getattr(headers, "getall", None)
    return [value] if getall is None else list(getall(name))
