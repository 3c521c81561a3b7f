"""Helpers shared by the dialects."""

from __future__ import annotations

from typing import Any

import orjson

from ..exchange import Exchange


def loads(ex: Exchange, data: bytes) -> Any:
    """Parse JSON, noting on the exchange (not raising) when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        ex.parse_error = ex.parse_error or "invalid JSON in response"
        return None


def message(obj: Any) -> str | None:
    """The human message of a provider error object, capped for logs."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:500]
    return None
