"""The OpenAI wire dialect: chat completions, legacy completions, embeddings and
the Responses API, streamed and not, as OpenAI and compatible servers send them.

Streams are read with cheap byte scans: only the first content event, events
that carry a finish reason or an error, and terminal events are parsed. Usage is
cumulative wherever it appears (some compatible servers repeat it on every
chunk), so the latest is kept by reference and parsed once at the end.
"""

from __future__ import annotations

import time
from typing import Any

from ..classify import classify_error, classify_status
from ..exchange import Exchange
from .common import hold as _hold
from .common import loads as _loads
from .common import message as _message

_RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def operation_for(path: str) -> str | None:
    """The semconv ``gen_ai.operation.name`` for a request path, if it is one."""
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "text_completion"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/responses"):
        return "chat"
    return None


def is_responses(path: str) -> bool:
    return path.rstrip("/").endswith("/responses")


def stream_event(ex: Exchange, name: str, data: bytes) -> None:
    """One SSE event of a chat or completions stream."""
    if data == b"[DONE]":
        ex.terminal = True
        return
    if ex.t_first_token is None or ex.capture:
        obj = _loads(ex, data)
        if obj is not None:
            _chunk(ex, obj, first=ex.response_model is None)
        return
    # Plain ``in`` tests rather than any() over the spellings: this runs for
    # every event of every stream.
    if (
        b'"usage"' in data
        and b'"usage":null' not in data
        and b'"usage": null' not in data
    ):
        ex.pending_usage = data
    if b'"refusal":"' in data:
        ex.refusal = True
    if (
        b'"finish_reason"' in data
        and b'"finish_reason":null' not in data
        and b'"finish_reason": null' not in data
    ) or b'"error"' in data:
        obj = _loads(ex, data)
        if obj is not None:
            _chunk(ex, obj, first=False)


def responses_event(ex: Exchange, name: str, data: bytes) -> None:
    """One SSE event of a Responses API stream."""
    if name.endswith(".delta"):
        if ex.t_first_token is None:
            ex.t_first_token = time.perf_counter()
            ex.output_seen = True
        return
    if name in _RESPONSES_TERMINAL or name == "response.created":
        obj = _loads(ex, data)
        if isinstance(obj, dict) and isinstance(obj.get("response"), dict):
            _response(ex, obj["response"])
            ex.terminal = ex.terminal or name != "response.created"
    elif name == "error":
        obj = _loads(ex, data)
        ex.fail(classify_error(obj), _message(obj))
        ex.terminal = True


def end_stream(ex: Exchange) -> None:
    """Settle what was deferred, once the stream has ended."""
    if ex.pending_usage is not None:
        obj = _loads(ex, ex.pending_usage)
        ex.pending_usage = None
        if isinstance(obj, dict):
            _usage(ex, obj.get("usage"))
    if not ex.terminal:
        ex.fail("stream_truncated", "stream ended without its terminal event")


def body(ex: Exchange, data: bytes) -> None:
    """A complete (non-streamed) response body."""
    obj = _loads(ex, data)
    if not isinstance(obj, dict):
        if ex.status < 400:
            ex.fail("malformed_response", "response body is not a JSON object")
        return
    if ex.status >= 400 or ("error" in obj and obj.get("object") is None):
        ex.fail(classify_status(ex.status, obj) or "upstream_4xx", _message(obj))
        return
    if obj.get("object") == "response":
        _response(ex, obj)
        return
    _head(ex, obj)
    choices = obj.get("choices")
    _finish_reasons(ex, choices)
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                _message_output(ex, choice)
    _usage(ex, obj.get("usage"))


def _chunk(ex: Exchange, obj: Any, first: bool) -> None:
    if not isinstance(obj, dict):
        return
    if "error" in obj:
        ex.fail(classify_error(obj), _message(obj))
        return
    if first:
        _head(ex, obj)
    choices = obj.get("choices")
    if isinstance(choices, list):
        if ex.t_first_token is None and any(_has_content(c) for c in choices):
            ex.t_first_token = time.perf_counter()
            ex.output_seen = True
        if ex.capture:
            for choice in choices:
                _capture_delta(ex, choice)
        elif any(_delta(c).get("refusal") for c in choices):
            ex.refusal = True
        _finish_reasons(ex, choices)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        _usage(ex, usage)


def _head(ex: Exchange, obj: dict[str, Any]) -> None:
    if ex.response_model is None and isinstance(obj.get("model"), str):
        ex.response_model = obj["model"]
    if ex.response_id is None and isinstance(obj.get("id"), str):
        ex.response_id = obj["id"]


def _delta(choice: Any) -> dict[str, Any]:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    return delta if isinstance(delta, dict) else {}


def _has_content(choice: Any) -> bool:
    if isinstance(choice, dict) and choice.get("text"):  # legacy completions
        return True
    delta = _delta(choice)
    return bool(
        delta.get("content")
        or delta.get("tool_calls")
        or delta.get("function_call")
        or delta.get("refusal")
        or delta.get("reasoning_content")
    )


def _capture_delta(ex: Exchange, choice: Any) -> None:
    """Keep the first choice's text and every tool call's argument fragments."""
    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
        return
    delta = _delta(choice)
    text = delta.get("content", choice.get("text"))
    if isinstance(text, str):
        _hold(ex, ex.output_parts, text)
    if delta.get("refusal"):
        ex.refusal = True
    _capture_tool_calls(ex, delta.get("tool_calls"))


def _capture_tool_calls(ex: Exchange, calls: Any) -> None:
    if not isinstance(calls, list):
        return
    for position, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        index = call.get("index", position)
        function = call.get("function")
        args = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(index, int) and isinstance(args, str):
            _hold(ex, ex.tool_args.setdefault(index, []), args)


def _message_output(ex: Exchange, choice: dict[str, Any]) -> None:
    """What a non-streamed choice answered: text, tool calls or a refusal."""
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if text or calls:
        ex.output_seen = True
    if isinstance(message, dict) and message.get("refusal"):
        ex.refusal = True
    if ex.capture and choice.get("index", 0) == 0:
        if isinstance(text, str):
            _hold(ex, ex.output_parts, text)
        _capture_tool_calls(ex, calls)


def _finish_reasons(ex: Exchange, choices: Any) -> None:
    if not isinstance(choices, list):
        return
    for choice in choices:
        if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
            ex.finish_reasons.append(choice["finish_reason"])


def _usage(ex: Exchange, usage: Any) -> None:
    """Chat, completions and embeddings name usage one way, Responses another."""
    if not isinstance(usage, dict):
        return
    ex.usage_source = "provider"
    ex.input_tokens = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    ex.output_tokens = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    if ex.output_tokens is None and ex.operation == "embeddings":
        ex.output_tokens = 0
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    if isinstance(details, dict):
        ex.cached_input_tokens = _int(details.get("cached_tokens"))
    details = usage.get("completion_tokens_details") or usage.get(
        "output_tokens_details"
    )
    if isinstance(details, dict):
        ex.reasoning_tokens = _int(details.get("reasoning_tokens"))


def _response(ex: Exchange, resp: dict[str, Any]) -> None:
    """A Responses API ``response`` object, from a body or a terminal event."""
    _head(ex, resp)
    status = resp.get("status")
    if status == "failed":
        ex.fail(
            classify_error(resp.get("error")), _message({"error": resp.get("error")})
        )
    elif status == "incomplete":
        details = resp.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        ex.finish_reasons.append(str(reason or "incomplete"))
    elif status == "completed":
        ex.finish_reasons.append("stop")
    output = resp.get("output")
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict):
                _response_item(ex, item)
    _usage(ex, resp.get("usage"))


def _response_item(ex: Exchange, item: dict[str, Any]) -> None:
    """One item of a Responses API ``output``: a message or a function call."""
    if item.get("type") == "function_call":
        ex.output_seen = True
        if ex.capture and isinstance(item.get("arguments"), str):
            _hold(ex, ex.tool_args.setdefault(len(ex.tool_args), []), item["arguments"])
        return
    content = item.get("content")
    if item.get("type") != "message" or not isinstance(content, list):
        return
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "refusal":
            ex.refusal = True
        elif part.get("type") == "output_text" and part.get("text"):
            ex.output_seen = True
            if ex.capture:
                _hold(ex, ex.output_parts, str(part["text"]))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
