"""The Anthropic Messages dialect, streamed and not.

A stream's usage arrives in parts: ``message_start`` carries the input side,
and every ``message_delta`` carries cumulative counts that supersede earlier
ones. Per the GenAI semantic conventions, input tokens are reported as the sum of
uncached input, cache reads and cache writes, with the cache parts also kept on
their own. Only ``message_start``, ``message_delta`` and ``error`` are parsed;
content deltas are only noticed, for the time to first token.
"""

from __future__ import annotations

import time
from typing import Any

from ..classify import classify_error, classify_status
from ..exchange import Exchange
from .common import hold as _hold
from .common import loads as _loads
from .common import message as _message

_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def operation_for(path: str) -> str | None:
    """The semconv ``gen_ai.operation.name`` for a request path, if it is one."""
    path = path.rstrip("/")
    if path.endswith("/messages"):
        return "chat"
    if path.endswith("/complete"):
        return "text_completion"
    return None


def stream_event(ex: Exchange, name: str, data: bytes) -> None:
    """One SSE event of a Messages stream."""
    if name == "content_block_delta":
        if ex.t_first_token is None:
            ex.t_first_token = time.perf_counter()
            ex.output_seen = True
        if ex.capture:
            _capture_delta(ex, _loads(ex, data))
    elif name == "message_start":
        obj = _loads(ex, data)
        message = obj.get("message") if isinstance(obj, dict) else None
        if isinstance(message, dict):
            _head(ex, message)
            _merge_usage(ex, message.get("usage"))
    elif name == "message_delta":
        obj = _loads(ex, data)
        if isinstance(obj, dict):
            delta = obj.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                ex.finish_reasons.append(delta["stop_reason"])
                ex.refusal = ex.refusal or delta["stop_reason"] == "refusal"
            _merge_usage(ex, obj.get("usage"))
    elif name == "message_stop":
        ex.terminal = True
    elif name == "error":
        obj = _loads(ex, data)
        ex.fail(classify_error(obj), _message(obj))
        ex.terminal = True


def end_stream(ex: Exchange) -> None:
    """Settle the usage parts into totals, once the stream has ended."""
    _settle_usage(ex)
    if not ex.terminal:
        ex.fail("stream_truncated", "stream ended without message_stop")


def body(ex: Exchange, data: bytes) -> None:
    """A complete (non-streamed) response body."""
    obj = _loads(ex, data)
    if not isinstance(obj, dict):
        if ex.status < 400:
            ex.fail("malformed_response", "response body is not a JSON object")
        return
    if ex.status >= 400 or obj.get("type") == "error":
        ex.fail(classify_status(ex.status, obj) or "upstream_4xx", _message(obj))
        return
    _head(ex, obj)
    if isinstance(obj.get("stop_reason"), str):
        ex.finish_reasons.append(obj["stop_reason"])
        ex.refusal = obj["stop_reason"] == "refusal"
    content = obj.get("content")
    if isinstance(content, list):
        for block in content:
            _block_output(ex, block)
    _merge_usage(ex, obj.get("usage"))
    _settle_usage(ex)


def _capture_delta(ex: Exchange, obj: Any) -> None:
    """Keep text and tool-input fragments, for the JSON checks at the end."""
    if not isinstance(obj, dict) or not isinstance(obj.get("delta"), dict):
        return
    delta, index = obj["delta"], obj.get("index", 0)
    if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
        _hold(ex, ex.output_parts, delta["text"])
    elif delta.get("type") == "input_json_delta" and isinstance(index, int):
        partial = delta.get("partial_json")
        if isinstance(partial, str):
            _hold(ex, ex.tool_args.setdefault(index, []), partial)


def _block_output(ex: Exchange, block: Any) -> None:
    """One content block of a whole message; tool inputs arrive already parsed."""
    if not isinstance(block, dict):
        return
    if block.get("type") == "text" and block.get("text"):
        ex.output_seen = True
        if ex.capture:
            _hold(ex, ex.output_parts, str(block["text"]))
    elif block.get("type") == "tool_use":
        ex.output_seen = True


def _head(ex: Exchange, message: dict[str, Any]) -> None:
    if isinstance(message.get("model"), str):
        ex.response_model = message["model"]
    if isinstance(message.get("id"), str):
        ex.response_id = message["id"]


def _merge_usage(ex: Exchange, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    parts: dict[str, int] = ex.pending_usage or {}
    for key in _USAGE_KEYS:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            parts[key] = value
    ex.pending_usage = parts


def _settle_usage(ex: Exchange) -> None:
    parts: dict[str, int] | None = ex.pending_usage
    ex.pending_usage = None
    if not parts:
        return
    ex.usage_source = "provider"
    cache_read = parts.get("cache_read_input_tokens")
    cache_write = parts.get("cache_creation_input_tokens")
    if "input_tokens" in parts:
        ex.input_tokens = parts["input_tokens"] + (cache_read or 0) + (cache_write or 0)
    ex.output_tokens = parts.get("output_tokens")
    ex.cached_input_tokens = cache_read
    ex.cache_creation_input_tokens = cache_write
