"""Helpers shared by the dialects."""

from __future__ import annotations

from typing import Any, Final

import orjson

from ..exchange import Exchange
from ..sse import DEFAULT_MAX_EVENT_BYTES

MAX_HELD_CHARS: Final = DEFAULT_MAX_EVENT_BYTES
"""Answer text and tool arguments held per exchange for the JSON checks, at most."""


def loads(ex: Exchange, data: bytes) -> Any:
    """Parse JSON, noting on the exchange (not raising) when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if ex.parse_error is None:
            ex.parse_failed("invalid_json", "invalid JSON in response")
        return None


def hold(ex: Exchange, parts: list[str], text: str) -> None:
    """Keep ``text`` in ``parts`` for the answer checks, while under the cap.

    Past ``MAX_HELD_CHARS`` nothing more is kept, so an endless answer cannot
    grow the proxy's memory; the checks then skip the exchange (``output_capped``)
    rather than judge a text they only have the start of.
    """
    if ex.output_capped:
        return
    ex.held_chars += len(text)
    if ex.held_chars > MAX_HELD_CHARS:
        ex.output_capped = True
        return
    parts.append(text)


def message(obj: Any) -> str | None:
    """The human message of a provider error object, capped for logs."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:500]
    return None
