"""Answers that look wrong although the request succeeded.

Kinds: ``truncated`` (cut by a token limit), ``content_filter``, ``refusal``,
``empty`` (no content and no tool call, and no refusal or filter to explain
it), and, when the request asked for them, ``invalid_json`` output and
``invalid_tool_arguments``. The text checks use the output the dialect kept only
for such requests, and are skipped when it outgrew the cap on what is kept.
"""

from __future__ import annotations

import orjson

from .exchange import Exchange

_TRUNCATED = frozenset({"length", "max_tokens", "max_output_tokens"})
_FILTERED = frozenset({"content_filter"})
_GENERATIVE = frozenset({"chat", "text_completion"})


def anomalies(ex: Exchange) -> list[str]:
    """The anomaly kinds of a finished exchange (none for a failed one)."""
    if ex.status >= 400 or ex.operation not in _GENERATIVE:
        return []
    if ex.error_type not in (None, "content_filter"):
        return []
    found: list[str] = []
    reasons = set(ex.finish_reasons)
    if reasons & _TRUNCATED:
        found.append("truncated")
    if reasons & _FILTERED or ex.error_type == "content_filter":
        found.append("content_filter")
    if ex.refusal or "refusal" in reasons:
        found.append("refusal")
    # A refusal or a filter explains an answer without content: not also empty.
    explained = "refusal" in found or "content_filter" in found
    if not ex.output_seen and not explained and ex.parse_error is None:
        found.append("empty")
    if not ex.output_capped:  # past the cap only the start was kept: no verdict
        found.extend(_invalid_json(ex))
    return found


def _invalid_json(ex: Exchange) -> list[str]:
    found = []
    if ex.wants_json and ex.output_parts and not _parses("".join(ex.output_parts)):
        found.append("invalid_json")
    if any(not _parses("".join(parts) or "{}") for parts in ex.tool_args.values()):
        found.append("invalid_tool_arguments")
    return found


def _parses(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True
