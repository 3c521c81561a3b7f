"""Wire dialects: what a request asks for and what its response says.

Each dialect module reads its provider's responses into an ``Exchange``: a whole
body with ``body``, or a stream event by event with ``stream_event`` and then
``end_stream``. ``dialect_for`` picks the functions for a request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..exchange import Exchange
from . import anthropic, openai


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one kind of response is read."""

    stream_event: Callable[[Exchange, str, bytes], None]
    end_stream: Callable[[Exchange], None]
    body: Callable[[Exchange, bytes], None]


_OPENAI = Dialect(openai.stream_event, openai.end_stream, openai.body)
_RESPONSES = Dialect(openai.responses_event, openai.end_stream, openai.body)
_ANTHROPIC = Dialect(anthropic.stream_event, anthropic.end_stream, anthropic.body)


def dialect_for(api: str, path: str) -> tuple[str | None, Dialect]:
    """The operation name (``None`` if not a GenAI call) and the reader to use."""
    if api == "anthropic":
        return anthropic.operation_for(path), _ANTHROPIC
    if openai.is_responses(path):
        return "chat", _RESPONSES
    return openai.operation_for(path), _OPENAI


def inspect_request(ex: Exchange, body: bytes) -> dict[str, Any] | None:
    """Read model, stream flag and output format from a JSON request body.

    A body that is not a JSON object is forwarded unchanged all the same; the
    exchange then has no request model.
    """
    if not body or body[:1] not in b"{ \t\r\n":
        return None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    model = obj.get("model")
    if isinstance(model, str):
        ex.request_model = model
    ex.stream = obj.get("stream") is True
    ex.wants_json = _wants_json(obj)
    ex.wants_tools = bool(obj.get("tools") or obj.get("functions"))
    ex.capture = ex.wants_json or ex.wants_tools
    ex.payload = obj  # the fingerprint and prompt size are read after the request
    return obj


def settle_request(ex: Exchange) -> None:
    """What can wait until the request is over: prompt fingerprint and size."""
    obj = ex.payload
    if obj is None:
        return
    ex.payload = None
    ex.prompt_fingerprint = _fingerprint(obj)
    if ex.usage_source is None:  # only an estimate of the input needs its size
        ex.prompt_chars = _prompt_chars(obj)


def _wants_json(obj: dict[str, Any]) -> bool:
    fmt = obj.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return True
    text = obj.get("text")  # Responses API
    fmt = text.get("format") if isinstance(text, dict) else None
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def _prompt_chars(obj: dict[str, Any]) -> int:
    """Characters of prompt text, for estimating input tokens when usage is missing."""
    total = 0
    for key in ("messages", "input", "prompt", "system", "instructions"):
        total += _text_length(obj.get(key))
    return total


def _text_length(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 6:
        return 0
    if isinstance(value, list):
        return sum(_text_length(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(
            _text_length(v, depth + 1)
            for k, v in value.items()
            if k in ("content", "text", "input")
        )
    return 0


def _fingerprint(obj: dict[str, Any]) -> str | None:
    """A short hash of the system prompt or instructions; never the text itself."""
    parts: list[Any] = []
    for key in ("system", "instructions"):  # Anthropic; OpenAI Responses
        if obj.get(key):
            parts.append(obj[key])
    messages = obj.get("messages")
    if isinstance(messages, list):
        parts.extend(
            m.get("content")
            for m in messages
            if isinstance(m, dict) and m.get("role") in ("system", "developer")
        )
    if not parts:
        return None
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()[:12]
